"""The unlearning engine driven from Lightning Fabric: `fabric.all_reduce(t, reduce_op="sum")` as the reduce.

    fabric = Fabric(accelerator="cuda", devices=4, strategy="ddp"); fabric.launch()
    model = fabric.setup(model)   # or the plain module
    records = fabric_unlearn(fabric, model, forget_loader, retain_loader, holdout=holdout_loader)
    records.status, records.summary   # "target_reached" | ...; the method's summary() (numbers only)

Every process passes the same loaders (or its own shards): each keeps its share of every batch list and the engine
sums statistics, gradients and losses across processes, so all processes take the same update.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from .callbacks import (
    CURVATURE_DATA,
    check_strategy,
    default_batch_transform,
    gather_with,
    is_second_order,
    load_curvature_state,
    make_unlearner,
    request_curvature,
    share,
)
from .curvature import Curvature, Reduce, identity
from .distributed import agree_on_batches


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Fabric's wrapper (and DDP's): curvature runs on it, not on the wrapper."""
    inner = getattr(model, "_original_module", None)
    model = inner if isinstance(inner, nn.Module) else model
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def fabric_reduce(fabric: Fabric) -> Reduce:
    """The engine's `reduce` for Fabric: a sum across processes (identity on one)."""
    if fabric.world_size <= 1:
        return identity

    def reduce(tensor: Tensor) -> Tensor:
        return fabric.all_reduce(tensor, reduce_op="sum")

    return reduce


def fabric_gather(fabric: Fabric) -> Reduce:
    """The engine's `gather` (concatenate along dim 0) for Fabric."""
    return gather_with(lambda t: fabric.all_gather(t), fabric.world_size)


def fabric_curvature(
    fabric: Fabric,
    model: nn.Module,
    batches: Iterable[Any],
    backend: str = "kfac",
    *,
    max_batches: int | None = None,
    **curvature_kwargs: Any,
) -> Curvature:
    """A finalized curvature of `batches` (this process's share), summed across processes: e.g. a curvature
    checkpoint of the training data for later `full_minus_forget` requests."""
    check_strategy(fabric.strategy, "fabric_curvature")
    module = unwrap(model)
    prepared = [_prepare(fabric, b) for b in batches]
    return request_curvature(module, backend, "retain", prepared, reduce=fabric_reduce(fabric),
                             gather=fabric_gather(fabric), rank=fabric.global_rank, world_size=fabric.world_size,
                             limit=max_batches, curvature_kwargs=curvature_kwargs)


def fabric_unlearn(
    fabric: Fabric,
    model: nn.Module,
    forget_loader: Iterable[Any],
    retain_loader: Iterable[Any] | None = None,
    *,
    method: str = "newton",
    curvature: str = "kfac",
    curvature_data: str = "retain",
    full_curvature: Curvature | Mapping[str, Any] | str | Path | None = None,
    held_retain_batch: Any | None = None,
    holdout: Iterable[Any] | None = None,
    damping: float | None = None,
    scale: float | None = None,
    steps: int | None = None,
    max_retain_increase: float | None = 0.05,
    curvature_batches: int | None = None,
    curvature_kwargs: Mapping[str, Any] | None = None,
    **method_kwargs: Any,
) -> UnlearnRun:
    """Unlearn `forget_loader` from `model` (plain or `fabric.setup` module) on every process; returns the
    `StepRecord`s (identical on every process) as an `UnlearnRun` list that also carries the method's `status`
    and `summary()`. `full_curvature` (for `full_minus_forget`) is a finalized `Curvature`, its `state_dict`, or a
    curvature file / Lightning checkpoint. `holdout`: never-trained batches of the forget set's kind, the level the run
    aims at (each process keeps its share, like the forget batches). `damping`, `scale`
    and `steps` go to the method only when set (None: its default recipe)."""
    check_strategy(fabric.strategy, "fabric_unlearn")
    if curvature_data not in CURVATURE_DATA:
        raise ValueError(f"curvature_data must be one of {CURVATURE_DATA}, got {curvature_data!r}")
    module = unwrap(model)
    rank, world = fabric.global_rank, fabric.world_size
    reduce, gather = fabric_reduce(fabric), fabric_gather(fabric)
    forget = [_prepare(fabric, b) for b in forget_loader]
    retain = [_prepare(fabric, b) for b in retain_loader] if retain_loader is not None else None
    held = _prepare(fabric, held_retain_batch) if held_retain_batch is not None else (retain[0] if retain else None)
    holdout_batches = [_prepare(fabric, b) for b in holdout] if holdout is not None else None
    agree_on_batches(reduce, rank, world, "fabric_unlearn", forget=len(forget),
                     retain=None if retain is None else len(retain),
                     holdout=None if holdout_batches is None else len(holdout_batches))
    if not forget:
        raise ValueError("fabric_unlearn: forget_loader yielded no batch")
    if holdout_batches is not None and not holdout_batches:
        raise ValueError("fabric_unlearn: holdout yielded no batch; pass holdout=None for no target")

    curv = full = None
    ckwargs = dict(curvature_kwargs or {})
    if is_second_order(method):
        if curvature_data == "full_minus_forget":
            full = _full(full_curvature, curvature, module, fabric, reduce, gather, ckwargs)
        source = retain if curvature_data == "retain" else forget
        curv = request_curvature(module, curvature, curvature_data, source or [], full=full, reduce=reduce,
                                 gather=gather, rank=rank, world_size=world, limit=curvature_batches,
                                 curvature_kwargs=ckwargs)
    if steps is not None:
        method_kwargs["steps"] = steps
    unlearner = make_unlearner(method, module, curvature=curv, full_curvature=full, backend=curvature,
                               curvature_data=curvature_data, damping=damping, scale=scale, reduce=reduce,
                               gather=gather, curvature_kwargs=ckwargs, max_retain_increase=max_retain_increase,
                               **method_kwargs)
    records = unlearner.fit(share(forget, rank, world), share(retain, rank, world) if retain else None, held,
                            holdout_batches=share(holdout_batches, rank, world) if holdout_batches else None)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        with torch.no_grad():  # keep every process bit-identical
            for p in module.parameters():
                torch.distributed.broadcast(p.data, src=0)
    return UnlearnRun(records, unlearner.summary())


class UnlearnRun(list):
    """The `StepRecord`s of one `fabric_unlearn` call (a plain list of them), with the method's `summary()`
    (`summary`) and `status` ("target_reached", "budget_exhausted" or "nothing_accepted")."""

    def __init__(self, records: Iterable[Any] = (), summary: Mapping[str, Any] | None = None) -> None:
        super().__init__(records)
        self.summary: dict[str, Any] = dict(summary or {})

    @property
    def status(self) -> str | None:
        return self.summary.get("status")


def _prepare(fabric: Fabric, batch: Any) -> dict[str, Tensor]:
    return move_data_to_device(dict(default_batch_transform(batch)), fabric.device)


def _full(source: Any, backend: str, module: nn.Module, fabric: Fabric, reduce: Reduce, gather: Reduce,
          curvature_kwargs: Mapping[str, Any]) -> Curvature:
    if isinstance(source, Curvature):
        return source
    if source is None:
        raise ValueError("curvature_data='full_minus_forget' needs full_curvature=<a curvature checkpoint of the"
                         " training data: Curvature, state_dict, curvature file or Lightning checkpoint>")
    from .methods import build_curvature

    state = (load_curvature_state(source, model=module, backend=backend) if isinstance(source, (str, Path))
             else dict(source))
    full = build_curvature(backend, module, reduce=reduce, gather=gather, **dict(curvature_kwargs))
    full.load_state_dict(move_data_to_device(state, fabric.device))
    return full
