"""The step-length search along a fixed direction (`docs/recipe.md`: the step length).

`StepSearch(evaluate, forget_before).run(start, iters)` brackets (×4 / ÷4 from `start`) and then bisects in log
space for the *smallest* η that reaches the aim within the retain budget, or else the η within the budget that raises
the forget score most. `evaluate(eta)` applies the step η and measures it (one forward pass over the forget set and
the held retain batch: no gradient, no curvature); it returns a `Point`, or None for a step length outside the trust
region (not measured). The search only decides: its caller owns the weights.
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


class StepSearch:
    """Step lengths η along one direction, each measured once (see the module docstring)."""

    growth = 4.0
    max_bracket = 12

    def __init__(self, evaluate: Callable[[float], Point | None], forget_before: tuple[float, float]) -> None:
        self._evaluate = evaluate
        self.forget_before = forget_before
        self.evaluations = 0
        self.points: dict[float, Point] = {}
        self.refused: set[float] = set()  # step lengths outside the trust region

    def evaluate(self, eta: float) -> Point:
        """The point at η (cached)."""
        if eta in self.points:
            return self.points[eta]
        self.evaluations += 1
        point = self._evaluate(eta)
        if point is None:
            point = NOT_MEASURED
            self.refused.add(eta)
        self.points[eta] = point
        return point

    def run(self, start: float, iters: int) -> tuple[float | None, tuple[tuple[float, float], float | None], str]:
        """(the chosen η or None, its ((forget score, forget loss), retain loss), reason): "target_reached",
        "retain_budget" (the largest step within the budget, which it spends) or "accepted" with an η; else why
        none was taken ("trust_region", "non_finite", "retain_increase" or "no_progress")."""
        lo = hi = None  # lo: largest η within budget short of the target; hi: smallest η reached or out of budget
        eta = start
        _, _, ok, reached = self.evaluate(eta)
        if ok and not reached:
            lo = eta
            for _ in range(self.max_bracket):
                previous = self.points[eta][0]
                eta *= self.growth
                forget, _, ok, reached = self.evaluate(eta)
                if not ok or reached or forget < previous:  # out of budget, at the target, or past the peak
                    hi = eta
                    break
                lo = eta
        else:
            hi = eta
            for _ in range(self.max_bracket):
                eta /= self.growth
                _, _, ok, reached = self.evaluate(eta)
                if ok and not reached:
                    lo = eta
                    break
                hi = eta
        for _ in range(iters if (lo is not None and hi is not None) else 0):
            mid = math.sqrt(lo * hi)
            _, _, ok, reached = self.evaluate(mid)
            if ok and not reached:
                lo = mid
            else:
                hi = mid
        reached_points = [e for e, p in self.points.items() if p.reached]
        if reached_points:
            best = min(reached_points)
            forget, retain, _, _ = self.points[best]
            return best, (forget, retain), "target_reached"
        ok_points = [e for e, p in self.points.items() if p.ok]
        if ok_points:
            best = max(ok_points, key=lambda e: self.points[e].forget)
            forget, retain, _, _ = self.points[best]
            if forget > self.forget_before:
                # a larger step was out of the retain budget: this step spends it
                spent = any(not p.ok and e > best and e not in self.refused for e, p in self.points.items())
                return best, (forget, retain), "retain_budget" if spent else "accepted"
        probe = self.points.get(lo if lo is not None else hi, NOT_MEASURED)  # type: ignore[arg-type]
        failed = [p for p in self.points.values() if not math.isfinite(p.forget[1])]
        if self.refused and len(self.refused) == len(self.points):
            reason = "trust_region"
        elif failed and len(failed) == len(self.points):
            reason = "non_finite"
        else:
            reason = "retain_increase" if not ok_points else "no_progress"
        return None, (probe.forget, probe.retain), reason
