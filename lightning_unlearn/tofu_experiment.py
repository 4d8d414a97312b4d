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
`build(...)` (or `python -m lightning_unlearn.tofu_experiment`) trains everything for several seeds, in parallel
processes of one thread each, and writes the measured numbers (`TofuExperiment.measure`) beside the models.

Checks of the models use two small helpers, not the benchmark's metrics: `answer_scores` (per-question answer NLL
and whether greedy decoding reproduces the answer exactly: all answer tokens are the argmax under teacher forcing,
which is what greedy decoding of the tokenised answer yields) and `choice_accuracy` (the right answer's total NLL
below all 5 perturbed answers').
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.tofu_synthetic import GENERATOR_VERSION, SPLITS, TofuSynthetic, make_authors, make_world
from .experiment import atomic_save_pretrained, resolve_device
from .request import to_device

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
            with _lock(self.base_dir, "tokenizer"):
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
        from .models import load_causal_lm

        path = self._path(name)
        if not self.is_cached(name):
            with _lock(path.parent, name):
                if not self.is_cached(name):  # another process may have trained it while we waited
                    self._train(name)
        self.timings[name] = float(self.training_record(name)["seconds"])
        return load_causal_lm(path).eval().to(self.device)

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
        _fit(model, _block_stream(blocks, c.pretrain_batch, gen, self.tokenizer.pad_token_id, self.device),
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
        _fit(probe, _block_stream(self._text_blocks("fresh"), c.pretrain_batch, gen, self.tokenizer.pad_token_id,
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
        mix = (_block_stream(self._text_blocks("replay"), c.mix_batch, gen, self.tokenizer.pad_token_id,
                             self.device) if c.mix_batch > 0 else None)

        def stream() -> Iterator[list[tuple[dict[str, torch.Tensor], float]]]:
            for _ in range(c.finetune_epochs):
                order = torch.randperm(len(items), generator=gen).tolist()
                for i in range(0, len(order), c.finetune_batch):
                    qa = to_device(collate([items[j] for j in order[i:i + c.finetune_batch]]), self.device)
                    yield [(qa, 1.0)] + ([(next(mix)[0][0], c.mix_weight)] if mix is not None else [])

        start, cpu = time.perf_counter(), time.process_time()
        losses = _fit(model, stream(), steps, c.finetune_lr, max(1, round(c.finetune_warmup * steps)))
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
@contextlib.contextmanager
def _lock(folder: Path, name: str) -> Iterator[None]:
    """An exclusive advisory lock on `folder/.<name>.lock`: one process trains a cached model (or the tokenizer),
    the others wait, then load it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fresh_ordinary(config: TofuConfig) -> list[str]:
    """Ordinary text from another seed of `synthetic_corpus` (no author, no world fact; never trained on)."""
    from .data.synthetic import synthetic_corpus

    return synthetic_corpus(max(config.test_bytes, config.flat_steps * config.pretrain_batch * config.max_length * 4),
                            seed=20_000 + config.world_seed)


def _block_stream(blocks: Sequence[dict[str, list[int]]], batch_size: int, gen: torch.Generator, pad: int,
                  device: torch.device) -> Iterator[list[tuple[dict[str, torch.Tensor], float]]]:
    """Endless batches of `batch_size` packed blocks, reshuffled every epoch."""
    from .data.tokenize import Collate

    collate = Collate(pad)
    while True:
        order = torch.randperm(len(blocks), generator=gen).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [(to_device(collate([blocks[j] for j in order[i:i + batch_size]]), device), 1.0)]
        if len(order) < batch_size:
            yield [(to_device(collate([blocks[j] for j in order]), device), 1.0)]


def _fit(model: nn.Module, batches: Iterable[list[tuple[dict[str, torch.Tensor], float]]], steps: int, lr: float,
         warmup: int, *, min_lr_ratio: float = 0.1, weight_decay: float = 0.01, clip: float = 1.0,
         on_step: Callable[[int], None] | None = None) -> list[float]:
    """`steps` AdamW steps (linear warmup, cosine to `min_lr_ratio * lr`, gradient clipping) on the weighted sum of
    the mean token NLLs of each step's batches. Returns the per-step losses."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    warmup = max(1, warmup)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses: list[float] = []
    for step, parts in enumerate(batches, start=1):
        if step > steps:
            break
        loss = sum(w * model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
                   for b, w in parts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step)
    model.eval()
    return losses


@torch.no_grad()
def answer_scores(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the mean NLL of the labelled (answer) tokens [N] and whether every one of them is the argmax
    given the true prefix [N] bool (= greedy decoding from the prompt reproduces the tokenised answer exactly)."""
    was = model.training
    model.eval()
    nll, exact = [], []
    try:
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            target = b["labels"][:, 1:]
            mask = target != -100
            lp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            count = mask.sum(-1).clamp_min(1)
            nll.append((-(lp * mask).sum(-1) / count).double().cpu())
            right = (logits.argmax(-1) == target) | ~mask
            exact.append(right.all(-1).cpu())
    finally:
        model.train(was)
    if not nll:
        return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.bool)
    return torch.cat(nll), torch.cat(exact)


@torch.no_grad()
def total_nll(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Per example: the summed NLL of the labelled tokens [N] (float64)."""
    was = model.training
    model.eval()
    out = []
    try:
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            target = b["labels"][:, 1:]
            mask = target != -100
            lp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            out.append((-(lp * mask).sum(-1)).double().cpu())
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def choice_accuracy(experiment: TofuExperiment, model: nn.Module, rows: Sequence[dict[str, Any]],
                    answer_key: str = "paraphrased_answer") -> float:
    """Fraction of rows whose `answer_key` has a lower total NLL than each of its 5 perturbed answers (same wording,
    other values: a 6-way multiple choice, chance 1/6)."""
    if not rows:
        return float("nan")
    right = total_nll(model, experiment.qa_batches(rows, answer_key=answer_key))
    k = len(rows[0]["perturbed_answer"])
    flat = [{"question": r["question"], "answer": p} for r in rows for p in r["perturbed_answer"]]
    wrong = total_nll(model, experiment.qa_batches(flat)).view(len(rows), k)
    return float((right.unsqueeze(1) < wrong).all(1).double().mean())


@torch.no_grad()
def token_loss(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean NLL over all labelled tokens (the log of the perplexity)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            target = b["labels"][:, 1:]
            mask = target != -100
            lp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            total -= float((lp * mask).sum())
            count += int(mask.sum())
    finally:
        model.train(was)
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------------- build
def _build_one(args: tuple[dict[str, Any], str, str, str]) -> tuple[int, str, Any]:
    """One job of `build`, in a worker of one thread: train (or load) a model, or `measure` a seed."""
    config, output, name, accelerator = args
    torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    exp = TofuExperiment(TofuConfig(**config), output, accelerator=accelerator)
    if name == "measure":
        return exp.config.seed, name, exp.measure()
    exp._load(name)
    record = exp.training_record(name)
    return exp.config.seed, name, {"seconds": record["seconds"], "cpu_seconds": record.get("cpu_seconds")}


def build(config: TofuConfig | None = None, output_dir: str | Path = "runs/tofu_experiment",
          seeds: Sequence[int] = (0, 1, 2), *, workers: int = 1, accelerator: str = "cpu") -> dict[str, Any]:
    """Train (or load) the shared base, then each seed's original and 3 retain models (`workers` processes of one
    thread), then measure every seed. Returns {"wall_seconds_training", "wall_seconds", "train_seconds": {"base" |
    "seed<k>": ...} (wall and CPU seconds of each model's training, as recorded when it was trained), "flatness" (the
    base's check), "measurements": {seed: `TofuExperiment.measure()`}}."""
    config = config or TofuConfig()
    start = time.perf_counter()
    torch.set_num_threads(1)
    first = TofuExperiment(config, output_dir, accelerator=accelerator)
    first.base_model()
    base = first.training_record("base")
    jobs = [(dataclasses.asdict(dataclasses.replace(config, seed=s)), str(output_dir), name, accelerator)
            for s in seeds for name in MODELS[1:]]
    checks = [(dataclasses.asdict(dataclasses.replace(config, seed=s)), str(output_dir), "measure", accelerator)
              for s in seeds]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            done = pool.map(_build_one, jobs, chunksize=1)
            trained = time.perf_counter() - start
            measured = pool.map(_build_one, checks, chunksize=1)
    else:
        done = [_build_one(job) for job in jobs]
        trained = time.perf_counter() - start
        measured = [_build_one(job) for job in checks]
    seconds: dict[str, Any] = {"base": {"seconds": base["seconds"], "cpu_seconds": base.get("cpu_seconds")}}
    for seed, name, s in done:
        seconds.setdefault(f"seed{seed}", {})[name] = s
    return {"wall_seconds_training": trained, "wall_seconds": time.perf_counter() - start, "train_seconds": seconds,
            "flatness": base["flatness"], "measurements": {seed: m for seed, _, m in measured}}


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build (train and cache) the TOFU-style benchmark's models.")
    parser.add_argument("--output", default="runs/tofu_experiment")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="the tiny test configuration")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override config fields")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = TofuConfig.smoke() if args.smoke else TofuConfig()
    types = {f.name: f.type for f in dataclasses.fields(TofuConfig)}
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in types:
            raise SystemExit(f"unknown config field {key!r}")
        cast = float if "float" in str(types[key]) else int if "int" in str(types[key]) else str
        config = dataclasses.replace(config, **{key: cast(value)})
    result = build(config, args.output, args.seeds, workers=args.workers)
    path = Path(args.output) / "build.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "measurements"}, indent=1))
    print(f"measurements: {path}")


if __name__ == "__main__":
    main()
