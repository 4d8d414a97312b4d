"""Agreement between processes before the first collective of a deletion request.

Every process of a multi-process request runs the same collectives (all-reduces of statistics, losses, histograms).
When one process has no batch of some kind, raising on that process alone leaves the others waiting in a collective
until the connection drops ("Connection closed by peer"), which names nothing. `agree_on_batches` exchanges the batch
counts of every process in one all-reduce, so that every process raises the same clear error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .errors import UserInputError

Reduce = Callable[[Tensor], Tensor]

#: a count of batches that was not given at all (e.g. no retain data), as opposed to given but empty (0)
NOT_GIVEN = -1


def agree_on_batches(reduce: Reduce, rank: int, world_size: int, who: str, required: tuple[str, ...] = ("forget",),
                     **counts: int | None) -> dict[str, list[int]]:
    """The batch counts of every process, by kind (`counts`: this process's, None when that data was not given).

    Raises the same `UserInputError` on every process when a process has no batch of a kind in `required`, or of a
    kind that other processes were given. `reduce` sums a tensor over processes (identity on one process).
    """
    names = list(counts)
    table = torch.zeros(max(world_size, 1), len(names), dtype=torch.float64)
    table[rank] = torch.tensor([float(NOT_GIVEN if c is None else c) for c in counts.values()], dtype=torch.float64)
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
    return per_kind


def leave_process_group() -> None:
    """Wait for every process, then destroy the default process group (when one is initialised).

    A process that exits while gloo's threads still run can abort ("terminate called without an active exception",
    SIGABRT) after its work is done; leaving the group together first makes the exit clean."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
