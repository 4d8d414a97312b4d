"""One deletion request, the same way for every driver: `serve_request` (and its first half, `prepare_request`).

    result = serve_request(model, forget_batches, retain_batches, holdout_batches, settings=UnlearnSettings())
    result.status, result.summary, result.unlearner    # a list of the StepRecords, with the outcome

The `Unlearn` callback, `fabric_unlearn`, the demo and the experiments call `serve_request`; `UnlearningModule`,
whose steps Lightning drives, calls `prepare_request` at `on_train_start` and then the method's `step`. What a
request does, in order: every process agrees on its batch counts (one all-reduce, so a process without data raises
the same error everywhere instead of hanging in a collective), the weights are checked, the full curvature is
loaded for `full_minus_forget` (`load_full_curvature`: a file, a Lightning checkpoint, a state_dict or a
`Curvature`), the curvature is fitted on this process's share of its source (`request_curvature`), the method is
built from the settings (`make_unlearner`), each process keeps its share of the forget, retain and holdout batches
(the engine sums across processes), `fit` runs, and every process ends with process 0's parameters
(`broadcast_parameters`).

Torch only: a driver injects `reduce`/`gather` (its strategy's all-reduce / all-gather), its rank and world size,
and how a batch of its data becomes the project's dict of tensors on the model's device (`prepare`).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import load_curvature_state
from .curvature.base import Curvature, Reduce, identity
from .curvature.objective import IGNORE_INDEX
from .curvature.registry import build_curvature
from .distributed import agree_on_batches, broadcast_parameters, examples_fingerprint, share
from .errors import UserInputError
from .fsdp import full_parameters, is_sharded
from .methods import CURVATURE_DATA, StepRecord, Unlearner, build_unlearner
from .methods.first_order import DEFAULT_FIRST_ORDER_STEPS
from .methods.inputs import (
    check_curvature_model,
    check_finite_weights,
    check_gradients_allowed,
    check_materialised,
    check_sets,
)
from .methods.records import STATUSES
from .methods.target import held_out_retain
from .settings import FullCurvature, UnlearnSettings

Batch = Mapping[str, Tensor]
#: turns a batch of the user's data into the project's dict of tensors on the model's device
Prepare = Callable[[Any], dict[str, Tensor]]

#: `unlearn/status_code` of each status of a run (the method's `status`)
STATUS_CODES = {status: code for code, status in enumerate(STATUSES)}
#: the numbers of a `StepRecord` that drivers log
RECORD_FIELDS = ("damping", "scale", "forget_loss", "retain_loss", "accepted", "target", "evaluations",
                 "predicted_increase")


class RequestResult(list):
    """The `StepRecord`s of one request (a plain list of them), with the method's `summary()` (`summary`), its
    `status` ("target_reached", "budget_exhausted" or "nothing_accepted") and the `unlearner` that ran (its
    curvature, its history)."""

    def __init__(self, records: Iterable[StepRecord] = (), summary: Mapping[str, Any] | None = None,
                 unlearner: Unlearner | None = None) -> None:
        super().__init__(records)
        self.summary: dict[str, Any] = dict(summary or {})
        self.unlearner = unlearner

    @property
    def status(self) -> str | None:
        return self.summary.get("status")


# ---------------------------------------------------------------------------------------------- batches
def default_batch_transform(batch: Any) -> dict[str, Tensor]:
    """A training batch in the project's format (see docs/CONVENTIONS.md).

    Accepts a dict with `input_ids` (labels default to the inputs with padding masked to -100), a tensor of token
    ids, or a `(input_ids, labels)` pair. Anything else needs a `batch_transform`.
    """
    if isinstance(batch, Mapping) and "input_ids" in batch:
        out = {k: v for k, v in batch.items() if isinstance(v, Tensor)}
        if "labels" not in out:
            labels = out["input_ids"].clone()
            if "attention_mask" in out:
                labels[out["attention_mask"] == 0] = IGNORE_INDEX
            out["labels"] = labels
        return _long_labels(out)
    if isinstance(batch, Tensor) and not batch.is_floating_point():
        return _long_labels({"input_ids": batch, "labels": batch})
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
        return _long_labels({"input_ids": batch[0], "labels": batch[1]})
    raise TypeError(
        f"cannot read a training batch of type {type(batch).__name__} as token ids; give a dict with 'input_ids'"
        " (and optionally 'labels', 'attention_mask'), a LongTensor of ids, an (input_ids, labels) pair, or pass"
        " batch_transform=fn returning such a dict"
    )


def _long_labels(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Integer labels of another width (int32 from numpy or a tokenizer) as torch.long, what the loss takes;
    float or bool labels are left for `check_batches` to refuse by name."""
    labels = batch.get("labels")
    if isinstance(labels, Tensor) and labels.dtype != torch.long and not labels.is_floating_point() \
            and labels.dtype != torch.bool and not labels.is_complex():
        batch["labels"] = labels.long()
    return batch


def to_device(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor inside (dicts, lists, tuples) moved to `device`."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def batch_preparer(model: nn.Module, transform: Callable[[Any], Mapping[str, Tensor]] | None = None) -> Prepare:
    """`transform` (default: `default_batch_transform`), then to the model's device."""
    device, transform = model_device(model), transform or default_batch_transform

    def prepare(batch: Any) -> dict[str, Tensor]:
        return to_device(dict(transform(batch)), device)

    return prepare


# ---------------------------------------------------------------------------------------------- curvature
def snapshot(curvature: Curvature) -> Curvature:
    """A copy of a curvature object's statistics that shares the model (finalize or subtract it freely)."""
    model = curvature.model
    memo: dict[int, Any] = {id(m): m for m in model.modules()}
    memo.update({id(p): p for p in model.parameters()})
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(curvature, memo)


def load_full_curvature(
    source: FullCurvature,
    model: nn.Module,
    backend: str,
    *,
    reduce: Reduce = identity,
    gather: Reduce = identity,
    curvature_kwargs: Mapping[str, Any] | None = None,
    who: str = "serve_request",
) -> Curvature:
    """The finalized curvature checkpoint of the training data for `full_minus_forget`, on the model's device.

    `source`: a `Curvature` (returned as it is), a curvature file or a Lightning checkpoint (read and checked by
    `lightning_unlearn.checkpoint.load_curvature_state`: never unpickled, refused for another backend or model), or
    a curvature `state_dict`. The loaded object reduces through `reduce`/`gather`."""
    if isinstance(source, Curvature):
        check_curvature_model(source, model, f"{who}: full_curvature")
        return source
    if source is None:
        raise UserInputError(
            f"{who}: curvature_data='full_minus_forget' needs full_curvature=<a curvature checkpoint of the training"
            " data: a curvature file or Lightning checkpoint written by CurvatureCallback/Unlearn, a Curvature or its"
            " state_dict>")
    if isinstance(source, (str, Path)):
        state = load_curvature_state(source, model=model, backend=backend)
    elif isinstance(source, Mapping):
        state = dict(source)
    else:
        raise UserInputError(f"{who}: full_curvature must be a file, a Curvature or a state_dict, got "
                             f"{type(source).__name__}")
    full = build_curvature(backend, model, reduce=reduce, gather=gather, **dict(curvature_kwargs or {}))
    full.load_state_dict(to_device(state, model_device(model)))
    return full


def request_curvature(
    model: nn.Module,
    backend: str,
    curvature_data: str,
    source: Sequence[Batch],
    *,
    full: Curvature | None = None,
    reduce: Reduce = identity,
    gather: Reduce = identity,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
    curvature_kwargs: Mapping[str, Any] | None = None,
) -> Curvature:
    """The finalized curvature for one deletion request, from this process's share of `source` (the retain
    batches for `retain`, the forget batches otherwise; at most `limit`); for `full_minus_forget`, a copy of the
    checkpoint `full` minus the forget curvature (the checkpoint is left as it was). Statistics are summed
    across processes by `reduce`."""
    if curvature_data not in CURVATURE_DATA:
        raise UserInputError(f"curvature_data must be one of {CURVATURE_DATA}, got {curvature_data!r}")
    if curvature_data == "full_minus_forget" and (full is None or not full.finalized):
        raise UserInputError("curvature_data='full_minus_forget' needs a finalized curvature checkpoint of the "
                             "training data (full_curvature=<file, Lightning checkpoint or Curvature>)")
    if not source:
        raise UserInputError(f"curvature_data={curvature_data!r} needs "
                             f"{'retain' if curvature_data == 'retain' else 'forget'} batches to fit the curvature on")
    batches = list(source[:limit] if limit else source)
    curvature = build_curvature(backend, model, reduce=reduce, gather=gather, **dict(curvature_kwargs or {}))
    fitted = curvature.fit(share(batches, rank, world_size))
    if curvature_data == "full_minus_forget":
        assert full is not None
        return snapshot(full).subtract(fitted)
    return fitted


# ---------------------------------------------------------------------------------------------- the method
def make_unlearner(
    settings: UnlearnSettings,
    model: nn.Module,
    *,
    curvature: Curvature | None = None,
    full_curvature: Curvature | None = None,
    reduce: Reduce = identity,
    gather: Reduce = identity,
    **request: Any,
) -> Unlearner:
    """The method of `settings` for `model` with a driver's reductions (`UnlearnSettings.kwargs`): curvature
    arguments only for second-order methods, each knob only when set (None: the method's default recipe)."""
    return build_unlearner(settings.method, model, **settings.kwargs(
        curvature=curvature, full_curvature=full_curvature, reduce=reduce, gather=gather, **request))


def sharded_backend_kwargs(settings: UnlearnSettings, model: nn.Module, world_size: int) -> dict[str, Any]:
    """The backend's arguments for this request: `settings.backend_kwargs()`, plus `shard_factors=True` for K-FAC on
    an FSDP2-sharded model across several processes (each keeps 1/N of the factors) unless set explicitly."""
    kwargs = dict(settings.backend_kwargs())
    if settings.curvature == "kfac" and world_size > 1 and is_sharded(model):
        kwargs.setdefault("shard_factors", True)
    return kwargs


def prepare_request(
    model: nn.Module,
    *,
    settings: UnlearnSettings,
    curvature_source: Sequence[Batch] | None = None,
    full_curvature: FullCurvature = None,
    reduce: Reduce = identity,
    gather: Reduce = identity,
    rank: int = 0,
    world_size: int = 1,
    batch_counts: Mapping[str, int | None] | None = None,
    fingerprints: dict[str, int] | None = None,
    required: tuple[str, ...] = ("forget",),
    log: Callable[[StepRecord], None] | None = None,
    who: str = "serve_request",
    **request: Any,
) -> Unlearner:
    """Everything before a request's first step; returns the method, its curvature fitted.

    The processes agree on `batch_counts` (this process's count of each kind of batch, None: not given; the kinds
    in `required` must have batches on every process) and on `fingerprints` (kind -> `examples_fingerprint` of this
    process's batches: every process must hold the same examples), the weights are checked for NaN/inf, and for
    second-order methods the curvature is fitted on this process's share of `curvature_source` (at most
    `settings.curvature_batches`; `full_minus_forget` subtracts it from `full_curvature`, default
    `settings.full_curvature`). `request` goes to the method's constructor last (e.g. the module's `steps`)."""
    check_gradients_allowed(who)
    if batch_counts:
        agree_on_batches(reduce, rank, world_size, who, required, fingerprints, **batch_counts)
    check_finite_weights(model)  # a broken model fails here, not as rollbacks after the curvature pass
    curvature = full = None
    if settings.second_order:
        data = settings.curvature_data
        backend_kwargs = sharded_backend_kwargs(settings, model, world_size)
        if data == "retain" and not curvature_source:
            raise UserInputError(f"{who}: curvature_data='retain' needs retain=<batches>; without retain data use "
                                 "curvature_data='full_minus_forget' with a curvature checkpoint, or 'forget'")
        if data == "full_minus_forget":
            full = load_full_curvature(settings.full_curvature if full_curvature is None else full_curvature, model,
                                       settings.curvature, reduce=reduce, gather=gather,
                                       curvature_kwargs=backend_kwargs, who=who)
        curvature = request_curvature(model, settings.curvature, data, list(curvature_source or []), full=full,
                                      reduce=reduce, gather=gather, rank=rank, world_size=world_size,
                                      limit=settings.curvature_batches, curvature_kwargs=backend_kwargs)
    if log is not None:
        request["log"] = log
    return make_unlearner(settings, model, curvature=curvature, full_curvature=full, reduce=reduce, gather=gather,
                          **request)


def serve_request(
    model: nn.Module,
    forget: Iterable[Any],
    retain: Iterable[Any] | None = None,
    holdout: Iterable[Any] | None = None,
    *,
    settings: UnlearnSettings | None = None,
    held_retain: Any | None = None,
    full_curvature: FullCurvature = None,
    reduce: Reduce = identity,
    gather: Reduce = identity,
    rank: int = 0,
    world_size: int = 1,
    log: Callable[[StepRecord], None] | None = None,
    prepare: Prepare | None = None,
    who: str = "serve_request",
) -> RequestResult:
    """Unlearn `forget` from `model` in place: the whole request (see the module docstring); returns its records
    with the status, the summary and the method.

    `retain`: retain batches (the curvature for `curvature_data="retain"`, the retain term of some methods, and the
    held batch of the retain budget unless `held_retain` is given), read no further than `retain_read_limit`: a whole
    training set's loader may be passed. `holdout`: never-trained batches of the forget
    set's kind, the target (at most `settings.holdout_batches`; 0: none). `full_curvature` (for
    `full_minus_forget`) overrides `settings.full_curvature`. Every process passes the same data and keeps its share
    (the processes agree on their batch counts first: different counts raise the same error on every process);
    `reduce`/`gather` sum/concatenate across processes.
    `prepare` turns a batch into the project's dict on the model's device (default: `batch_preparer(model)`)."""
    if isinstance(settings, Mapping):
        settings = UnlearnSettings.from_kwargs(**settings)
    elif settings is None:
        settings = UnlearnSettings()
    elif not isinstance(settings, UnlearnSettings):
        raise UserInputError(f"{who}: settings must be an UnlearnSettings (or a dict of its fields), got "
                             f"{type(settings).__name__}")
    with full_parameters(model):  # FSDP2: the engine works on the gathered parameters, written back at the end
        return _serve(model, forget, retain, holdout, settings=settings, held_retain=held_retain,
                      full_curvature=full_curvature, reduce=reduce, gather=gather, rank=rank, world_size=world_size,
                      log=log, prepare=prepare, who=who)


def _serve(model: nn.Module, forget: Iterable[Any], retain: Iterable[Any] | None, holdout: Iterable[Any] | None, *,
           settings: UnlearnSettings, held_retain: Any | None, full_curvature: FullCurvature, reduce: Reduce,
           gather: Reduce, rank: int, world_size: int, log: Callable[[StepRecord], None] | None,
           prepare: Prepare | None, who: str) -> RequestResult:
    check_materialised(model)  # before the batches are moved to the model's device
    prepare = prepare or batch_preparer(model)
    forget, retain, holdout = (_as_iterable(x) for x in (forget, retain, holdout))
    forget_batches = [prepare(b) for b in forget]
    limit = retain_read_limit(settings, world_size)
    retain_batches = [prepare(b) for b in itertools.islice(retain, limit)] if retain is not None else None
    if not retain_batches and world_size == 1:
        retain_batches = None  # [] is no retain data (the distributed check is for processes left without a share)
    retain_count = None if retain_batches is None else len(retain_batches)  # as given, before a batch is held out
    held = prepare(held_retain) if held_retain is not None else None
    if held is None and retain_batches:
        retain_batches, held = held_out_retain(retain_batches)
    holdout_list = None  # the holdout batches (`settings.holdout_batches` is how many at most)
    if holdout is not None and settings.holdout_batches != 0:
        holdout_list = [prepare(b) for b in itertools.islice(holdout, settings.holdout_batches)]
    # bad batches fail here by name, not inside the curvature fit (every process holds all the data)
    check_sets(model, {"forget": forget_batches, "retain": retain_batches or [],
                    "held retain": [held] if held is not None else [], "holdout": holdout_list or []})
    counts = {"forget": len(forget_batches), "retain": retain_count,
              "holdout": None if holdout_list is None else len(holdout_list)}
    # every process must hold the whole forget set and holdout (each keeps its share): a shard per process would
    # leave part of the forget set out of the request without a word
    prints = None if world_size <= 1 else {"forget": examples_fingerprint(forget_batches),
                                           "holdout": examples_fingerprint(holdout_list or [])}
    source = retain_batches if settings.curvature_data == "retain" else forget_batches
    unlearner = prepare_request(model, settings=settings, curvature_source=source, full_curvature=full_curvature,
                                reduce=reduce, gather=gather, rank=rank, world_size=world_size, batch_counts=counts,
                                fingerprints=prints, log=log, who=who)
    # every process keeps its share of forget, retain and holdout: the engine sums losses across processes
    records = unlearner.fit(share(forget_batches, rank, world_size),
                            share(retain_batches, rank, world_size) if retain_batches else None, held_retain_batch=held,
                            holdout_batches=share(holdout_list, rank, world_size) if holdout_list else None)
    if world_size > 1:
        broadcast_parameters(model)
    return RequestResult(records, unlearner.summary(), unlearner)


def retain_read_limit(settings: UnlearnSettings, world_size: int) -> int | None:
    """How many retain batches a request reads at most (None: all, with `curvature_batches=None`): each process's
    curvature batches (`curvature_batches`), or one per step where a method takes more steps than that (the steps
    cycle through the retain batches: `settings.steps`, else a first-order method's default of
    `DEFAULT_FIRST_ORDER_STEPS`), plus the held batch of the budget, times the processes. A whole training set's
    loader passed as `retain` is then read as far as the request uses it, not to its end."""
    if settings.curvature_batches is None:
        return None
    steps = settings.steps if settings.steps is not None else (0 if settings.second_order
                                                               else DEFAULT_FIRST_ORDER_STEPS)
    return world_size * (max(settings.curvature_batches, steps) + 1)


def _as_iterable(batches: Any) -> Any:
    """One batch (a dict) given where batches go, as a list of it; anything else as given."""
    return [batches] if isinstance(batches, Mapping) else batches


# ---------------------------------------------------------------------------------------------- logging
def record_numbers(record: Any) -> dict[str, float]:
    """The finite numbers of a `StepRecord` that drivers log (`RECORD_FIELDS`; never text)."""
    out = {}
    for name in RECORD_FIELDS:
        value = getattr(record, name, None)
        if value is None:
            continue
        value = float(value)
        if math.isfinite(value):
            out[name] = value
    return out


def summary_numbers(summary: Mapping[str, Any]) -> dict[str, float]:
    """The loggable numbers of a method's `summary()`: `status_code` (see `STATUS_CODES`) and `target` (when
    there is one)."""
    out: dict[str, float] = {}
    status = summary.get("status")
    if status in STATUS_CODES:
        out["status_code"] = float(STATUS_CODES[status])
    target = summary.get("target")
    if target is not None and math.isfinite(float(target)):
        out["target"] = float(target)
    return out
