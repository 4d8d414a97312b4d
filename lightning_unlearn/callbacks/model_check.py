"""What the drop-in callbacks check of the model they are given before training (`CurvatureCallback.check_model`):
which parameters the trainer's optimizers update (a `model` attribute they do not train is a teacher or reference
model, not the one to unlearn), the `model_getter=` example a message shows for this LightningModule, and the first
batch of data a trial forward runs on."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
from torch import nn


def optimized_parameters(trainer: pl.Trainer | None) -> set[int]:
    """Ids of the parameters the trainer's optimizers update (empty without a trainer or optimizers)."""
    if trainer is None:
        return set()
    try:
        optimizers = list(trainer.optimizers or [])
    except (AttributeError, RuntimeError):  # a trainer not attached to a strategy yet
        return set()
    return {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}


def getter_example(who: str, pl_module: nn.Module, model: nn.Module, optimized: set[int]) -> str:
    """`who(..., model_getter=lambda m: m.<child>)` for the direct child most likely to be the trained language
    model (one the optimizers update, then a Hugging Face model), so the message shows the fix for this module."""
    children = [(name, child) for name, child in pl_module.named_children()
                if child is not model and next(child.parameters(), None) is not None]

    def rank(item: tuple[str, nn.Module]) -> tuple[bool, bool]:
        params = item[1].parameters()
        return any(id(p) in optimized for p in params), hasattr(item[1], "config")

    children.sort(key=rank, reverse=True)
    name = children[0][0] if children and any(rank(children[0])) else "<the trained model's attribute>"
    return f"{who}(..., model_getter=lambda m: m.{name})"


def first_batch(data: Any) -> Any | None:
    """The first batch of `data` when it can be read again (a loader or a list; one dict is one batch); None for a
    one-shot iterator (the request must read all of it) or no data."""
    if data is None:
        return None
    if isinstance(data, Mapping):
        return data
    if isinstance(data, Iterator) or not isinstance(data, Iterable):
        return None
    for batch in data:
        return batch
    return None
