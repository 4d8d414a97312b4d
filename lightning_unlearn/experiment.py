"""An end-to-end unlearning experiment on the embedded default corpus, offline.

    corpus with canaries -> train the original model -> retrain without the forget set (gold standard)
    -> unlearn -> evaluate before / after / retrain -> report

The forget set is the inserted canaries, with span-level forgetting: only the secret's tokens are forgotten,
the template around them is context. Membership inference compares the inserted canaries (members) with the
never-inserted reference canaries of the same template and randomness space (non-members), so the attack sees
the same distribution on both sides. Shared by `lightning-unlearn demo` and the benchmarks; trained models are
cached under `<output>/cache/<config hash>/` so that a benchmark runs many methods on one pair of models.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .curvature.base import Curvature
from .models import atomic_save_pretrained, load_cached_model, resolve_device
from .request import RequestResult, serve_request, to_device
from .settings import UnlearnSettings

log = logging.getLogger(__name__)


@dataclass
class ExperimentConfig:
    """Everything that defines the original and retrained models (and so the cache key)."""

    corpus_bytes: int = 400_000
    canaries_per_group: int = 4
    repetitions: tuple[int, ...] = (5, 10, 20)
    n_references: int = 40
    n_calibration: int = 20  # more never-inserted canaries: the unlearning target's holdout (never evaluated on)
    secret_length: int = 6  # digits per secret: |R| = 10 ** secret_length candidates for exposure
    vocab_size: int = 512
    max_length: int = 128
    arch: str = "gpt2"
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    batch_size: int = 16
    train_steps: int = 900
    lr: float = 3e-3
    warmup_steps: int = 50
    seed: int = 0

    def key(self) -> str:
        """A short hash of the configuration: runs with equal keys reuse the cached models."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


class Experiment:
    """The data, the two trained models and the evaluation of one configuration (see the module docstring)."""

    def __init__(self, config: ExperimentConfig | None = None, output: str | Path = "runs/experiment",
                 *, progress: bool = True, accelerator: str = "auto") -> None:
        self.config = config or ExperimentConfig()
        #: where the models train and the requests run: Lightning's accelerator name ("auto": a GPU when there is one)
        self.accelerator = accelerator
        self.device = resolve_device(accelerator)
        self.output = Path(output)
        self.cache = self.output / "cache" / self.config.key()
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.last_summary: dict[str, Any] = {}
        self.last_result: RequestResult | None = None
        self._data = None
        self._registry = None
        self.train_dataset = None  # the training text with canaries (columns text, canary_id, spans)

    # ------------------------------------------------------------------ data
    @property
    def registry(self):
        """The canary registry (inserted and reference canaries; holds the secrets, never logged)."""
        if self._registry is None:
            from .data import make_canaries

            c = self.config
            template = "my PIN is " + " ".join(["{d}"] * c.secret_length)
            self._registry = make_canaries(c.canaries_per_group, c.repetitions, n_references=c.n_references,
                                           template=template, length=c.secret_length, seed=c.seed)
        return self._registry

    @property
    def calibration_canaries(self) -> list[Any]:
        """Never-inserted canaries of the same template and space, distinct from the inserted ones and from the
        evaluation references: the holdout the unlearning target is calibrated on (the evaluation never sees
        them, so the target is not fitted to the metric)."""
        from .data import make_canaries

        c = self.config
        template = "my PIN is " + " ".join(["{d}"] * c.secret_length)
        taken = {x.secret for x in (*self.registry.inserted, *self.registry.references)}
        extra = make_canaries(1, (1,), n_references=c.n_calibration, template=template, length=c.secret_length,
                              seed=c.seed + 7919)
        return [x for x in extra.references if x.secret not in taken]

    @property
    def data(self):
        """The `ForgetRetainDataModule`: canaries are the forget set, their secrets the forgotten spans."""
        if self._data is None:
            from .data import ForgetRetainDataModule, insert_canaries, synthetic_corpus

            c = self.config
            corpus = synthetic_corpus(c.corpus_bytes, seed=c.seed)
            train = insert_canaries(corpus, self.registry, seed=c.seed)
            self.train_dataset = train
            self._data = ForgetRetainDataModule(
                train=train, forget_column="canary_id", span="offsets", vocab_size=c.vocab_size,
                tokenizer_dir=self.cache / "tokenizer", max_length=c.max_length, packing=True,
                batch_size=c.batch_size, seed=c.seed,
            )
            self._data.setup()
        return self._data

    def canary_loader(self, which: str = "references"):
        """Batches of canary texts (labels on the secret only), `inserted` or `references`: the MIA's two sides.
        Tokenised exactly like the data module's forget examples."""
        from torch.utils.data import DataLoader

        from .data.tokenize import Collate, Tokenise

        canaries = self.calibration_canaries if which == "calibration" else getattr(self.registry, which)
        tok = self.data.tokenizer
        encoded = Tokenise(tok, max_length=self.config.max_length)(
            {"text": [c.text for c in canaries], "example_id": list(range(len(canaries))),
             "spans": [[list(c.secret_span)] for c in canaries]})
        rows = [dict(zip(encoded, values)) for values in zip(*encoded.values())]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return DataLoader(rows, batch_size=self.config.batch_size, collate_fn=Collate(pad))

    def forget_batches(self) -> list[dict[str, torch.Tensor]]:
        """The forget set as the deletion request names it: each inserted canary once (the training text repeats
        them 5 to 20 times; counting the repeats would weight the forget gradient and the target's membership test
        towards the most repeated canaries, while every canary has to go)."""
        seen: set[bytes] = set()
        rows: list[dict[str, torch.Tensor]] = []
        for batch in self.data.dataloader("forget", batch_size=64):
            for i in range(int(batch["input_ids"].shape[0])):
                row = {k: v[i] for k, v in batch.items() if isinstance(v, torch.Tensor)}
                key = row["input_ids"][row["attention_mask"].bool()].numpy().tobytes()
                if key not in seen:
                    seen.add(key)
                    rows.append(row)
        return [to_device({k: torch.stack([r[k] for r in rows[i:i + 64]]) for k in rows[0]}, self.device)
                for i in range(0, len(rows), 64)]

    def retain_batches(self, n: int | None) -> list[dict[str, torch.Tensor]]:
        """The first `n` batches of the deterministic retain curvature loader (None: all of them)."""
        out = []
        for i, b in enumerate(self.data.curvature_dataloader("retain")):
            if n is not None and i >= n:
                break
            out.append(to_device(b, self.device))
        return out

    def holdout_batches(self) -> list[dict[str, torch.Tensor]]:
        """The unlearning target's holdout: batches of the calibration canaries (see `calibration_canaries`)."""
        return [to_device(b, self.device) for b in self.canary_loader("calibration")]

    def held_retain_batch(self) -> dict[str, torch.Tensor]:
        """A retain batch the unlearning step is checked on (from the test split: never used to fit anything)."""
        return to_device(next(iter(self.data.dataloader("test", batch_size=32))), self.device)

    # ------------------------------------------------------------------ models
    def new_model(self) -> nn.Module:
        from .models import small_causal_lm

        c = self.config
        return small_causal_lm(c.arch, vocab_size=len(self.data.tokenizer), hidden=c.hidden, layers=c.layers,
                               heads=c.heads, max_positions=c.max_length, seed=c.seed,
                               eos_token_id=self.data.tokenizer.eos_token_id)

    def train(self, split: str = "full") -> nn.Module:
        """Train a fresh model on `split` ("full": the original; "retain": the gold standard), or load it from the
        cache (`UserInputError` naming the cache entry when it cannot be loaded). Records `train_seconds` /
        `retrain_seconds`."""
        import lightning as L

        from .lm import CausalLMModule
        name = {"full": "original", "retain": "retrained"}[split]
        timing = {"full": "train_seconds", "retain": "retrain_seconds"}[split]
        path = self.cache / name
        meta = path / "training.json"
        if meta.exists():
            model, seconds = load_cached_model(path, lambda: float(json.loads(meta.read_text())["seconds"]),
                                               device=self.device)
            self.timings[timing] = seconds
            return model
        c = self.config
        L.seed_everything(c.seed, verbose=False)
        module = CausalLMModule(self.new_model(), lr=c.lr, warmup_steps=c.warmup_steps, max_steps=c.train_steps)
        loader = self.data.dataloader(split, shuffle=True)
        # max_steps ends the training; max_epochs, the epochs those steps take, only gives the progress bar a bound
        # ("Epoch 9/11" instead of Lightning's "Epoch 9/-2" when only max_steps is set)
        epochs = math.ceil(c.train_steps / max(len(loader), 1))
        trainer = L.Trainer(max_steps=c.train_steps, max_epochs=epochs, accelerator=self.accelerator, devices=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=self.progress,
                            enable_model_summary=False, callbacks=_progress_callbacks(self.progress),
                            default_root_dir=str(self.output))
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        seconds = time.perf_counter() - start
        model = module.model.eval().to(self.device)
        atomic_save_pretrained(model, path)
        meta.write_text(json.dumps({"seconds": seconds, "steps": trainer.global_step, "split": split}))
        self.timings[timing] = seconds
        return model

    # ------------------------------------------------------------------ unlearning and evaluation
    def unlearn(self, model: nn.Module, settings: UnlearnSettings, *, full_curvature: Curvature | None = None,
                log: Callable[[Any], None] | None = None) -> tuple[nn.Module, list[Any], float]:
        """Run the request of `settings` on a copy of `model` with `serve_request` (the path of every driver): the
        forget batches, `settings.curvature_batches` retain batches (curvature and retain term), the held retain
        batch and the holdout batches (the target; `settings.holdout_batches=0` for none). Returns (unlearned copy,
        step records, seconds of the request); `last_result` keeps the `RequestResult` (its method and curvature),
        `last_summary` the method's summary."""
        model = copy.deepcopy(model).eval()
        forget = self.forget_batches()
        retain = self.retain_batches(settings.curvature_batches)
        held = self.held_retain_batch()
        holdout = self.holdout_batches() if settings.holdout_batches != 0 else None
        start = time.perf_counter()
        result = serve_request(model, forget, retain, holdout, settings=settings, held_retain=held,
                               full_curvature=full_curvature, log=log)
        seconds = time.perf_counter() - start
        #: the last run's request: its records, `Unlearner.summary()` (status, target, losses) and method
        self.last_result = result
        self.last_summary = result.summary
        return model, list(result), seconds

    def evaluate(self, model: nn.Module, reference: nn.Module | None = None, **kwargs: Any) -> Any:
        """Every metric of `lightning_unlearn.metrics.evaluate`, with canaries as forget / references as holdout."""
        from .metrics import evaluate

        return evaluate(model, forget=self.canary_loader("inserted"), holdout=self.canary_loader("references"),
                        test=self.data.dataloader("test"), canaries=self.registry, tokenizer=self.data.tokenizer,
                        reference=reference, progress=self.progress, **kwargs)


def _progress_callbacks(progress: bool) -> list[Any]:
    if not progress:
        return []
    try:
        from lightning.pytorch.callbacks import RichProgressBar

        return [RichProgressBar(leave=False)]
    except (ImportError, ModuleNotFoundError):  # rich missing: Lightning's default bar
        return []


def summarize(result: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of an evaluation (keys documented in the README)."""
    def get(key: str) -> float:
        return float(result.get(key, float("nan")))

    return {
        "exposure_inserted_mean": get("exposure/mean"),
        "exposure_reference_mean": get("exposure/reference_mean"),
        "test_perplexity": get("test/perplexity"),
        "forget_loss": get("forget/loss"),
        "mia_auc": get("mia/loss/auroc"),
    }
