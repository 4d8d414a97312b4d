"""The step-length search along a fixed direction (`docs/recipe.md`: the step length).

`StepSearch(evaluate, forget_before).run(start, iters)` brackets (×4 / ÷4 from `start`) and then bisects in log
space for the *smallest* η that reaches the aim within the retain budget, or else the η within the budget that raises
the forget score most. `evaluate(eta)` applies the step η and measures it (one forward pass over the forget set and
the held retain batch: no gradient, no curvature); it returns a `Point`, or None for a step length outside the trust
region (not measured). The search only decides: its caller owns the weights.

With `budget` (`StepSearch(evaluate, forget_before, budget)`), `evaluate` measures the forget score only and
`budget(eta)` the held retain batch, on demand: the search first runs as if every step length short of the aim
were within the budget (the held retain loss rises with η) and measures the budget at the η it would take; only when
that η is out of the budget does it look below it for the largest η within the budget, bracketing and bisecting on the
held retain batch alone and measuring the forget score once, at the η it takes (below the aim the forget score rises
with η). Where the first assumption holds the same η is taken for one held-batch pass instead of one per point; where
the budget binds, a bisection costs a held-batch pass per point instead of a forget score and a held-batch pass.
Where no point reaches the aim, the point that raised the forget score most gets its budget measured, and only if it
is out of the budget is the largest η below it within the budget looked for the same way; where no point raised it,
the shortest point's budget decides (`_best_within_budget`), not a second search with a held-batch pass per point.

With `guess` (`guess(lo, hi)`: the η in (lo, hi) where a model of the measured points predicts the aim is first
reached, or None), the bisection measures next to the predicted crossing instead of at the geometric mean, just above
it or just below it (the side farther from it), and stops once `hi / lo` is as small as `iters` bisections would
make it: where the prediction is good, two points close the bracket that six bisections would. When the first point
already reaches the aim, `guess(0.0, hi)` (η = 0: the weights before the step, which fall short of it) places the
first point below it, instead of `hi` / 4.

With `good_enough` (`good_enough(point)`: whether a point that reaches the aim is close enough to it), the search stops
at the first such point instead of closing the bracket below it: a staged step's aim is a waypoint, not the target,
and closing the bracket on it buys a precision nothing uses (`SecondOrderUnlearner`, with a staged budget: within half
a stage of it; `docs/recipe.md` §4).

With `stall` (a ratio r, off by default: `Newton(stall_ratio=r)` for its waypoint steps), the bracket stops growing
where the score stops paying for the length: when a ×4 longer step adds less than r times what the step had gained
up to the point before it, that point is taken (its budget checked) instead of searching on for the aim along a
direction that has gone flat. Measured on perturbed starts of the demo (`benchmarks/perturbation.py`,
`docs/recipe.md` §4), not the default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple


class Point(NamedTuple):
    """One step length's measurement: (forget score, forget loss) (scores compare first, the loss breaks ties: a
    score stuck at 0 still shows progress), the retain loss, whether it is within the budget (finite too), whether
    it reaches the aim."""

    forget: tuple[float, float]
    retain: float | None
    ok: bool
    reached: bool


#: a step length that was not measured (outside the trust region) or not reached
NOT_MEASURED = Point((math.nan, math.nan), None, False, False)


class _CloseEnough(Exception):
    """A measured point that `good_enough` accepts: the search ends there (raised by `StepSearch._measure`)."""


class StepSearch:
    """Step lengths η along one direction, each measured once (see the module docstring)."""

    growth = 4.0
    max_bracket = 12

    def __init__(self, evaluate: Callable[[float], Point | None], forget_before: tuple[float, float],
                 budget: Callable[[float], tuple[float | None, bool]] | None = None,
                 guess: Callable[[float, float], float | None] | None = None,
                 good_enough: Callable[[Point], bool] | None = None, stall: float | None = None) -> None:
        self._evaluate = evaluate
        self._good_enough = good_enough
        self._stall = stall
        self._budget = budget
        self._guess = guess
        self.forget_before = forget_before
        self.evaluations = 0  # step lengths measured (forget score)
        self.budget_checks = 0  # held retain measurements made on demand (`budget`)
        self.points: dict[float, Point] = {}
        self.refused: set[float] = set()  # step lengths outside the trust region
        self.unchecked: set[float] = set()  # measured without the budget (`budget`): `ok` means finite only
        self.stalled_at: float | None = None  # where the bracket stopped growing (`stall`)

    def evaluate(self, eta: float, checked: bool = True) -> Point:
        """The point at η (cached); `checked=False` leaves the budget unmeasured (with `budget`)."""
        if eta not in self.points:
            self.evaluations += 1
            point = self._evaluate(eta)
            if point is None:
                point = NOT_MEASURED
                self.refused.add(eta)
            elif self._budget is not None:
                self.unchecked.add(eta)
            self.points[eta] = point
        if checked and eta in self.unchecked:
            self.unchecked.discard(eta)
            point = self.points[eta]
            if point.ok:
                self.budget_checks += 1
                retain, ok = self._budget(eta)  # type: ignore[misc]
                self.points[eta] = Point(point.forget, retain, ok, ok and point.reached)
        return self.points[eta]

    def run(self, start: float, iters: int) -> tuple[float | None, tuple[tuple[float, float], float | None], str]:
        """(the chosen η or None, its ((forget score, forget loss), retain loss), reason): "target_reached",
        "retain_budget" (the largest step within the budget, which it spends) or "accepted" with an η; else why
        none was taken ("trust_region", "non_finite", "retain_increase" or "no_progress")."""
        if self._budget is not None:
            eta, _, _ = self._search(start, iters, checked=False)
            if eta is not None and eta == self.stalled_at:  # the point before a flat stretch: its budget, once
                point = self.evaluate(eta)
                if point.ok:
                    return eta, (point.forget, point.retain), "accepted"
            reached = sorted(e for e, p in self.points.items() if p.reached)
            if reached and self.evaluate(reached[0]).reached:
                return self._choose()
            found = (self._largest_within_budget(reached[0], iters) if reached
                     else self._best_within_budget(iters))
            if found is not None:
                return found
        return self._search(start, iters, checked=True)

    def _best_within_budget(self, iters: int
                            ) -> tuple[float | None, tuple[tuple[float, float], float | None], str] | None:
        """With `budget`, when no measured point reaches the aim: the point that raises the forget score most, its
        budget measured once; out of the budget, the largest η below it within the budget (`_largest_within_budget`:
        up to the best point the forget score rises with η). Where no point raises the score, "no_progress" once the
        shortest point is within the budget. None (the caller searches again measuring every point) otherwise: the
        shortest point out of the budget, or no η found within the budget raising the score."""
        measured = [e for e, p in self.points.items() if p.ok]
        if not measured:
            return None
        best = max(measured, key=lambda e: self.points[e].forget)
        if not self.points[best].forget > self.forget_before:
            # no point raises the score: within the budget at the shortest point, a search measuring every point
            # would only move up from it, where none did (measured: the same outcomes, `docs/recipe.md` §3)
            smallest = self.evaluate(min(measured))
            return (None, (smallest.forget, smallest.retain), "no_progress") if smallest.ok else None
        point = self.evaluate(best)
        if point.ok:
            return best, (point.forget, point.retain), "accepted"
        return self._largest_within_budget(best, iters)

    def _largest_within_budget(self, beyond: float, iters: int
                               ) -> tuple[float | None, tuple[tuple[float, float], float | None], str] | None:
        """With `budget`, when the smallest η reaching the aim (`beyond`) is out of the budget: the largest η below it
        within the budget, bracketed (÷4) and bisected on the budget's measurement alone (a held retain pass, not a
        forget score: below the aim the forget score rises with η, so the largest η within the budget raises it
        most), then its forget score measured once. None (the caller searches again measuring every point) when no
        η within the budget is found or the one found does not raise the forget score."""
        checks: dict[float, tuple[float | None, bool]] = {}

        def within(eta: float) -> bool:
            if eta not in checks:
                self.budget_checks += 1
                checks[eta] = self._budget(eta)  # type: ignore[misc]
            return checks[eta][1]

        hi, lo = beyond, beyond / self.growth
        for _ in range(self.max_bracket):
            if within(lo):
                break
            hi, lo = lo, lo / self.growth
        else:
            return None
        tolerance = self.growth ** (0.5 ** iters)
        while hi > lo * tolerance:
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if within(mid) else (lo, mid)
        point = self.evaluate(lo, checked=False)
        self.unchecked.discard(lo)
        retain, ok = checks[lo]
        ok = ok and point.ok
        self.points[lo] = Point(point.forget, retain, ok, ok and point.reached)
        if not ok or not point.forget > self.forget_before:
            return None
        return lo, (point.forget, retain), "target_reached" if point.reached else "retain_budget"

    def _search(self, start: float, iters: int, checked: bool
                ) -> tuple[float | None, tuple[tuple[float, float], float | None], str]:
        try:
            return self._bracket_and_bisect(start, iters, checked)
        except _CloseEnough:  # a point `good_enough` accepts: the smallest η that reaches the aim so far
            return self._choose()

    def _measure(self, eta: float, checked: bool) -> Point:
        """`evaluate(eta, checked)`, raising `_CloseEnough` at a point that ends the search (`good_enough`)."""
        point = self.evaluate(eta, checked)
        if self._good_enough is not None and point.ok and point.reached and self._good_enough(point):
            raise _CloseEnough
        return point

    def _bracket_and_bisect(self, start: float, iters: int, checked: bool
                            ) -> tuple[float | None, tuple[tuple[float, float], float | None], str]:
        lo = hi = None  # lo: largest η within budget short of the target; hi: smallest η reached or out of budget
        tolerance = self.growth ** (0.5 ** iters)  # hi / lo after `iters` bisections of one bracket
        eta = start
        _, _, ok, reached = self._measure(eta, checked)
        if ok and not reached:
            lo = eta
            for _ in range(self.max_bracket):
                previous = self.points[eta][0]
                eta *= self.growth
                forget, _, ok, reached = self._measure(eta, checked)
                if not ok or reached or forget < previous:  # out of budget, at the target, or past the peak
                    hi = eta
                    break
                if self._stalled(previous, forget):
                    stalled = self.evaluate(lo, checked)
                    if stalled.ok:  # within the budget: the step ends at the point before the flat stretch
                        self.stalled_at = lo
                        return lo, (stalled.forget, stalled.retain), "accepted"
                    hi = eta
                    break
                lo = eta
        else:
            hi = eta
            crossing = self._guess(0.0, hi) if self._guess is not None and ok else None
            if crossing is not None and 0.0 < crossing < hi:
                # the weights before the step (η = 0) fall short of the aim: measure just below the crossing the
                # model predicts between them and `hi` rather than `hi` / 4
                eta = crossing / math.sqrt(tolerance)
                _, _, ok, reached = self._measure(eta, checked)
                if ok and not reached:
                    lo = eta
                else:
                    hi = eta
            for _ in range(self.max_bracket if lo is None else 0):
                eta /= self.growth
                _, _, ok, reached = self._measure(eta, checked)
                if ok and not reached:
                    lo = eta
                    break
                hi = eta
        for _ in range(iters if (lo is not None and hi is not None) else 0):
            if self._guess is not None and hi <= lo * tolerance:
                break
            mid = self._next(lo, hi, tolerance)  # type: ignore[arg-type]
            _, _, ok, reached = self._measure(mid, checked)
            if ok and not reached:
                lo = mid
            else:
                hi = mid
        return self._choose(lo, hi)

    def _stalled(self, previous: tuple[float, float], forget: tuple[float, float]) -> bool:
        """Whether a ×4 longer step (score `forget`) added less than `stall` times the score gained up to `previous`."""
        gained = previous[0] - self.forget_before[0]
        return self._stall is not None and gained > 0 and forget[0] - previous[0] < self._stall * gained

    def _next(self, lo: float, hi: float, tolerance: float) -> float:
        """The next step length inside (lo, hi): the geometric mean, or next to the guessed crossing (`guess`)."""
        mid = math.sqrt(lo * hi)
        crossing = self._guess(lo, hi) if self._guess is not None else None
        if crossing is None or not lo < crossing < hi:
            return mid
        nudge = math.sqrt(tolerance)
        near = crossing * nudge if hi / crossing > crossing / lo else crossing / nudge
        return near if lo < near < hi else mid

    def _choose(self, lo: float | None = None, hi: float | None = None
                ) -> tuple[float | None, tuple[tuple[float, float], float | None], str]:
        points = {e: p for e, p in self.points.items() if e not in self.unchecked}
        reached_points = [e for e, p in points.items() if p.reached]
        if reached_points:
            best = min(reached_points)
            forget, retain, _, _ = points[best]
            return best, (forget, retain), "target_reached"
        ok_points = [e for e, p in points.items() if p.ok]
        if ok_points:
            best = max(ok_points, key=lambda e: points[e].forget)
            forget, retain, _, _ = points[best]
            if forget > self.forget_before:
                # a larger step was out of the retain budget: this step spends it
                spent = any(not p.ok and e > best and e not in self.refused for e, p in points.items())
                return best, (forget, retain), "retain_budget" if spent else "accepted"
        probe = points.get(lo if lo is not None else hi, NOT_MEASURED)  # type: ignore[arg-type]
        failed = [p for p in points.values() if not math.isfinite(p.forget[1])]
        if self.refused and len(self.refused) == len(points):
            reason = "trust_region"
        elif failed and len(failed) == len(points):
            reason = "non_finite"
        else:
            reason = "retain_increase" if not ok_points else "no_progress"
        return None, (probe.forget, probe.retain), reason
