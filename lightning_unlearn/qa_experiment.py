"""A TOFU-style question-answering unlearning experiment on fictitious people, offline.

The sibling of the canary experiment (`experiment.Experiment`): same caching of the original and retrained models
under `<output>/cache/<key>/`, same `train(split)` and `unlearn(...)` (a `serve_request` with `UnlearnSettings`, like
every driver's); only the data side differs. The forget set
is every training QA pair of the forget people, with span-level forgetting on the answer (the question is context).
Holdout people (never trained on, same generator) calibrate "unseen": membership inference compares forget with
holdout answers, and the forget quality (TOFU) is the KS test between the per-example forget losses of the unlearned
and of the retrained model. Utility: retain answers in training phrasing, retain facts asked in unseen words
(paraphrase) and the perplexity of held-out background text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .experiment import Experiment
from .request import to_device


@dataclass
class QAConfig:
    """Everything that defines the QA corpus and the original / retrained models (and so the cache key)."""

    # Defaults measured on 2 shared CPU cores, 1 thread: ~150-180 s per model under load (~85 s idle). 120 people
    # and 30 kB of background memorise visibly (seed 0: forget answer NLL 2.07 vs holdout 4.18, MIA AUC 0.75; the
    # retrained model 4.26 vs 4.73, AUC 0.53); 200 people / 60 kB memorised too little in this budget (AUC 0.62).
    n_people: int = 120
    facts_per_person: int = 6
    phrasings_per_fact: int = 2
    forget_fraction: float = 0.1
    holdout_fraction: float = 0.1
    background_bytes: int = 30_000
    test_bytes: int = 20_000
    vocab_size: int = 1024
    max_length: int = 128
    arch: str = "gpt2"
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    batch_size: int = 16
    train_steps: int = 600
    lr: float = 5e-3
    warmup_steps: int = 30
    seed: int = 0
    eval_retain_examples: int = 480  # retain QA pairs scored by `evaluate` (a seeded sample)
    eval_batch_size: int = 64

    def key(self) -> str:
        """A short hash of the configuration (prefixed "qa" so it never meets a canary experiment's key)."""
        blob = json.dumps({"kind": "qa", **dataclasses.asdict(self)}, sort_keys=True).encode()
        return "qa-" + hashlib.sha256(blob).hexdigest()[:12]


class QAExperiment(Experiment):
    """The QA benchmark: `Experiment` with the data-side methods replaced (see the module docstring)."""

    def __init__(self, config: QAConfig | None = None, output: str | Path = "runs/qa_experiment",
                 *, progress: bool = True, accelerator: str = "auto") -> None:
        super().__init__(config or QAConfig(), output, progress=progress,  # type: ignore[arg-type]
                         accelerator=accelerator)
        self._corpus = None

    # ------------------------------------------------------------------ data
    @property
    def corpus(self):
        """The generated `QACorpus` (holds the answers: never logged)."""
        if self._corpus is None:
            from .data.qa import make_qa_corpus

            c = self.config
            self._corpus = make_qa_corpus(c.n_people, c.facts_per_person, c.forget_fraction, c.holdout_fraction,
                                          c.seed, phrasings_per_fact=c.phrasings_per_fact,
                                          background_bytes=c.background_bytes, test_bytes=c.test_bytes)
        return self._corpus

    @property
    def registry(self):  # the canary registry of the parent has no meaning here
        raise AttributeError("QAExperiment has no canaries; use .corpus")

    @property
    def data(self):
        """The `ForgetRetainDataModule`: forget people's QA pairs are the forget set, their answers the spans.

        `full` = forget + retain QA + background, `retain` = retain QA + background (packed, whole-text labels; forget
        rows keep labels on the answer only); `test` = held-out background text; `holdout` = holdout QA texts.
        """
        if self._data is None:
            import datasets

            from .data import ForgetRetainDataModule

            c = self.config
            rows = self.corpus.train
            train = datasets.Dataset.from_dict(
                {"text": [r["text"] for r in rows], "is_forget": [r["role"] == "forget" for r in rows],
                 "spans": [[r["answer_span"]] if r["role"] == "forget" else [] for r in rows]},
                features=datasets.Features({"text": datasets.Value("string"), "is_forget": datasets.Value("bool"),
                                            "spans": datasets.List(datasets.List(datasets.Value("int64")))}))
            self.train_dataset = train
            self._data = ForgetRetainDataModule(
                train=train, forget_column="is_forget", span="offsets",
                test=[r["text"] for r in self.corpus.test_text], holdout=[r["text"] for r in self.corpus.holdout],
                vocab_size=c.vocab_size, tokenizer_dir=self.cache / "tokenizer", max_length=c.max_length,
                packing=True, batch_size=c.batch_size, eval_batch_size=c.eval_batch_size, seed=c.seed,
            )
            self._data.setup()
        return self._data

    def qa_loader(self, rows: Sequence[dict[str, Any]], batch_size: int | None = None) -> DataLoader:
        """Batches of QA rows with labels on the answer tokens only, tokenised exactly like the forget split."""
        from .data.tokenize import Collate, Tokenise

        tok = self.data.tokenizer
        encoded = Tokenise(tok, max_length=self.config.max_length)(
            {"text": [r["text"] for r in rows], "example_id": list(range(len(rows))),
             "spans": [[list(r["answer_span"])] for r in rows]})
        items = [dict(zip(encoded, values)) for values in zip(*encoded.values())]
        return DataLoader(items, batch_size=batch_size or self.config.eval_batch_size,
                          collate_fn=Collate(tok.pad_token_id))

    def _sample(self, rows: Sequence[dict[str, Any]], n: int, salt: str) -> list[dict[str, Any]]:
        """A seeded sample of `n` rows (all when fewer), in their original order."""
        if len(rows) <= n:
            return list(rows)
        keep = sorted(random.Random(f"{salt}:{self.config.seed}").sample(range(len(rows)), n))
        return [rows[i] for i in keep]

    def forget_batches(self) -> list[dict[str, torch.Tensor]]:
        """The forget QA pairs (the data module's forget split), labels on the answer tokens only."""
        return [to_device(b, self.device)
                for b in self.data.dataloader("forget", batch_size=self.config.eval_batch_size)]

    def holdout_batches(self) -> list[dict[str, torch.Tensor]]:
        """The holdout people's QA pairs, tokenised like the forget batches: what "unseen" is calibrated on."""
        return [to_device(b, self.device) for b in self.qa_loader(self.corpus.holdout)]

    def held_retain_batch(self) -> dict[str, torch.Tensor]:
        """One batch of retain QA pairs (training phrasing, labels on the answer), a seeded sample over people."""
        return to_device(next(iter(self.qa_loader(self._sample(self.corpus.retain, 32, "held"), batch_size=32))),
                         self.device)

    def retain_batches(self, n: int | None) -> list[dict[str, torch.Tensor]]:
        """The first `n` batches of the deterministic (unshuffled, packed) retain loader: QA and background (None:
        all)."""
        return super().retain_batches(n)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, reference: nn.Module | None = None, **_: Any) -> dict[str, float]:
        """Answer NLLs, test perplexity, the LOSS attack's AUROC and (with the retrained `reference`) forget quality.

        Keys: `forget/loss`, `holdout/loss`, `retain/loss`, `paraphrase/loss` (mean over examples of the mean answer-
        token NLL), `test/loss` and `test/perplexity` (token-weighted, background text), `mia/auc` (forget = members
        vs holdout; 1 = recognised, 0.5 = like unseen; also as `mia/loss/auroc`), and with a reference
        `forget_quality/ks_p` (also as `forget_quality`) plus `reference/forget_loss`.
        """
        from .metrics.forget_quality import ForgetQuality
        from .metrics.membership import MembershipInference

        c = self.config
        loaders = {"forget": self.forget_batches(), "holdout": self.holdout_batches(),
                   "retain": self.qa_loader(self._sample(self.corpus.retain, c.eval_retain_examples, "eval")),
                   "paraphrase": self.qa_loader(self.corpus.paraphrase)}
        losses = {name: per_example_loss(model, batches) for name, batches in loaders.items()}
        out = {f"{name}/loss": float(v.nanmean()) for name, v in losses.items()}
        test_loss = token_loss(model, self.data.dataloader("test", batch_size=c.eval_batch_size))
        out["test/loss"] = test_loss
        out["test/perplexity"] = math.exp(test_loss)
        mia = MembershipInference()
        mia.update_scores({"loss": -losses["forget"]}, member=True)
        mia.update_scores({"loss": -losses["holdout"]}, member=False)
        out["mia/auc"] = out["mia/loss/auroc"] = float(mia.compute()["loss"])
        if reference is not None:
            ref_forget = per_example_loss(reference, loaders["forget"])
            fq = ForgetQuality()
            fq.update(losses["forget"], ref_forget)
            out["forget_quality/ks_p"] = out["forget_quality"] = float(fq.compute())
            out["reference/forget_loss"] = float(ref_forget.nanmean())
        return out


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def per_example_loss(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean NLL of the labelled tokens of every example [N] (float64), model in eval mode (restored after)."""
    from .metrics.functional import example_loss, model_logits

    was_training, device = model.training, _device(model)
    model.eval()
    try:
        out = [example_loss(model_logits(model, b["input_ids"].to(device), b["attention_mask"].to(device)),
                            b["labels"].to(device)).double().cpu() for b in batches]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


@torch.no_grad()
def token_loss(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean NLL over all labelled tokens (log of the perplexity)."""
    from .metrics.functional import model_logits, token_logprobs

    was_training, device = model.training, _device(model)
    model.eval()
    total, count = 0.0, 0
    try:
        for b in batches:
            logits = model_logits(model, b["input_ids"].to(device), b["attention_mask"].to(device))
            lp, _, mask = token_logprobs(logits, b["labels"].to(device))
            total -= float(lp.sum())
            count += int(mask.sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)
