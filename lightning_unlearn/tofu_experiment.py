"""The TOFU-faithful QA benchmark's models, trained on two CPU cores and cached on disk.

    exp = TofuExperiment(TofuConfig(seed=0), "runs/tofu")
    base, original = exp.base_model(), exp.original_model()      # fresh copies from the cache (trained if absent)
    gold = exp.retain_model("forget10")                          # the base finetuned on retain90 only
    exp.forget_batches("forget10"), exp.retain_batches("forget10", 4), exp.holdout_batches(), exp.test_batches()
    exp.rows("forget", "forget10")                               # TOFU-format rows for the evaluation

Like TOFU (Maini et al. 2024): a `base` model is *pretrained* on ordinary text mixed with statements of world facts
and famous "real" authors (`data.tofu_synthetic.make_world`) until its test loss has flattened; the `original` model
is the base finetuned on every trained fictitious author's QA pairs (loss on the answer span only, TOFU's recipe)
until greedy decoding answers them; the `retain` model of a split is the base finetuned on that split's retain
authors only, with the same recipe: the same learning rate, batch size, schedule shape and number of *epochs* (so
fewer optimizer steps than the original, as in TOFU, which trains both for 5 epochs). A few pretraining blocks are
mixed into every finetuning step (`mix_batch`) so the small model keeps the world knowledge it is evaluated on.

The base (and the BPE tokenizer, trained on the pretraining text) depends only on the world and model fields of the
config and is cached once under `<output>/cache/tofu-base-<hash>/`; the finetuned models of a seed live under
`<output>/cache/tofu-<hash>/`. The seed varies the authors, the split assignment and the finetuning data order.
`tofu_build.build(...)` (or `python -m lightning_unlearn.tofu_build`) trains everything for several seeds, in parallel
processes of one thread each, and writes the measured numbers (`TofuExperiment.measure`) beside the models.

The training loop and the checks of the models (`answer_scores`, `choice_accuracy`: not the benchmark's metrics) are
in `tofu_training`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.tofu_synthetic import GENERATOR_VERSION, SPLITS, TofuSynthetic, make_authors, make_world
from .models import atomic_save_pretrained, load_cached_model, resolve_device
from .request import to_device
from .tofu_training import answer_scores, block_stream, choice_accuracy, file_lock, fit_adamw, token_loss

log = logging.getLogger(__name__)

#: config fields the pretrained base (and the tokenizer) depend on; every other field only touches the finetunes
BASE_FIELDS = ("world_seed", "ordinary_bytes", "test_bytes", "n_countries", "n_real_authors", "fact_repeats",
               "vocab_size", "max_length", "arch", "hidden", "layers", "heads", "pretrain_steps", "pretrain_batch",
               "pretrain_lr", "pretrain_warmup", "flat_steps", "flat_lr", "tokenizer_authors")
MODELS = ("base", "original", *(f"retain_{s}" for s in SPLITS))


@dataclass
class TofuConfig:
    """Everything that defines the benchmark's data and models (and so the cache keys); see the module docstring.

    Defaults (measured on 2 shared CPU cores, one thread per process; the numbers are in the README section and
    `measure()`): 200 trained authors x 10 facts (forget01 = 2 authors = 20 questions, forget10 = 20 authors = 200
    questions), 20 holdout authors; a GPT-2 of hidden 128 x 4 layers with a 1024-token BPE (0.94M parameters).
    """

    # fictitious authors (per seed)
    n_authors: int = 100
    facts_per_author: int = 10
    n_holdout: int | None = None  # None: as many as forget10
    # the world and the pretraining text (shared by all seeds)
    world_seed: int = 0
    ordinary_bytes: int = 4_000_000
    test_bytes: int = 60_000
    n_countries: int = 32
    n_real_authors: int = 30
    fact_repeats: int = 60
    tokenizer_authors: int = 200  # authors of a tokenizer-only seed whose QA text joins the tokenizer's corpus
    # the model
    vocab_size: int = 1024
    max_length: int = 128
    arch: str = "gpt2"
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    # pretraining (the base) and its flatness check
    pretrain_steps: int = 2000
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    pretrain_warmup: int = 100
    flat_steps: int = 100  # extra descent steps on fresh ordinary text: test perplexity should move < ~1 %
    flat_lr: float = 3e-4
    # finetuning (original and retain models: the same recipe, the same number of epochs)
    finetune_epochs: int = 20
    finetune_batch: int = 32
    finetune_lr: float = 4e-3
    finetune_warmup: float = 0.05  # fraction of the finetune's steps
    mix_batch: int = 2  # replayed pretraining blocks per finetuning step (0: none; half of them fact paragraphs)
    mix_weight: float = 1.0
    seed: int = 0
    eval_batch_size: int = 64

    @classmethod
    def smoke(cls, **overrides: Any) -> TofuConfig:
        """A tiny configuration for tests: everything trains in a few seconds (numbers are meaningless)."""
        sizes = dict(n_authors=20, facts_per_author=4, ordinary_bytes=20_000, test_bytes=4_000, n_countries=6,
                     n_real_authors=6, fact_repeats=2, tokenizer_authors=10, vocab_size=300, max_length=128,
                     hidden=32, layers=2, heads=2, pretrain_steps=6, pretrain_batch=4, pretrain_warmup=2,
                     flat_steps=2, finetune_epochs=1, finetune_batch=16, mix_batch=1, eval_batch_size=32)
        return cls(**{**sizes, **overrides})

    def base_key(self) -> str:
        blob = json.dumps({"kind": "tofu-base", "generator": GENERATOR_VERSION,
                           **{k: getattr(self, k) for k in BASE_FIELDS}}, sort_keys=True)
        return "tofu-base-" + hashlib.sha256(blob.encode()).hexdigest()[:12]

    def key(self) -> str:
        blob = json.dumps({"kind": "tofu", "generator": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return "tofu-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


class TofuExperiment:
    """The data, the cached models and the batches of one seed of the benchmark (see the module docstring)."""

    def __init__(self, config: TofuConfig | None = None, output_dir: str | Path = "runs/tofu_experiment",
                 *, accelerator: str = "auto") -> None:
        self.config = config or TofuConfig()
        self.output = Path(output_dir)
        self.base_dir = self.output / "cache" / self.config.base_key()
        self.cache = self.output / "cache" / self.config.key()
        self.device = resolve_device(accelerator)
        self.timings: dict[str, float] = {}  # model name -> seconds its training took (from its training.json)
        self._data: TofuSynthetic | None = None
        self._tokenizer = None
        self._blocks: dict[str, list[dict[str, list[int]]]] = {}

    # ------------------------------------------------------------------ data
    @property
    def data(self) -> TofuSynthetic:
        """The generated benchmark of this seed (holds the answers: never logged; its repr shows counts)."""
        if self._data is None:
            c = self.config
            world = make_world(seed=c.world_seed, ordinary_bytes=c.ordinary_bytes, test_bytes=c.test_bytes,
                               n_countries=c.n_countries, n_real_authors=c.n_real_authors, fact_repeats=c.fact_repeats)
            authors = make_authors(c.seed, n_authors=c.n_authors, facts_per_author=c.facts_per_author,
                                   n_holdout=c.n_holdout, exclude=world.real_author_names)
            self._data = TofuSynthetic(world, authors)
        return self._data

    def rows(self, part: str, split: str | None = None) -> list[dict[str, Any]]:
        """TOFU-format rows (`question`, `answer`, `paraphrased_answer`, `perturbed_answer` [5], plus `text` and
        `answer_span`) of `part`: forget / retain (of `split`), holdout (all, or as many authors as `split`
        forgets), real_authors, world_facts. Deep copies: editing them does not touch the benchmark."""
        return copy.deepcopy(self.data.rows(part, split))

    @property
    def tokenizer(self):
        """The byte-level BPE tokenizer trained on the pretraining text (and a tokenizer-only seed's author QA),
        cached with the base."""
        if self._tokenizer is None:
            from .data.tokenizer import load_tokenizer, train_bpe_tokenizer

            path = self.base_dir / "tokenizer"
            with file_lock(self.base_dir, "tokenizer"):
                if not (path / "tokenizer.json").exists():
                    c = self.config
                    helper = make_authors(10_007, n_authors=c.tokenizer_authors, facts_per_author=c.facts_per_author,
                                          exclude=self.data.world.real_author_names)
                    qa = [t for row in helper.rows(range(len(helper.names)))
                          for t in (row["text"], row["paraphrased_answer"], *row["perturbed_answer"])]
                    tmp = path.with_name(".tokenizer.tmp")
                    train_bpe_tokenizer([*self.data.world.pretrain, *qa], vocab_size=c.vocab_size, save_dir=tmp)
                    os.replace(tmp, path)
            self._tokenizer = load_tokenizer(path)
        return self._tokenizer

    def encode(self, rows: Sequence[dict[str, Any]], answer_key: str = "answer") -> list[dict[str, Any]]:
        """Tokenise `qa_text(question, row[answer_key])` per row, labels on the answer's tokens only."""
        from .data.qa import qa_text
        from .data.tokenize import Tokenise

        texts, spans = [], []
        for row in rows:
            if answer_key == "answer" and "text" in row:
                text, span = row["text"], row["answer_span"]
            else:
                text, span = qa_text(row["question"], row[answer_key])
            texts.append(text)
            spans.append([list(span)])
        enc = Tokenise(self.tokenizer, max_length=self.config.max_length)(
            {"text": texts, "example_id": list(range(len(texts))), "spans": spans})
        return [dict(zip(enc, values)) for values in zip(*enc.values())]

    def qa_batches(self, rows: Sequence[dict[str, Any]], batch_size: int | None = None, answer_key: str = "answer"
                   ) -> list[dict[str, torch.Tensor]]:
        """Batches (`input_ids`, `attention_mask`, `labels` -100 except on the answer, `example_id`) of QA rows, in
        order, on the experiment's device."""
        from .data.tokenize import Collate

        items = self.encode(rows, answer_key)
        size = batch_size or self.config.eval_batch_size
        collate = Collate(self.tokenizer.pad_token_id)
        return [to_device(collate(items[i:i + size]), self.device) for i in range(0, len(items), size)]

    def _shuffled(self, rows: Sequence[dict[str, Any]], salt: str) -> list[dict[str, Any]]:
        order = list(range(len(rows)))
        random.Random(f"{salt}:{self.config.seed}").shuffle(order)
        return [rows[i] for i in order]

    def forget_batches(self, split: str) -> list[dict[str, torch.Tensor]]:
        """The forget authors' QA pairs of `split` (each once), labels on the answer tokens only."""
        return self.qa_batches(self.data.rows("forget", split))

    def retain_batches(self, split: str, n: int | None = None) -> list[dict[str, torch.Tensor]]:
        """The first `n` batches (None: all) of the retain authors' QA pairs of `split`, in a seeded order that mixes
        the authors (curvature and retain terms of an unlearning request)."""
        rows = self._shuffled(self.data.rows("retain", split), "retain")
        held = self.config.eval_batch_size // 2
        rows = rows[:-held] if len(rows) > 2 * held else rows  # the held batch's rows stay out
        size = self.config.eval_batch_size
        if n is not None:
            rows = rows[:n * size]
        return self.qa_batches(rows, size)

    def held_retain_batch(self, split: str) -> dict[str, torch.Tensor]:
        """One batch of retain QA pairs the unlearning step is checked on: the last rows of `retain_batches`'s
        seeded order, which those batches leave out (when the retain set has more than twice as many)."""
        rows = self._shuffled(self.data.rows("retain", split), "retain")
        return self.qa_batches(rows[-(self.config.eval_batch_size // 2):], len(rows))[0]

    def holdout_batches(self, split: str | None = None) -> list[dict[str, torch.Tensor]]:
        """The holdout authors' QA pairs (never trained on; all of them, or as many authors as `split` forgets),
        tokenised like the forget batches: what "unseen" is calibrated on."""
        return self.qa_batches(self.data.rows("holdout", split))

    def _text_blocks(self, which: str) -> list[dict[str, list[int]]]:
        """Packed blocks of `max_length` tokens (labels = inputs) of the pretraining text or the test text."""
        if which not in self._blocks:
            from .data.tokenize import Tokenise

            if which == "replay":  # every fact paragraph's block and about as many ordinary ones
                self._blocks[which] = self._text_blocks("facts") + self._text_blocks("ordinary")
                return self._blocks[which]
            world = self.data.world
            if which == "ordinary":  # a seeded sample of the ordinary pretraining documents, as large as the facts
                fact_docs = set(world.fact_docs)
                ordinary = [t for t in world.pretrain if t not in fact_docs]
                random.Random(f"replay:{self.config.world_seed}").shuffle(ordinary)
                budget, texts = sum(len(t) for t in world.fact_docs), []
                for t in ordinary:
                    if budget <= 0:
                        break
                    texts.append(t)
                    budget -= len(t)
            else:
                texts = {"pretrain": world.pretrain, "test": world.test_text, "facts": world.fact_docs}.get(which)
            if texts is None:
                texts = _fresh_ordinary(self.config)  # the flatness check's unseen ordinary text
            enc = Tokenise(self.tokenizer, max_length=self.config.max_length, packing=True)(
                {"text": list(texts), "example_id": list(range(len(texts))), "spans": [[] for _ in texts]})
            blocks = [dict(zip(enc, values)) for values in zip(*enc.values())]
            if len(blocks) > 1 and len(blocks[-1]["input_ids"]) < self.config.max_length:
                blocks = blocks[:-1]
            self._blocks[which] = blocks
        return self._blocks[which]

    def test_batches(self, batch_size: int | None = None) -> list[dict[str, torch.Tensor]]:
        """The held-out ordinary text (never trained on) in packed blocks, labels on every token: test perplexity."""
        from .data.tokenize import Collate

        blocks, size = self._text_blocks("test"), batch_size or self.config.eval_batch_size
        collate = Collate(self.tokenizer.pad_token_id)
        return [to_device(collate(blocks[i:i + size]), self.device) for i in range(0, len(blocks), size)]

    # ------------------------------------------------------------------ models
    def _new_model(self) -> nn.Module:
        from .models import small_causal_lm

        c = self.config
        return small_causal_lm(c.arch, vocab_size=len(self.tokenizer), hidden=c.hidden, layers=c.layers,
                               heads=c.heads, max_positions=c.max_length, seed=c.world_seed,
                               eos_token_id=self.tokenizer.eos_token_id)

    def _path(self, name: str) -> Path:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
        return (self.base_dir if name == "base" else self.cache) / name

    def is_cached(self, name: str) -> bool:
        return (self._path(name) / "training.json").exists()

    def training_record(self, name: str) -> dict[str, Any]:
        """The training.json of a cached model (seconds, steps, epochs, the base's loss curve and flatness check)."""
        return json.loads((self._path(name) / "training.json").read_text())

    def _load(self, name: str) -> nn.Module:
        path = self._path(name)
        if not self.is_cached(name):
            with file_lock(path.parent, name):
                if not self.is_cached(name):  # another process may have trained it while we waited
                    self._train(name)
        model, seconds = load_cached_model(path, lambda: float(self.training_record(name)["seconds"]),
                                           device=self.device)
        self.timings[name] = seconds
        return model

    def base_model(self) -> nn.Module:
        """The pretrained base (shared by all seeds): a fresh copy from the cache, trained first when absent."""
        return self._load("base")

    def original_model(self) -> nn.Module:
        """The base finetuned on every trained author's QA pairs: a fresh copy from the cache."""
        return self._load("original")

    def retain_model(self, split: str) -> nn.Module:
        """The base finetuned on `split`'s retain authors only (TOFU's retain model): a fresh copy from the cache."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return self._load(f"retain_{split}")

    def build(self) -> dict[str, float]:
        """Train (or load) the base, the original and the 3 retain models; returns their training seconds."""
        for name in MODELS:
            self._load(name)
        return dict(self.timings)

    def _train(self, name: str) -> None:
        c = self.config
        path = self._path(name)
        if name == "base":
            model, record = self._pretrain()
        else:
            rows = (self.data.trained_rows() if name == "original"
                    else self.data.rows("retain", name.removeprefix("retain_")))
            model = self._load("base").train()
            record = self._finetune(model, rows)
        record["config_key"] = c.base_key() if name == "base" else c.key()
        atomic_save_pretrained(model.eval(), path, self.tokenizer)
        (path / "training.json").write_text(json.dumps(record, indent=1))
        log.info("trained %s in %.0f s", name, record["seconds"])

    def _pretrain(self) -> tuple[nn.Module, dict[str, Any]]:
        c = self.config
        model = self._new_model().to(self.device).train()
        blocks, test = self._text_blocks("pretrain"), self.test_batches()
        gen = torch.Generator().manual_seed(c.world_seed)
        curve: list[tuple[int, float]] = []
        every = max(1, c.pretrain_steps // 10)

        def on_step(step: int) -> None:
            if step % every == 0 or step == c.pretrain_steps:
                curve.append((step, token_loss(model, test)))

        start, cpu = time.perf_counter(), time.process_time()
        fit_adamw(model, block_stream(blocks, c.pretrain_batch, gen, self.tokenizer.pad_token_id, self.device),
             c.pretrain_steps, c.pretrain_lr, c.pretrain_warmup, on_step=on_step)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        flat = self._flatness(model, test)
        return model, {"seconds": seconds, "cpu_seconds": cpu, "steps": c.pretrain_steps,
                       "tokens": c.pretrain_steps * c.pretrain_batch * c.max_length, "pretrain_blocks": len(blocks),
                       "test_loss_curve": curve, "flatness": flat}

    def _flatness(self, model: nn.Module, test: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """`flat_steps` more AdamW steps at `flat_lr` on fresh ordinary text (no author, no fact): how much test
        perplexity still improves (the base should be flat: < ~1 %)."""
        c = self.config
        probe = copy.deepcopy(model).train()
        before = token_loss(probe, test)
        gen = torch.Generator().manual_seed(c.world_seed + 1)
        fit_adamw(probe, block_stream(self._text_blocks("fresh"), c.pretrain_batch, gen, self.tokenizer.pad_token_id,
                                  self.device), c.flat_steps, c.flat_lr, 0, min_lr_ratio=1.0)
        after = token_loss(probe, test)
        return {"steps": c.flat_steps, "lr": c.flat_lr, "test_loss_before": before, "test_loss_after": after,
                "perplexity_before": math.exp(before), "perplexity_after": math.exp(after),
                "relative_improvement": 1 - math.exp(after - before)}

    def _finetune(self, model: nn.Module, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """TOFU's finetuning: `finetune_epochs` epochs over `rows` (answer-span loss), seeded order, plus
        `mix_batch` pretraining blocks per step."""
        from .data.tokenize import Collate

        c = self.config
        items = self.encode(rows)
        collate = Collate(self.tokenizer.pad_token_id)
        per_epoch = math.ceil(len(items) / c.finetune_batch)
        steps = per_epoch * c.finetune_epochs
        gen = torch.Generator().manual_seed(1_000 + c.seed)
        mix = (block_stream(self._text_blocks("replay"), c.mix_batch, gen, self.tokenizer.pad_token_id,
                             self.device) if c.mix_batch > 0 else None)

        def stream() -> Iterator[list[tuple[dict[str, torch.Tensor], float]]]:
            for _ in range(c.finetune_epochs):
                order = torch.randperm(len(items), generator=gen).tolist()
                for i in range(0, len(order), c.finetune_batch):
                    qa = to_device(collate([items[j] for j in order[i:i + c.finetune_batch]]), self.device)
                    yield [(qa, 1.0)] + ([(next(mix)[0][0], c.mix_weight)] if mix is not None else [])

        start, cpu = time.perf_counter(), time.process_time()
        losses = fit_adamw(model, stream(), steps, c.finetune_lr, max(1, round(c.finetune_warmup * steps)))
        return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, "steps": steps,
                "epochs": c.finetune_epochs, "examples": len(items),
                "final_train_loss": losses[-1] if losses else float("nan")}

    # ------------------------------------------------------------------ checks
    def measure(self, *, mc_rows: int = 200) -> dict[str, Any]:
        """The numbers that show the models do what TOFU needs (cached as `measurements.json` beside the models).

        Per model and part: `exact` (greedy answers exactly right), `nll` (mean answer-token NLL), `choice` (the
        paraphrased answer, for real_authors / world_facts the answer, beats all 5 perturbed answers; on up to
        `mc_rows` rows), `n`; parts `forget/<split>` (every split for base and original, its own for a retain
        model), `retain/<split>` (forget10's retain authors for base and original), `holdout`, `real_authors`,
        `world_facts`; plus `test_ppl` and the training's wall / CPU seconds. Also the base's flatness check and
        test-loss curve."""
        path = self.cache / "measurements.json"
        if path.exists():
            return json.loads(path.read_text())
        out: dict[str, Any] = {"config_key": self.config.key(), "seed": self.config.seed, "models": {}}
        test = self.test_batches()
        for name in MODELS:
            model = self._load(name)
            own = name.removeprefix("retain_") if name.startswith("retain_") else None
            parts = {f"forget/{s}": self.data.rows("forget", s) for s in ([own] if own else SPLITS)}
            parts[f"retain/{own or 'forget10'}"] = self.data.rows("retain", own or "forget10")
            parts.update({p: self.data.rows(p) for p in ("holdout", "real_authors", "world_facts")})
            record = self.training_record(name)
            scores: dict[str, Any] = {"test_ppl": math.exp(token_loss(model, test)), "train_seconds": record["seconds"],
                                      "train_cpu_seconds": record.get("cpu_seconds")}
            for part, rows in parts.items():
                nll, exact = answer_scores(model, self.qa_batches(rows))
                sample = self._shuffled(rows, "mc")[:mc_rows]
                key = "answer" if part in ("real_authors", "world_facts") else "paraphrased_answer"
                scores[part] = {"n": len(rows), "exact": float(exact.float().mean()), "nll": float(nll.mean()),
                                "choice": choice_accuracy(self, model, sample, key)}
            out["models"][name] = scores
        base = self.training_record("base")
        out["flatness"], out["base_test_loss_curve"] = base["flatness"], base["test_loss_curve"]
        path.write_text(json.dumps(out, indent=1))
        return out


# ---------------------------------------------------------------------------------------------------- helpers
def _fresh_ordinary(config: TofuConfig) -> list[str]:
    """Ordinary text from another seed of `synthetic_corpus` (no author, no world fact; never trained on)."""
    from .data.synthetic import synthetic_corpus

    return synthetic_corpus(max(config.test_bytes, config.flat_steps * config.pretrain_batch * config.max_length * 4),
                            seed=20_000 + config.world_seed)
