"""`CausalLMModule`: plain next-token training of a causal LM in Lightning.

It builds the models that unlearning is measured on: the original model (trained on the full data, forget set
included) and the retrained gold standard (trained on the retain data alone), with the same recipe.
It is also an ordinary LightningModule to which the drop-in `Unlearn` callback can be attached.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from .curvature.objective import CrossEntropyObjective, model_logits
from .models import load_causal_lm


def warmup_cosine(warmup: int, total: int, floor: float) -> Callable[[int], float]:
    """The learning-rate factor of step `step`: linear warmup over `warmup` steps, then a cosine from 1 down to
    `floor` at step `total` (for `torch.optim.lr_scheduler.LambdaLR`)."""
    warmup = max(1, warmup)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule

class CausalLMModule(L.LightningModule):
    """Train `model` (an nn.Module, or a path/hub id loaded with `from_pretrained`) with AdamW on the mean token NLL.

    The learning rate warms up linearly for `warmup_steps` and follows a cosine to `min_lr_ratio * lr` over
    `max_steps` (when given; the Trainer's estimate otherwise).
    """

    def __init__(
        self,
        model: nn.Module | str,
        *,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        max_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.model = load_causal_lm(model) if isinstance(model, (str, Path)) else model
        self.objective = CrossEntropyObjective()
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_steps, self.min_lr_ratio, self.max_steps = warmup_steps, min_lr_ratio, max_steps
        self.save_hyperparameters(ignore=["model"])

    def on_fit_start(self) -> None:
        self.model.train()  # models built with small_causal_lm / from_pretrained come in eval mode

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model_logits(self.model, batch)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.objective.loss(self(batch), batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, betas=(0.9, 0.98),
        )
        total = self.max_steps or int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(self.warmup_steps, total, self.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
