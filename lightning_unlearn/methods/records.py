"""What a run leaves behind: one `StepRecord` per trial, the run's status, its summary (numbers only, never text).

Every driver reports a run the same way: `run_status` is the one status rule and `SUMMARY_FIELDS` the one summary
schema (`Unlearner.summary`, `serve_request`'s `RequestResult.summary`, `UnlearningModule.summary`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor

Batch = Mapping[str, Tensor]

#: how a run ended (`Unlearner.status`)
STATUSES = ("target_reached", "budget_exhausted", "nothing_accepted")
#: the keys of every run's summary, in order
SUMMARY_FIELDS = ("status", "target", "target_source", "holdout_loss", "forget_score_before", "forget_score_after",
                  "steps_accepted", "trials", "evaluations", "forget_loss_before", "forget_loss_after",
                  "retain_loss_before", "retain_loss_after", "knowledge_regime",
                  "retain_loss_before_repair", "repair_rounds")


class NothingAcceptedWarning(UserWarning):
    """A run accepted no step: the model is unchanged (every trial was rolled back)."""


class RunTrustRegionWarning(UserWarning):
    """A run stopped because its steps together moved the weights as far as its trust region allows."""


class HoldoutBudgetWarning(UserWarning):
    """A retain-free run spent its retain budget read on the holdout: data of the forget set's kind, which unlearning
    moves too, so the budget may have stopped the run far from its target."""


@dataclass
class StepRecord:
    """One logged decision (one trial update); never contains text.

    `damping` is λ for curvature methods and the learning-rate divisor for first-order ones; `scale` is η
    (curvature methods) or the effective learning rate (first-order). `forget_loss`/`retain_loss` are the mean
    token NLL on the forget set and on the batch the retain budget is measured on *after* the trial (the held retain
    batch; a retain-free request measures its budget on the holdout, so `retain_loss` is then the holdout's loss).
    `reason` is one of "accepted", "target_reached" (accepted, forget target met), "retain_increase", "non_finite",
    "trust_region" (rolled back: the step left the trust region, see `Unlearner`).
    `trial` counts retries within the step (0 = first try). With the step search (second-order methods),
    `scale` is the step length η chosen along the Newton direction, `evaluations` the number of points tried
    (each a forward pass over the forget set and the held retain batch), `target` the forget loss aimed at,
    `predicted_increase` the curvature's ½ΔᵀCΔ of the accepted update, `forget_score` what the target is compared
    with (the forget score against the holdout, or the forget loss with `forget_target`), and the reason may also be
    "retain_budget" (accepted: the largest step within the retain budget, which is now spent) or "no_progress"
    (rolled back: no step length raised the forget loss within the budget).
    """

    step: int
    damping: float
    scale: float
    forget_loss: float
    retain_loss: float | None
    accepted: bool
    reason: str
    trial: int = 0
    target: float | None = None
    evaluations: int = 1
    predicted_increase: float | None = None
    forget_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_batches(batches: Iterable[Batch] | Batch | None) -> list[Batch]:
    """One batch, several, or None as a list of batches."""
    if batches is None:
        return []
    if isinstance(batches, Mapping):
        return [batches]
    return list(batches)


def trial_reason(*, finite: bool, outside_trust_region: bool, over_budget: bool, target_reached: bool) -> str:
    """The verdict on one trial update, in order of precedence: "non_finite", "trust_region", "retain_increase"
    (rolled back), "target_reached", "accepted"."""
    if not finite:
        return "non_finite"
    if outside_trust_region:
        return "trust_region"
    if over_budget:
        return "retain_increase"
    return "target_reached" if target_reached else "accepted"


def run_status(records: Sequence[StepRecord]) -> str | None:
    """How a run with these trials ends: "target_reached" (a trial reached the target), "nothing_accepted" (every
    trial was rolled back) or "budget_exhausted" (steps accepted, target not reached); None before any trial."""
    if any(r.reason == "target_reached" for r in records):
        return "target_reached"
    if not records:
        return None
    if not any(r.accepted for r in records):
        return "nothing_accepted"
    return "budget_exhausted"


def stops_run(record: StepRecord, stop_at_budget: bool = True) -> bool:
    """Whether a step's record ends the run: it was rolled back after every retry, it reached the target, or (with
    `stop_at_budget`) it spent the retain budget."""
    return not record.accepted or record.reason == "target_reached" or (
        record.reason == "retain_budget" and stop_at_budget)


def summarize(records: Sequence[StepRecord], status: str | None, **values: Any) -> dict[str, Any]:
    """A run's summary (`SUMMARY_FIELDS`): the counts from `records`, the rest from `values` (None when absent)."""
    out: dict[str, Any] = dict.fromkeys(SUMMARY_FIELDS)
    out.update(values)
    out.update(status=status, steps_accepted=sum(bool(r.accepted) for r in records), trials=len(records),
               evaluations=sum(int(r.evaluations) for r in records))
    unknown = sorted(set(out) - set(SUMMARY_FIELDS))
    if unknown:
        raise KeyError(f"not a summary field: {unknown[0]!r}")
    return out


def warn_how_it_ended(name: str, status: str, trials: int, *, budget_on_holdout: bool) -> None:
    """The warnings of a run's end: `NothingAcceptedWarning` when no step was accepted; `HoldoutBudgetWarning` when a
    retain budget read on the holdout (a retain-free run) ended it."""
    if status == "nothing_accepted":
        warnings.warn(
            f"{name}: no step was accepted ({trials} trial(s) rolled back): the model is unchanged."
            " Check the step records' reasons (retain_increase: raise max_retain_increase or give more retain"
            " data; non_finite or trust_region: lower the scale; no_progress: the forget loss cannot rise along"
            " this direction)",
            NothingAcceptedWarning, stacklevel=4)
    if status == "budget_exhausted" and budget_on_holdout:
        warnings.warn(
            f"{name}: the run spent its retain budget, read on the holdout (no retain data was given). The "
            "holdout is data of the forget set's kind, which unlearning moves too (retraining moves it further), "
            "so this budget can stop a run far from its target. Pass one held retain batch (`held_retain_batch=` "
            "of fit, `held_retain=` of serve_request, or a single retain batch; no curvature pass is made over "
            "it) to read the budget on retain data",
            HoldoutBudgetWarning, stacklevel=4)
