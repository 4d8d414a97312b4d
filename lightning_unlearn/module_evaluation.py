"""The validation and test half of `UnlearningModule` (a mixin of its class): loss and perplexity of each split
(torchmetrics' `MeanMetric` and `Perplexity`), logged as `val/<split>_loss` / `_ppl` and `test/<split>_loss` / `_ppl`
under the split's own name, and at the end of a test epoch membership inference (forget against holdout) and the
forget set's extraction strength. It reads what the module sets: `model`, `_prepare(batch)` and the trainer's
evaluation loaders, and calls its `_prepare` and Lightning's `log` (the mixin comes before `LightningModule`
in the class's bases, so it defines neither)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from .curvature import model_logits
from .curvature.objective import IGNORE_INDEX
from .metrics import ExtractionStrength, MembershipInference

SPLITS = ("forget", "retain")
TEST_SPLITS = ("forget", "retain", "test", "holdout")
#: every split an evaluation loader may be named after (`ForgetRetainDataModule`'s splits)
EVAL_SPLITS = ("forget", "retain", "test", "holdout", "full")


class ModuleEvaluation:
    """`validation_step`, `test_step` and `on_test_epoch_end` of `UnlearningModule` (see the module docstring)."""

    model: nn.Module
    _trainer: Any

    def init_evaluation(self) -> None:
        """The metrics, one per split and stage (called by the module's `__init__`)."""
        self.val_loss = nn.ModuleDict({s: MeanMetric() for s in EVAL_SPLITS})
        self.val_ppl = nn.ModuleDict({s: Perplexity(ignore_index=IGNORE_INDEX) for s in EVAL_SPLITS})
        self.test_loss = nn.ModuleDict({s: MeanMetric() for s in EVAL_SPLITS})
        self.test_ppl = nn.ModuleDict({s: Perplexity(ignore_index=IGNORE_INDEX) for s in EVAL_SPLITS})
        self.test_mia = MembershipInference()
        self.test_extraction = ExtractionStrength()

    def _loader_names(self, stage: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """The split name of each evaluation loader: the keys of a named `CombinedLoader` (the data module's
        `{"forget": ..., "test": ...}`), else `default` by position."""
        trainer = self._trainer
        loaders = getattr(trainer, f"{stage}_dataloaders", None) if trainer is not None else None
        if isinstance(loaders, Mapping) and loaders and all(name in EVAL_SPLITS for name in loaders):
            return tuple(loaders)
        return default

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Loss and perplexity of each validation split, logged as `val/<split>_loss` and `val/<split>_ppl` under the
        split's own name: the data module validates on forget and test (`val/test_*`), a list of two loaders is
        [forget, retain]."""
        if isinstance(batch, Mapping) and any(s in batch for s in EVAL_SPLITS):
            parts = {s: batch[s] for s in EVAL_SPLITS if batch.get(s) is not None}
        else:
            names = self._loader_names("val", SPLITS)
            if dataloader_idx >= len(names):
                raise ValueError("UnlearningModule validates on two loaders: [forget, retain] (or a CombinedLoader"
                                 " of named splits, e.g. {'forget': ..., 'test': ...})")
            parts = {names[dataloader_idx]: batch}
        for split, part in parts.items():
            self._loss_and_perplexity("val", split, self._prepare(part))

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Loss and perplexity of forget, retain, test and holdout (the data module's test loaders, in this order);
        membership inference (forget vs holdout) and extraction strength at the end of the epoch."""
        if isinstance(batch, Mapping) and any(s in batch for s in EVAL_SPLITS):
            parts = {s: batch[s] for s in EVAL_SPLITS if batch.get(s) is not None}
        else:
            names = self._loader_names("test", TEST_SPLITS)
            if dataloader_idx >= len(names):
                raise ValueError(f"UnlearningModule tests on up to four loaders: {list(TEST_SPLITS)}")
            parts = {names[dataloader_idx]: batch}
        for split, part in parts.items():
            part = self._prepare(part)
            logits = self._loss_and_perplexity("test", split, part)
            if logits is None:
                continue
            if split in ("forget", "holdout"):
                self.test_mia.update(logits, part["labels"], split == "forget")
            if split == "forget":
                self.test_extraction.update(logits, part["labels"])

    def on_test_epoch_end(self) -> None:
        if self.test_extraction.update_count:
            self.log("test/forget_extraction_strength", self.test_extraction.compute())
        try:
            aucs = self.test_mia.compute()
        except ValueError:  # no forget or no holdout data: no membership inference
            aucs = {}
        for attack, auc in aucs.items():
            self.log(f"test/mia_{attack}_auroc", auc)
        self.test_mia.reset()
        self.test_extraction.reset()

    def _loss_and_perplexity(self, stage: str, split: str, part: Mapping[str, Tensor]) -> Tensor | None:
        """Update and log `<stage>/<split>_loss` and `_ppl`; returns the full logits (None when nothing is valid)."""
        full = model_logits(self.model, part)
        logits = full[:, :-1].float()
        target = part["labels"][:, 1:]
        valid = int((target != IGNORE_INDEX).sum())
        if valid == 0:
            return None
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                ignore_index=IGNORE_INDEX)
        losses, ppls = (self.val_loss, self.val_ppl) if stage == "val" else (self.test_loss, self.test_ppl)
        losses[split].update(nll, weight=valid)
        ppls[split].update(logits, target)
        self.log(f"{stage}/{split}_loss", losses[split], on_epoch=True, add_dataloader_idx=False)
        self.log(f"{stage}/{split}_ppl", ppls[split], on_epoch=True, add_dataloader_idx=False)
        return full
