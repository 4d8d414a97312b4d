"""How the processes of a deletion request meet: reductions, shares of the batches, agreement, broadcast, exit.

The engine sums statistics, gradients and losses through an injected `reduce` (and concatenates through `gather`);
this module makes them from a Lightning trainer (`strategy_reduce`, `strategy_gather`) or any `all_gather`
(`gather_with`), splits batch lists into each process's share (`share`, `shard`), and keeps the processes together
(`agree_on_batches`, `broadcast_parameters`, `leave_process_group`). Lightning is imported only by the functions that
take a trainer, so the engine's drivers without Lightning (the experiment, `serve_request`) need torch only.

Every process of a multi-process request runs the same collectives (all-reduces of statistics, losses, histograms).
When one process has no batch of some kind, raising on that process alone leaves the others waiting in a collective
until the connection drops ("Connection closed by peer"), which names nothing. `agree_on_batches` exchanges the batch
counts of every process in one all-reduce, so that every process raises the same clear error, also when the counts
differ (each process would keep a share of a different list, and some batches would never enter the request).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from .curvature.base import identity
from .errors import UserInputError

if TYPE_CHECKING:
    import lightning.pytorch as pl

Reduce = Callable[[Tensor], Tensor]
T = TypeVar("T")


def strategy_reduce(trainer: pl.Trainer) -> Reduce:
    """The engine's `reduce` for this trainer: a sum over processes through the strategy (identity on one)."""
    if trainer.world_size <= 1:
        return identity
    strategy = trainer.strategy

    def reduce(tensor: Tensor) -> Tensor:
        return strategy.reduce(tensor, reduce_op="sum")

    return reduce


def gather_with(all_gather: Callable[[Tensor], Tensor], world_size: int) -> Reduce:
    """The engine's `gather` (concatenate along dim 0 across processes) from an `all_gather` that stacks
    `[world, ...]`; rows may differ in number between processes (padded for the collective, then trimmed)."""
    if world_size <= 1:
        return identity

    def gather(tensor: Tensor) -> Tensor:
        sizes = all_gather(torch.tensor([tensor.shape[0]], device=tensor.device)).reshape(-1).tolist()
        longest = int(max(sizes))
        pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        stacked = all_gather(torch.cat([tensor, pad]).contiguous())
        return torch.cat([stacked[r, : int(n)] for r, n in enumerate(sizes)])

    return gather


def strategy_gather(trainer: pl.Trainer) -> Reduce:
    """The engine's `gather` for this trainer (identity on one process)."""
    return gather_with(trainer.strategy.all_gather, trainer.world_size)


def shard(batches: Iterable[Any], rank: int, world_size: int) -> Iterator[Any]:
    """This process's share of `batches` (every world_size-th, from `rank`): curvature sums are then reduced."""
    return itertools.islice(iter(batches), rank, None, world_size) if world_size > 1 else iter(batches)


def share(batches: list[T], rank: int, world_size: int) -> list[T]:
    """This process's share of a list of batches for the engine, whose sums and counts are reduced across
    processes: every world_size-th batch when each process gets one, else all of them (replicated statistics sum
    to the same means)."""
    return batches[rank::world_size] if world_size > 1 and len(batches) >= world_size else list(batches)


def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Copy process `src`'s parameters to every process (a no-op without an initialised process group).

    The engine takes the same decisions on every process (all its sums are reduced), so this only guards against
    rounding differences: after a request every process holds bit-identical weights (DDP then stays in sync)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    with torch.no_grad():
        for p in model.parameters():
            torch.distributed.broadcast(p.data, src=src)

#: a count of batches that was not given at all (e.g. no retain data), as opposed to given but empty (0)
NOT_GIVEN = -1


def examples_fingerprint(batches: Iterable[Any]) -> int:
    """A fingerprint of the examples of `batches` (dicts with `input_ids`, optionally `attention_mask` and
    `labels`), independent of their order and batching: the sum, modulo 2⁴⁸, of a hash of each example's attended
    token ids and labels. Exact in float64, so processes can compare it through a sum-reduce (`agree_on_batches`)."""
    import hashlib

    total = 0
    for batch in batches:
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            continue
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
        ids, mask = ids.detach().cpu(), mask.detach().cpu().bool() if isinstance(mask, Tensor) else None
        labels = labels.detach().cpu() if isinstance(labels, Tensor) else None
        for i in range(ids.shape[0]):
            keep = mask[i] if mask is not None else slice(None)
            digest = hashlib.blake2b(ids[i][keep].to(torch.int64).numpy().tobytes(), digest_size=6)
            if labels is not None:
                digest.update(labels[i][keep].to(torch.int64).numpy().tobytes())
            total = (total + int.from_bytes(digest.digest(), "little")) % FINGERPRINT_MODULUS
    return total


#: fingerprints are sums modulo 2⁴⁸: below float64's 2⁵³, so a sum-reduce of one non-zero row is exact
FINGERPRINT_MODULUS = 1 << 48


def agree_on_batches(reduce: Reduce, rank: int, world_size: int, who: str, required: tuple[str, ...] = ("forget",),
                     fingerprints: dict[str, int] | None = None, **counts: int | None) -> dict[str, list[int]]:
    """The batch counts of every process, by kind (`counts`: this process's, None when that data was not given).

    Raises the same `UserInputError` on every process when a process has no batch of a kind in `required`, or of a
    kind that other processes were given, or when the processes have different numbers of batches of a kind: each
    process keeps its share of a batch list (`share`), which only partitions the data when every process holds the
    same list; with different counts some batches would never enter the request, and the processes could run
    different numbers of collectives. With `fingerprints` (kind -> `examples_fingerprint` of this process's whole
    list), also when the processes got different examples of a kind (e.g. each a `DistributedSampler`'s shard of the
    forget set): each would keep its share of its own list, and part of the set would never be unlearned. `reduce`
    sums a tensor over processes (identity on one process).
    """
    names = list(counts)
    prints = list(fingerprints or {})
    table = torch.zeros(max(world_size, 1), len(names) + len(prints), dtype=torch.float64)
    table[rank] = torch.tensor([float(NOT_GIVEN if c is None else c) for c in counts.values()]
                               + [float(fingerprints[k]) for k in prints], dtype=torch.float64)  # type: ignore[index]
    if world_size > 1:
        table = reduce(table)  # each process fills its own row, the others are 0: the sum is every process's row
    per_kind = {name: [int(v) for v in table[:, j].tolist()] for j, name in enumerate(names)}
    for name, values in per_kind.items():
        given = [v for v in values if v != NOT_GIVEN]
        if not given and name not in required:
            continue
        empty = [r for r, v in enumerate(values) if v <= 0]
        if empty:
            where = (f"process {empty[0]}" if len(empty) == 1 else f"processes {empty}") + f" of {world_size}"
            if world_size <= 1:
                where = "this process"
            raise UserInputError(
                f"{who}: {where} got no {name} batch ({name} batches per process: "
                f"{['none' if v == NOT_GIVEN else v for v in values]}); every process needs at least one: use fewer "
                f"processes, a smaller batch size, or more {name} data")
        if len(set(values)) > 1:
            raise UserInputError(
                f"{who}: the processes got different numbers of {name} batches ({name} batches per process: "
                f"{values}), so some {name} batches would never enter the request; every process needs the same "
                f"number: pass the same {name} batches on every process (each keeps its share)")
    for j, name in enumerate(prints, len(names)):
        if len(set(table[:, j].tolist())) > 1:
            raise UserInputError(
                f"{who}: the processes got different {name} examples (the same number of batches, other examples), "
                f"so each would keep its share of its own list and part of the {name} set would never enter the "
                f"request; pass the whole {name} set, the same on every process (not a DistributedSampler's shard: "
                "the request shares it out itself)")
    return per_kind


def leave_process_group() -> None:
    """Wait for every process, let gloo's threads finish their last work, then destroy the default process group
    (when one is initialised).

    A process that exits while gloo's threads still run can abort ("terminate called without an active exception",
    SIGABRT) after its work is done; leaving the group together first makes the exit clean. The 0.2 s pause after the
    barrier is for users, not only for tests: every multi-process run ends here (the command and Lightning runs
    through `ProcessGroupTeardown`, Fabric and plain scripts by calling this), and any of them may free a DDP wrapper
    afterwards. A gloo worker thread releases its finished work (which may hold tensors owned by Python, e.g. the
    parameters of a broadcast) only when it gets the GIL; if the group's last reference is dropped while the main
    thread holds the GIL, its destructor joins that thread and both wait for ever (`~ProcessGroupGloo` joining a
    thread blocked in `decref`: a rare hang at exit). The pause lets the threads take the GIL first. Drop
    DDP-wrapped models before calling this when you can."""
    import gc
    import time

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        gc.collect()
        time.sleep(0.2)  # the worker threads take the GIL and release their finished work
        dist.destroy_process_group()
