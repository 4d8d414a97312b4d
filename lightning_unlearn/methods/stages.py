"""The staged steps of the second-order protocol (a mixin of `SecondOrderUnlearner`, `docs/recipe.md` §4): what each
step aims at (stage k/K of the way to the target), when a waypoint's search may end early (`WAYPOINT_BAND`, with a
staged budget), and the share of the retain budget the step aiming at the target may spend while a final repeat
remains (`final_budget_share`).

It reads what the host sets: `steps`, `staged`, `staged_budget`, `final_repeats`, `final_budget_share`,
`step_count`, `_stage_origin`, `_stage_start`, `max_retain_increase` and the score memo.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .records import Batch, StepRecord
from .step_search import Point
from .target import retain_budget_nats, staged_aim

#: without a staged budget, the step aiming at the target may spend this share of what is left of the retain budget
#: while a final repeat remains (`StagedSteps.budget_fraction`; measured on perturbed starts, `docs/recipe.md` §4)
FINAL_BUDGET_SHARE = 0.5


class StagedSteps:
    """Stage aims, waypoint bands and the final step's budget share (see the module docstring)."""

    #: a staged step aiming at a waypoint ends its search at a point within this share of a stage above it
    WAYPOINT_BAND = 0.5
    steps: int
    staged: bool
    staged_budget: bool
    final_repeats: int
    final_budget_share: float | None
    _stage_start: float | None
    _budget_spent = 0.0  # the share of the retain budget spent when the current step began (`note_budget_spent`)

    def _steps_done(self) -> int:
        """The current step, counted from 1 from the run's first (its index + 1 once `_begin_step` ran)."""
        host: Any = self
        return host.step_count - host._stage_origin

    def _final_share_applies(self) -> bool:
        """Whether `final_budget_share` caps the current step: set, no staged budget, staged steps, and the step aims
        at the target while a repeat remains (the K-th step of K and every repeat but the last)."""
        return (self.final_budget_share is not None and not self.staged_budget and self.staged
                and self.steps <= self._steps_done() < self.steps + self.final_repeats)

    def note_budget_spent(self, held: Batch | list[Batch] | None, reference: float | None) -> None:
        """At the start of a step that `final_budget_share` caps: the share of the retain budget spent so far (the
        held retain loss at the step's start, usually remembered from the last step's search: no forward pass)."""
        host: Any = self
        if held is None or reference is None or not self._final_share_applies():
            return
        spent = host._score_memo.held_loss(host, held) - reference
        self._budget_spent = (spent / retain_budget_nats(host.max_retain_increase, reference)
                              if host.max_retain_increase else 1.0)

    def stage_target(self, target: float | None, forget_loss: float) -> float | None:
        """What the current step aims at: stage k/K of the way from the run's first forget loss to `target`."""
        if self._stage_start is None:
            self._stage_start = forget_loss
        if target is None or not self.staged:
            return target
        fraction = min(1.0, self._steps_done() / self.steps)
        return staged_aim(target, self._stage_start, fraction, forget_loss)

    def _waypoint_reached(self, aim: float | None, target: float | None) -> Callable[[Point], bool] | None:
        """For a staged step whose aim is a waypoint short of the target, with a staged budget: a point that reaches
        it by at most `WAYPOINT_BAND` of a stage ends the search (`StepSearch`'s `good_enough`); the step that aims at
        the target itself still takes the smallest step length that reaches it. None otherwise: without a staged
        budget a step that overshoots its waypoint may spend the budget of the steps after it (measured on the
        canaries, `docs/recipe.md` §4)."""
        if (not self.WAYPOINT_BAND or not self.staged_budget or aim is None or target is None
                or self._stage_start is None or not aim < target):  # unstaged: the aim is the target
            return None
        band = self.WAYPOINT_BAND * (target - self._stage_start) / max(self.steps, 1)
        return lambda point: point.forget[0] <= aim + band

    def budget_fraction(self) -> float:
        """The staged budget's share (`KnowledgeRegime.budget_fraction`); without a staged budget, with
        `final_budget_share=r`, a step that aims at the target while a repeat remains (the K-th step of K, and every
        repeat but the last) may spend r of what is left of the budget (spent + r (1 − spent)), so that where its
        direction cannot reach the target within r, the rest is left to a fresh direction (`repeats_last_stage`)."""
        fraction = super().budget_fraction()
        if fraction < 1.0 or not self._final_share_applies():
            return fraction
        spent = min(max(self._budget_spent, 0.0), 1.0)
        return spent + self.final_budget_share * (1.0 - spent)  # type: ignore[operator]

    def repeats_last_stage(self, record: StepRecord | None) -> bool:
        """The base rule, and a step that spent `final_budget_share`'s cap short of the target takes a repeat."""
        capped = (record is not None and record.accepted and record.reason == "retain_budget"
                  and self._final_share_applies() and self.budget_fraction() < 1.0)
        return capped or super().repeats_last_stage(record)
