"""The last forget score, kept while nothing it depends on has changed.

A run measures the forget score at the same weights more than once: `begin` measures it, the first step starts by
measuring it again, every later step starts where the previous step's search measured the accepted step length, and
`finish` measures the last step's weights once more. The search's measurement is remembered when the accepted step
is applied again (`remember`: the same `_apply_step` of the same step length gives the same weights bit for bit).
Each measurement is a forward pass over the forget set and the holdout (on the TOFU-faithful benchmark about a fifth
of a request's forget scores). So the score is kept with a key of everything it reads: the identity and version
counter of every parameter of the model (an in-place write such as `copy_` bumps it) and of every tensor of the
forget and holdout batches, and the target's holdout histogram; the memo holds references to them, so that no new
tensor can take a remembered one's identity. Across processes a hit counts only when every process has one (one all-
reduce of a flag): a process that measured alone would wait forever in the others' collectives. A write through
`param.data` bypasses the version counter: change weights in place (`copy_` under `no_grad`), as the engine does, or
call `clear()`. `Unlearner.finish` clears the memo, so that it keeps no forget batch alive after a run.

The held retain loss of the budget has the same story in small: a step search measures it at the step length it takes,
and `finish` measures the same weights on the same batch again (one held-batch pass of about six per run on the
canaries). `held_loss` and `remember_held` keep that one value under the same kind of key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .records import Batch, as_batches


def _tensor_ids(batches: Iterable[Batch]) -> tuple[tuple[int, int], ...]:
    return tuple((id(v), v._version) for b in batches for v in b.values() if isinstance(v, Tensor))


def score_key(model: nn.Module, forget: Sequence[Batch], holdout: Sequence[Batch], *extra: Any) -> tuple:
    """What a forget score depends on: parameters, forget and holdout tensors (identity, version), and `extra`."""
    params = tuple((id(p), p._version) for p in model.parameters())
    return params, _tensor_ids(forget), _tensor_ids(holdout), tuple(id(x) for x in extra)


class _Remembered:
    """One value under its key, agreed across processes, with the objects the key identifies kept alive (so that no new
    tensor can take a remembered one's identity)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: Any = None
        self.held: tuple = ()

    def found(self, key: tuple, reduce: Callable[[Tensor], Tensor]) -> Any:
        """The value when `key` matches on every process (`reduce` sums a miss flag), else None."""
        miss = 0.0 if (self.key is not None and self.key == key) else 1.0
        return None if float(reduce(torch.tensor([miss], dtype=torch.float64))[0]) > 0 else self.value

    def put(self, key: tuple, value: Any, held: tuple) -> None:
        self.key, self.value, self.held = key, value, held


class ScoreMemo:
    """The last forget score `(value, per-example losses)` and the last held retain loss, each under its key."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._score = _Remembered()
        self._held = _Remembered()

    def get(self, key: tuple, reduce: Callable[[Tensor], Tensor]) -> tuple[tuple[float, float], list[Tensor]] | None:
        """The remembered value and losses when `key` matches on every process."""
        hit = self._score.found(key, reduce)
        return None if hit is None else (hit[0], list(hit[1]))

    def score(self, unlearner: Any, forget: list[Batch], losses_out: list[Tensor] | None) -> tuple[float, float]:
        """`unlearner.measure_forget_score(forget, losses_out)`, remembered (see the module docstring)."""
        hit = self.get(score_key(unlearner.model, forget, unlearner.holdout, unlearner._holdout_hist),
                       unlearner.reduce)
        if hit is None:
            losses: list[Tensor] = []
            hit = unlearner.measure_forget_score(forget, losses), losses
            self.remember(unlearner, forget, *hit)
        if losses_out is not None:
            losses_out.extend(hit[1])
        return hit[0]

    def remember(self, unlearner: Any, forget: list[Batch], value: tuple[float, float],
                 losses: list[Tensor] | None) -> None:
        """Remember `value` and `losses`, measured at the weights the model holds now (just now, or earlier at the
        same step length applied again by a step search), under their `score_key`. Nothing without `losses`."""
        if losses is not None:
            held = (forget, unlearner.holdout, unlearner._holdout_hist)
            self._score.put(score_key(unlearner.model, *held), (value, list(losses)), held)

    def held_loss(self, unlearner: Any, batches: Batch | Sequence[Batch]) -> float:
        """`unlearner.measure(batches)`, or the value `remember_held` kept for these weights and batches."""
        batches = as_batches(batches)
        value = self._held.found(score_key(unlearner.model, batches, ()), unlearner.reduce)
        if value is None:
            value = unlearner.measure(batches)
            self.remember_held(unlearner, batches, value)
        return value

    def remember_held(self, unlearner: Any, batches: Batch | Sequence[Batch], value: float | None) -> None:
        """Remember the held retain loss `value` measured at the weights the model holds now (nothing for None)."""
        if value is not None:
            batches = as_batches(batches)
            self._held.put(score_key(unlearner.model, batches, ()), float(value), tuple(batches))
