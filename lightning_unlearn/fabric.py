"""The unlearning engine driven from Lightning Fabric: `fabric.all_reduce(t, reduce_op="sum")` as the reduce.

    fabric = Fabric(accelerator="cuda", devices=4, strategy="ddp"); fabric.launch()
    model = fabric.setup(model)   # or the plain module
    records = fabric_unlearn(fabric, model, forget_loader, retain_loader, holdout=holdout_loader)
    records.status, records.summary   # "target_reached" | ...; the method's summary() (numbers only)

Every process passes the same loaders: each keeps its share of every batch list and the engine sums statistics,
gradients and losses across processes, so all processes take the same update (different batch counts across
processes raise the same error on every process). The request is `lightning_unlearn.request.serve_request`, the same
as every other driver's; the settings and their defaults are `lightning_unlearn.settings.UnlearnSettings`'s.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightning.fabric import Fabric
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from .curvature import Curvature, Reduce, identity
from .distributed import gather_with
from .request import RequestResult, default_batch_transform, request_curvature, serve_request
from .settings import KNOBS, UnlearnSettings, takes_settings
from .strategies import check_strategy


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
    backend: str = UnlearnSettings.curvature,
    *,
    max_batches: int | None = None,
    **curvature_kwargs: Any,
) -> Curvature:
    """A finalized curvature of `batches` (this process's share), summed across processes: e.g. a curvature
    checkpoint of the training data for later `full_minus_forget` requests (all batches by default: a checkpoint
    of the whole training data, unlike a request's `curvature_batches`)."""
    check_strategy(fabric.strategy, "fabric_curvature")
    module = unwrap(model)
    prepared = [_prepare(fabric, b) for b in batches]
    return request_curvature(module, backend, "retain", prepared, reduce=fabric_reduce(fabric),
                             gather=fabric_gather(fabric), rank=fabric.global_rank, world_size=fabric.world_size,
                             limit=max_batches, curvature_kwargs=curvature_kwargs)


@takes_settings(keep_var_keyword=True)
def fabric_unlearn(
    fabric: Fabric,
    model: nn.Module,
    forget_loader: Iterable[Any],
    retain_loader: Iterable[Any] | None = None,
    *,
    held_retain_batch: Any | None = None,
    holdout: Iterable[Any] | None = None,
    settings: UnlearnSettings | None = None,
    **more_method_kwargs: Any,
) -> RequestResult:
    """Unlearn `forget_loader` from `model` (plain or `fabric.setup` module) on every process with
    `serve_request`; returns the `StepRecord`s (identical on every process) as a `RequestResult` list that also
    carries the method's `status` and `summary()`. The settings are `settings` (default: `UnlearnSettings`'s
    defaults) changed by the knobs given as keywords; other keywords are further `method_kwargs`. `full_curvature`
    (for `full_minus_forget`) is a finalized `Curvature`, its `state_dict`, or a curvature file / Lightning
    checkpoint; `damping`, `scale` and `steps` go to the method only when set (None: its default recipe).
    `holdout`: never-trained batches of the forget set's kind, the level the run aims at (each process keeps its
    share, like the forget batches)."""
    check_strategy(fabric.strategy, "fabric_unlearn")
    knobs = {k: v for k, v in more_method_kwargs.items() if k in KNOBS}
    extra = {k: v for k, v in more_method_kwargs.items() if k not in KNOBS}
    if extra:
        method_kwargs = {**(knobs.get("method_kwargs") or (settings.method_kwargs if settings else {})), **extra}
        knobs["method_kwargs"] = method_kwargs
    settings = UnlearnSettings.from_kwargs(settings, **knobs)
    return serve_request(unwrap(model), forget_loader, retain_loader, holdout, settings=settings,
                         held_retain=held_retain_batch, reduce=fabric_reduce(fabric), gather=fabric_gather(fabric),
                         rank=fabric.global_rank, world_size=fabric.world_size,
                         prepare=lambda batch: _prepare(fabric, batch), who="fabric_unlearn")


def _prepare(fabric: Fabric, batch: Any) -> dict[str, Tensor]:
    return move_data_to_device(dict(default_batch_transform(batch)), fabric.device)
