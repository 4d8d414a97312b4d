"""Resumable curvature statistics of `CurvatureCallback`: the unfinished sums a Lightning checkpoint keeps beside
the finalized copy, so that a run resumed with `ckpt_path` continues them and ends with the curvature of an
uninterrupted run (which backend attributes they are, their CPU copies, every process's share)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from ..curvature import Curvature

_ACCUMULATOR_NAMES: dict[type, tuple[str, ...]] = {}


def accumulator_names(curvature: Curvature) -> tuple[str, ...]:
    """The attributes the backend's `_reset()` binds: by the `Curvature` contract, the statistics `accumulate` adds
    to (sums, counts, rows, stored batches) and their finalized forms. Read off a recording copy, so every backend
    (and any added later) keeps its resumable state without a list to maintain here."""
    kind = type(curvature)
    if kind not in _ACCUMULATOR_NAMES:
        names: list[str] = []

        class _Recorder(kind):  # type: ignore[valid-type, misc]
            def __setattr__(self, name: str, value: Any) -> None:
                names.append(name)
                object.__setattr__(self, name, value)

        probe = object.__new__(_Recorder)
        probe.__dict__.update(vars(curvature))  # shallow: `_reset` rebinds, so the original is not touched
        probe._reset()
        _ACCUMULATOR_NAMES[kind] = tuple(dict.fromkeys(names))
    return _ACCUMULATOR_NAMES[kind]


def portable(obj: Any, on_device: list[bool]) -> Any:
    """`obj` with every tensor copied to the CPU (checkpoint-safe, later in-place additions do not reach it);
    `on_device` records, in traversal order, which tensors were not on the CPU."""
    if isinstance(obj, Tensor):
        on_device.append(obj.device.type != "cpu")
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: portable(v, on_device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [portable(v, on_device) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def placed(obj: Any, on_device: Iterator[bool], device: torch.device) -> Any:
    """The inverse of `portable`: each tensor back on `device` or the CPU, where it was when saved."""
    if isinstance(obj, Tensor):
        return obj.to(device) if next(on_device, False) else obj
    if isinstance(obj, Mapping):
        return {k: placed(v, on_device, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [placed(v, on_device, device) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def all_gather_objects(obj: Any) -> list[Any]:
    """`obj` of every process, by rank (a collective when a process group runs; `[obj]` otherwise)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]
