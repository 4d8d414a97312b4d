"""The trials of one step search (what `StepSearch` calls, `docs/recipe.md` §3): the step η along a fixed direction
applied to the unlearner's weights from a snapshot and measured, the held retain batch's budget on its own, and the
guided search's guess of where the aim is crossed. The search only decides; these touch the weights, and the
`SecondOrderUnlearner` that made them applies the chosen η (or restores the snapshot) when the search ends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ..curvature.base import Vector
from .inputs import all_finite
from .records import Batch
from .step_search import Point
from .target import over_retain_budget, score_between
from .trust_region import LinearStep, largest_trusted_step, trusted_step_length


class StepTrials:
    """`trials(eta)`: the step η applied (θ₀ + offset + η d, `host._apply_step`) and measured: a forward pass over the
    forget set and the holdout (the forget score) and, unless `lazy`, the budget's batches; None when η lies outside
    the trust region (not even applied). `budget(eta)` -> (retain loss, within the budget) measures the budget's
    batches alone (`StepSearch`'s `budget` when `lazy`: `lazy_budget`); `guess(lo, hi)` predicts where the aim is
    crossed from the per-example losses measured at lo and hi (`losses`; `before`: those at η = 0, the snapshot's
    weights, no offset)."""

    def __init__(self, host: Any, snapshot: Mapping[str, Tensor], direction: Vector, offset: Vector | None,
                 forget: Sequence[Batch], held: Batch | list[Batch] | None, reference: float | None,
                 aim: float | None, predicted_budget: float | None, curvature_norm: float | None,
                 before: list[Tensor] | None = None, *, lazy: bool = False) -> None:
        self.host, self.snapshot, self.direction, self.offset = host, snapshot, direction, offset
        self.forget, self.held, self.reference, self.aim = forget, held, reference, aim
        self.predicted_budget, self.curvature_norm = predicted_budget, curvature_norm
        self.lazy = lazy
        self.fraction = host.budget_fraction()
        # each trial's length and overflow
        self.line = LinearStep(snapshot, direction, host.trust_free) if offset is None else None
        self.losses: dict[float, list[Tensor]] = {}  # η -> its per-example forget and holdout losses
        if before:
            self.losses[0.0] = before
        self._applied: float | None = None  # the η the weights hold now

    def apply(self, eta: float) -> None:
        """Set the weights to the step η (nothing when they hold it already)."""
        if self._applied != eta:
            self.host._apply_step(self.snapshot, self.direction, self.offset, eta)
            self._applied = eta

    def budget(self, eta: float) -> tuple[float | None, bool]:
        """(the held retain loss at η, whether it is finite and within this step's share of the budget)."""
        self.apply(eta)
        host = self.host
        retain = host.measure(self.held) if self.held is not None else None
        ok = retain is None or math.isfinite(retain)
        ok = ok and not (self.reference is not None and retain is not None
                         and over_retain_budget(retain, self.reference, host.max_retain_increase, self.fraction))
        return retain, ok

    def largest_trusted_step(self) -> float:
        """Where the search starts at most: the largest η inside the trust regions (`largest_trusted_step`), from the
        norms `line` already holds where it can."""
        host = self.host
        if self.line is None:
            return largest_trusted_step(host.named_params(), self.direction, host.max_step_norm,
                                        self.predicted_budget, self.curvature_norm, host.path_remaining(),
                                        host.trust_free)
        eta = trusted_step_length(self.line.reference, self.line.direction_norm, host.max_step_norm,
                                  self.predicted_budget, self.curvature_norm, host.path_remaining())
        return self.line.inside(eta, host.step_leaves_trust_region)

    def __call__(self, eta: float) -> Point | None:
        host, line = self.host, self.line
        if self.predicted_budget is not None and 0.5 * eta**2 * float(self.curvature_norm) > self.predicted_budget:
            return None  # outside the curvature's trust region: not even applied
        if line is not None and host.step_leaves_trust_region(line.length(eta), line.reference):
            return None  # the step would move the weights too far: not even applied
        self.apply(eta)
        if line is None and host.outside_trust_region(self.snapshot):
            return None  # moved the weights too far (an offset: known once applied): not measured
        self.losses[eta] = []
        score = host.measure_forget_score(self.forget, losses_out=self.losses[eta])  # new weights: nothing to reuse
        ok = all(map(math.isfinite, score)) and (
            (line is not None and line.surely_finite(eta)) or all_finite(host.named_params().values()))
        retain = None
        if ok and not self.lazy:
            retain, ok = self.budget(eta)
        return Point(score, retain, ok, ok and self.aim is not None and score[0] >= self.aim)

    def guess(self, lo: float, hi: float) -> float | None:
        """The η in (lo, hi) where the forget score, interpolated per example between lo and hi
        (`target.score_between`), first reaches the aim; None where it does not or a side was not measured."""
        a, b, aim = self.losses.get(lo), self.losses.get(hi), self.aim
        if aim is None or a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        if score_between(a, b, 1.0, self.host.reduce) < aim:
            return None  # the model does not reach the aim in the bracket
        low, high = 0.0, 1.0
        for _ in range(20):  # the smallest t whose predicted score reaches the aim
            t = 0.5 * (low + high)
            low, high = (low, t) if score_between(a, b, t, self.host.reduce) >= aim else (t, high)
        return lo + high * (hi - lo)
