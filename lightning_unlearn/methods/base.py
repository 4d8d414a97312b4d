"""The unlearning engine's method protocol: a trial update, a safety check, a target, a status, a decision log.

    unlearner = build_unlearner("newton", model)            # the default recipe: K-FAC, relative damping
    records = unlearner.fit(forget_batches, retain_batches, holdout_batches=holdout_batches)
    unlearner.status       # "target_reached" | "budget_exhausted" | "nothing_accepted"
    unlearner.summary()    # status, target, steps, losses before and after (numbers only)

**The target.** `holdout_batches` are data of the same kind as the forget set that the model never saw
(never-inserted reference canaries, QA pairs of people outside the training set, the data module's `holdout`
split). A model that never saw the forget set cannot tell it from the holdout, so the target is a membership test
against the holdout: the run stops when the forget examples' losses sit, on average, at the median of the holdout
examples' losses under the same weights (the *forget score*, the mean holdout percentile of the forget examples' mean
token NLL, reaches 0.5; 1 - score is the LOSS attack's AUC). Per example, not the mean loss: a mean can be reached by
a few examples pushed far up while the rest stay memorised. Under the same weights (`relative_target=True`), because
privacy is relative (a canary's exposure is its rank among all candidates, an attack compares the two sets under the
model it attacks) and because the original model's holdout level is itself contaminated by what it learned from the
forget set (on the demo, "my PIN is" followed by digits appears only in canaries: the original model gives never-seen
PINs 3.2 nats per digit, the retrained model 9.9). `relative_target=False` compares with the holdout's losses before
unlearning. Second-order steps are constrained to leave the holdout's losses in place
(`SecondOrderUnlearner._direction`), so that the forget set moves, not the whole kind of data.
`forget_target=<nats>` sets a mean-loss level by hand instead. Without either there is no target: each step then
takes the largest step within the retain budget (documented fallback).

Every method proposes an update from the forget data; `step` applies it as a *trial*: the held retain loss and
the forget loss are measured, and the trial is rolled back (weights restored bit for bit from a copy) when
anything is non-finite or the held retain loss rose more than `max_retain_increase` (relative) above its value
when that held batch was first seen (by default: the start of the run, so the budget bounds the total damage of
the run, not each step). After a rollback the damping grows (×`damping_growth`) and the step is retried, at
most `max_retries` times; after a success it shrinks back towards its initial value. Every trial is one
`StepRecord` in `history` and is passed to `log`. Records hold numbers only, never text.

Losses are the mean token NLL over positions with labels != -100 (the span, for span-level forgetting); sums and
counts go through `reduce` (a cross-process sum, identity by default) so that every process takes the same
decision. Torch only: drivers (Lightning, Fabric) inject `reduce`/`gather`.
"""

from __future__ import annotations

import copy
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature.base import Curvature, Reduce, Vector, check_damping, check_damping_mode, eval_mode, identity
from ..curvature.objective import model_logits
from ..curvature.registry import BACKEND_ALIASES as BACKEND_ALIASES  # re-exported: public since the start
from ..curvature.registry import CURVATURE_BACKENDS as CURVATURE_BACKENDS
from ..curvature.registry import build_curvature as build_curvature
from ..errors import UserInputError
from .inputs import check_batches, check_finite_weights, check_keywords
from .losses import DEFAULT_FORGET_LOSS, check_forget_loss, forget_objective, token_nll

Batch = Mapping[str, Tensor]

#: how a run ended (`Unlearner.status`)
STATUSES = ("target_reached", "budget_exhausted", "nothing_accepted")

#: the trust region: no accepted step moves the updated parameters by more than this fraction of their norm
DEFAULT_MAX_STEP_NORM = 1.0
#: ... nor predicts (½ΔᵀCΔ, retain curvature) a retain increase above this multiple of the retain budget
DEFAULT_PREDICTED_TRUST = 2.0
#: the holdout's per-example losses are kept as a histogram (sums reduce across processes): bins over [0, max) nats
HOLDOUT_BINS, HOLDOUT_MAX_NATS = 4096, 64.0


def retain_budget_nats(max_retain_increase: float, reference: float | None = None) -> float:
    """The retain budget as a rise of the held retain loss in nats: the larger of `log(1 + max_retain_increase)`
    (the held retain *perplexity*, or answer probability on QA, changes by at most that fraction) and
    `max_retain_increase × reference` (the loss itself rises by at most that fraction). The first keeps the budget
    from vanishing on memorised retain data (a relative rise of a 0.003-nat loss allows 0.00015 nats); the second
    is the budget on text the model has not memorised (a 3.6-nat loss: 0.18 nats)."""
    nats = math.log1p(float(max_retain_increase))
    return nats if reference is None else max(nats, float(max_retain_increase) * float(reference))


def over_retain_budget(loss: float, reference: float, max_retain_increase: float | None) -> bool:
    """Whether the held retain loss `loss` spends more than the budget above `reference` (its value at the start)."""
    return max_retain_increase is not None and loss > reference + retain_budget_nats(max_retain_increase, reference)


class NothingAcceptedWarning(UserWarning):
    """A run accepted no step: the model is unchanged (every trial was rolled back)."""

#: where a second-order method's curvature comes from (`SecondOrderUnlearner`)
CURVATURE_DATA = ("retain", "forget", "full_minus_forget")


@dataclass
class StepRecord:
    """One logged decision (one trial update); never contains text.

    `damping` is λ for curvature methods and the learning-rate divisor for first-order ones; `scale` is η
    (curvature methods) or the effective learning rate (first-order). `forget_loss`/`retain_loss` are the mean
    token NLL on the forget set and on the held retain batch *after* the trial (a retain-free request measures its
    budget on the holdout instead: `retain_loss` is then the holdout's loss). `reason` is one of "accepted",
    "target_reached" (accepted, forget target met), "retain_increase", "non_finite", "trust_region" (rolled back:
    the step left the trust region, see `Unlearner`).
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




def held_out_retain(retain: Sequence[Batch]) -> tuple[list[Batch], Batch]:
    """(curvature and step batches, the held batch of the retain budget) from retain batches when no held batch is
    given: the last batch is held out when there are two or more, so that the budget is read on retain data that
    neither the curvature nor the steps have seen (read on curvature data it under-reports the damage: +4.6 % on the
    budget batch against +7.6 % on all retain answers, measured on a QA set); with one batch it serves both."""
    retain = list(retain)
    return (retain[:-1], retain[-1]) if len(retain) >= 2 else (retain, retain[0])


def _as_list(batches: Iterable[Batch] | Batch | None) -> list[Batch]:
    if batches is None:
        return []
    if isinstance(batches, Mapping):
        return [batches]
    return list(batches)


class Unlearner(ABC):
    """Base of every method: trial update -> safety check -> accept or roll back, logged.

    Subclasses implement `param_names` (what they update), `_prepare` (work done once per step, e.g. the forget
    gradient) and `_propose` (the update for the current damping, from the prepared context), or override
    `_apply_trial` for updates made by a torch optimizer.
    """

    name: str = "unlearner"
    #: whether a step that spends the retain budget ends `fit` (second-order methods make it a setting)
    stop_at_budget: bool = True

    def __init__(
        self,
        model: nn.Module,
        *,
        forget_loss: str = DEFAULT_FORGET_LOSS,
        steps: int = 1,
        max_retain_increase: float | None = 0.05,
        damping_growth: float = 10.0,
        max_retries: int = 4,
        forget_target: float | None = None,
        log: Callable[[StepRecord], None] | None = None,
        reduce: Reduce | None = None,
        damping: float = 1.0,
        scale: float = 1.0,
        relative_target: bool = True,
        target_score: float = 0.5,
        max_step_norm: float | None = DEFAULT_MAX_STEP_NORM,
    ) -> None:
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if damping_growth <= 1:
            raise ValueError(f"damping_growth must be > 1 (λ's factor after a rollback), got {damping_growth}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if max_retain_increase is not None and not (math.isfinite(float(max_retain_increase))
                                                    and max_retain_increase >= 0):
            raise ValueError(f"max_retain_increase must be a finite number >= 0 or None (no check), got "
                             f"{max_retain_increase}")
        if max_step_norm is not None and not (math.isfinite(float(max_step_norm)) and max_step_norm > 0):
            raise ValueError(f"max_step_norm must be a finite number > 0 (the trust region: ‖Δθ‖ ≤ max_step_norm · "
                             f"‖θ‖) or None (no trust region), got {max_step_norm}")
        if not (math.isfinite(float(damping)) and float(damping) >= 0):
            raise ValueError(f"damping must be a finite number >= 0, got {damping}")
        if not (math.isfinite(float(scale)) and float(scale) > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale}")
        self.model = model
        self.forget_loss = check_forget_loss(forget_loss)
        self.steps = int(steps)
        self.max_retain_increase = max_retain_increase
        self.damping_growth = float(damping_growth)
        self.max_retries = int(max_retries)
        self.forget_target = forget_target
        self.log = log
        self.reduce: Reduce = reduce if reduce is not None else identity
        self.initial_damping = float(damping)
        self.damping = float(damping)
        self.scale = float(scale)
        self.max_step_norm = None if max_step_norm is None else float(max_step_norm)
        self.history: list[StepRecord] = []
        self.step_count = 0
        self._reference: tuple[Batch, float] | None = None
        self.holdout: list[Batch] = []
        self.holdout_loss: float | None = None  # the holdout's mean token NLL before unlearning
        self._holdout_hist: Tensor | None = None  # its per-example losses before unlearning, as a histogram
        self.relative_target = bool(relative_target)
        if not 0.0 < float(target_score) <= 1.0:
            raise ValueError(f"target_score must lie in (0, 1] (0.5: the forget set sits at the holdout's median), got "
                             f"{target_score}")
        self.target_score = float(target_score)
        self.target_source = "forget_target" if forget_target is not None else "none"
        self._status: str | None = None
        self._losses: dict[str, float | None] = {}

    # ------------------------------------------------------------------ what subclasses provide
    @property
    @abstractmethod
    def param_names(self) -> tuple[str, ...]:
        """Names (in `model.named_parameters()`) of the parameters this method updates."""

    @abstractmethod
    def _prepare(self, forget: Sequence[Batch], retain: Sequence[Batch]) -> Any:
        """Work done once per step, reused across retries (e.g. the forget gradient)."""

    def _propose(self, context: Any) -> Vector:
        """The additive update for the current `self.damping` / `self.scale`."""
        raise NotImplementedError

    def _begin_fit(self, forget: Sequence[Batch], retain: Sequence[Batch]) -> None:
        """Hook before the first step of `fit` (curvature fitting)."""
        return None

    def _before_step(self, index: int, forget: Sequence[Batch], retain: Sequence[Batch]) -> None:
        """Hook before step `index` of `fit` (curvature refresh)."""
        return None

    def _record_scale(self) -> float:
        return self.scale

    # ------------------------------------------------------------------ helpers
    def named_params(self) -> dict[str, nn.Parameter]:
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.param_names}

    def measure(self, batches: Batch | Sequence[Batch]) -> float:
        """Mean token NLL over valid positions of one batch or several (token-weighted, reduced across processes)."""
        _, total, count = self.example_losses(batches)
        return total / count

    def example_losses(self, batches: Batch | Sequence[Batch]) -> tuple[Tensor, float, float]:
        """(this process's per-example mean token NLL [n], token NLL sum, token count), the sums reduced."""
        losses, total = [], torch.zeros(2, dtype=torch.float64)
        with torch.no_grad(), eval_mode(self.model):
            for b in _as_list(batches):
                nll, example = token_nll(model_logits(self.model, b), b)
                nll = nll.double().cpu()
                example = example.cpu()
                rows = example.unique()
                sums = torch.zeros(int(example.max()) + 1 if len(example) else 0, dtype=torch.float64)
                counts = torch.zeros_like(sums)
                sums.index_add_(0, example, nll)
                counts.index_add_(0, example, torch.ones_like(nll))
                losses.append(sums[rows] / counts[rows])
                total += torch.tensor([float(nll.sum()), float(nll.numel())], dtype=torch.float64)
        total = self.reduce(total)
        if float(total[1]) <= 0:
            raise ValueError("no position with labels != -100 in the batches; nothing to measure the loss on")
        return (torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)), float(total[0]), float(total[1])

    def _holdout_histogram(self) -> tuple[Tensor, float]:
        """Counts of the holdout examples by mean token NLL (HOLDOUT_BINS bins over [0, HOLDOUT_MAX_NATS)),
        reduced across processes, and the holdout's mean token NLL, at the current weights. A non-finite loss (NaN
        logits) is counted in the top bin and makes the mean non-finite on every process (the sums are reduced): the
        callers read that as "no score"."""
        losses, total, count = self.example_losses(self.holdout)
        losses = torch.nan_to_num(losses, nan=HOLDOUT_MAX_NATS, posinf=HOLDOUT_MAX_NATS, neginf=0.0)
        x = (losses.clamp(0, HOLDOUT_MAX_NATS) / HOLDOUT_MAX_NATS * HOLDOUT_BINS).long().clamp(max=HOLDOUT_BINS - 1)
        hist = torch.zeros(HOLDOUT_BINS, dtype=torch.float64).index_add_(0, x, torch.ones_like(losses))
        return self.reduce(hist), total / count

    def forget_score(self, forget: Batch | Sequence[Batch]) -> tuple[float, float]:
        """(score, mean token NLL) of the forget batches. The score is what the target is compared with: with a
        holdout target, the mean percentile of the forget examples' losses among the holdout examples' losses
        at the current weights (before unlearning with `relative_target=False`; 0 = every forget example below every
        holdout example, 0.5 = indistinguishable, 1 - score = the LOSS attack's AUC); otherwise the mean token NLL.
        The score is NaN when a loss of either set is not finite (a trial that is rolled back, never a score)."""
        losses, total, count = self.example_losses(forget)
        nll = total / count
        if not self.holdout or self.forget_target is not None:
            return nll, nll
        if not math.isfinite(nll):  # reduced sums: every process returns here alike
            return float("nan"), nll
        if self.relative_target:
            hist, holdout_loss = self._holdout_histogram()
            if not math.isfinite(holdout_loss):
                return float("nan"), nll
        else:
            hist = self._holdout_hist
        cum = torch.cat([torch.zeros(1, dtype=torch.float64), hist.cumsum(0)])
        x = (losses.clamp(0, HOLDOUT_MAX_NATS) / HOLDOUT_MAX_NATS * HOLDOUT_BINS).clamp(max=HOLDOUT_BINS - 1e-9)
        k = x.floor().long()
        below = cum[k] + (x - k) * hist[k]  # holdout examples with a lower loss (linear within a bin)
        sums = self.reduce(torch.tensor([float(below.sum()), float(len(losses))], dtype=torch.float64))
        return float(sums[0] / (sums[1] * cum[-1])), nll

    def forget_gradient(self, forget: Sequence[Batch], kind: str | None = None) -> Vector:
        """`-∇ U` over `param_names` (U the forget objective to minimise, `kind` or `forget_loss`): the direction
        that forgets, averaged over the batches by their weights (positions or examples) and reduced across
        processes. `kind="nll"` gives `+∇` of the mean token NLL."""
        params = self.named_params()
        names, plist = list(params), list(params.values())
        grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        weight = 0.0
        with torch.enable_grad(), eval_mode(self.model):
            for b in forget:
                loss, w = forget_objective(self.model, b, kind or self.forget_loss, plist)
                if w == 0:
                    continue
                gs = torch.autograd.grad(loss, plist, allow_unused=True)
                for n, g in zip(names, gs):
                    if g is not None:
                        grads[n] -= w * g.detach().float()
                weight += w
        total = float(self.reduce(torch.tensor(weight, dtype=torch.float64)))
        if total <= 0:
            raise ValueError("the forget batches have no position with labels != -100; nothing to forget")
        return {n: (self.reduce(g) / total).to(params[n].dtype) for n, g in grads.items()}

    def _snapshot(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.named_params().items()}

    def relative_step(self, snapshot: Mapping[str, Tensor]) -> float:
        """‖θ - θ₀‖ / ‖θ₀‖ over the updated parameters, from a `_snapshot()` θ₀ (0 when θ₀ = 0 and θ = θ₀)."""
        params = self.named_params()
        moved = sum(float((params[n].detach().double() - s.double()).pow(2).sum()) for n, s in snapshot.items())
        size = sum(float(s.double().pow(2).sum()) for s in snapshot.values())
        if size == 0.0:
            return 0.0 if moved == 0.0 else math.inf
        return math.sqrt(moved / size)

    def outside_trust_region(self, snapshot: Mapping[str, Tensor]) -> bool:
        """Whether the current weights moved further from `snapshot` than the trust region allows: a guard that
        holds even when the held retain batch does not notice a huge step (e.g. an untrained or tiny model)."""
        return self.max_step_norm is not None and self.relative_step(snapshot) > self.max_step_norm

    def _restore(self, snapshot: Mapping[str, Tensor]) -> None:
        params = self.named_params()
        with torch.no_grad():
            for n, s in snapshot.items():
                params[n].copy_(s)

    def _apply_trial(self, context: Any) -> bool:
        """Apply the trial update in place; False (nothing applied) when the update is non-finite."""
        update = self._propose(context)
        if not all(bool(torch.isfinite(u).all()) for u in update.values()):
            return False
        params = self.named_params()
        with torch.no_grad():
            for n, u in update.items():
                params[n].add_(u.to(device=params[n].device, dtype=params[n].dtype))
        return True

    def _reject(self) -> None:
        """After a rollback: grow the damping."""
        self.damping *= self.damping_growth

    def _accept(self) -> None:
        """After a success: shrink the damping back towards its initial value."""
        self.damping = max(self.initial_damping, self.damping / self.damping_growth)

    def _rollback_state(self) -> Any:
        """Extra state to restore on rollback (optimizer moments); None by default."""
        return None

    def _restore_state(self, state: Any) -> None:
        """Restore what `_rollback_state` returned."""
        return None

    def _emit(self, record: StepRecord) -> StepRecord:
        self.history.append(record)
        if self.log is not None:
            self.log(record)
        return record

    def reference_retain_loss(self, held: Batch) -> float:
        """The held batch's retain loss when it was first seen (the budget's reference)."""
        if self._reference is None or self._reference[0] is not held:
            self._reference = (held, self.measure(held))
        return self._reference[1]

    # ------------------------------------------------------------------ the target
    def calibrate(self, holdout_batches: Iterable[Batch] | Batch | None) -> float | None:
        """Use `holdout_batches` (never-trained data of the forget set's kind) for the target (see the module
        docstring) and, for second-order methods, as the data whose loss the step leaves in place. An explicit
        `forget_target` wins. Returns the target (None without one)."""
        self.holdout = _as_list(holdout_batches)
        self._holdout_hist, self.holdout_loss = self._holdout_histogram() if self.holdout else (None, None)
        if self.holdout_loss is not None and not math.isfinite(self.holdout_loss):
            self.holdout, self._holdout_hist, self.holdout_loss = [], None, None
            raise UserInputError(f"{self.name}: the model's loss on the holdout is NaN/inf before unlearning "
                                 "(non-finite logits: e.g. float16 overflow, or broken weights); load the model in "
                                 "float32 or bfloat16 and check the holdout batches")
        if self.forget_target is None:
            self.target_source = "holdout" if self.holdout else "none"
        return self.current_target()

    def current_target(self) -> float | None:
        """What this run aims at: the forget score 0.5 against the holdout, or the `forget_target` loss."""
        if self.forget_target is not None:
            return float(self.forget_target)
        return self.target_score if self.holdout else None

    @property
    def status(self) -> str | None:
        """How the last `fit` ended: "target_reached", "budget_exhausted" or "nothing_accepted" (None before)."""
        return self._status

    def _finish(self, records: Sequence[StepRecord], target: float | None) -> None:
        accepted = [r for r in records if r.accepted]
        if any(r.reason == "target_reached" for r in records):
            self._status = "target_reached"
        elif not accepted:
            self._status = "nothing_accepted"
            warnings.warn(
                f"{self.name}: no step was accepted ({len(records)} trial(s) rolled back): the model is unchanged."
                " Check the step records' reasons (retain_increase: raise max_retain_increase or give more retain"
                " data; non_finite or trust_region: lower the scale; no_progress: the forget loss cannot rise along"
                " this direction)",
                NothingAcceptedWarning, stacklevel=3)
        else:
            self._status = "budget_exhausted"
        self._losses["target"] = target

    def summary(self) -> dict[str, Any]:
        """Numbers only: status, target and where it came from, steps accepted, losses before and after."""
        records = self.history
        return {"status": self.status, "target": self._losses.get("target"), "target_source": self.target_source,
                "holdout_loss": self.holdout_loss, "forget_score_before": self._losses.get("score_before"),
                "forget_score_after": self._losses.get("score_after"),
                "steps_accepted": sum(r.accepted for r in records), "trials": len(records),
                "evaluations": sum(r.evaluations for r in records),
                "forget_loss_before": self._losses.get("forget_before"),
                "forget_loss_after": self._losses.get("forget_after"),
                "retain_loss_before": self._losses.get("retain_before"),
                "retain_loss_after": self._losses.get("retain_after")}

    def _held(self, held_retain_batch: Batch | None, retain: Sequence[Batch]) -> Batch | list[Batch] | None:
        """What the retain budget is measured on: the held retain batch, else the first retain batch, else (a
        retain-free request) the holdout, the only never-trained data at hand: without it the curvature's
        prediction ½ΔᵀCΔ is the only guard, and it can under-predict a large step many times over."""
        if held_retain_batch is not None:
            return held_retain_batch
        if retain:
            return retain[0]
        return self.holdout if self.holdout else None

    def require_measured_guard(self, held_retain_batch: Batch | None, retain: Sequence[Batch]) -> None:
        """Refuse a run with a retain budget but nothing to measure it on (no held retain batch, no retain batch, no
        holdout): a prediction alone (the curvature's ½ΔᵀCΔ) is no bound, a retain-free request that trusted it took
        every loss of a tiny Qwen2 to about 14 nats (uniform: 5.5). `max_retain_increase=None` runs without a check."""
        if self.max_retain_increase is None or self._held(held_retain_batch, retain) is not None:
            return
        raise UserInputError(
            f"{self.name}: nothing to measure the damage on: no retain data and no holdout data, so no measured loss "
            "bounds the steps (the curvature's prediction alone lets a step ruin the model); pass holdout data (a "
            "few never-trained examples of the forget set's kind, labelled like it: holdout= / holdout_batches=; the "
            "retain budget is then measured on them) or a retain batch (retain= / held_retain=), or set "
            "max_retain_increase=None to run without any check")

    def check_holdout(self, forget: Sequence[Batch], retain: Sequence[Batch] = (),
                      held_retain_batch: Batch | None = None) -> None:
        """Before the first step, with a holdout: refuse holdout examples that are forget or retain examples, warn
        (`HoldoutWarning`) when the holdout does not look like never-seen data of the forget set's kind; see
        `lightning_unlearn.methods.holdout`. Every process takes the same decision (the numbers are reduced)."""
        if not self.holdout:
            return
        from . import holdout as checks
        from .inputs import vocabulary_size

        others = [*retain, *([held_retain_batch] if held_retain_batch is not None else [])]
        counts = self.reduce(torch.tensor(checks.duplicate_counts(self.holdout, forget, others) +
                                          checks.shared_token_counts(self.holdout, forget), dtype=torch.float64))
        held = self._held(held_retain_batch, list(retain))
        holdout_loss = self.holdout_loss if self.holdout_loss is not None else self.measure(self.holdout)
        refusal, found = checks.holdout_findings(
            duplicates=counts[:3].tolist(), shared=counts[3:].tolist(), vocabulary=vocabulary_size(self.model),
            holdout_loss=holdout_loss, forget_loss=self.measure(forget),
            retain_loss=self.measure(held) if held is not None and held is not self.holdout else None)
        if refusal is not None:
            raise UserInputError(f"{self.name}: {refusal}")
        for message in found:
            warnings.warn(f"{self.name}: {message}", checks.HoldoutWarning, stacklevel=3)

    def _begin_step(self, forget_batch: Batch | Sequence[Batch], retain_batch: Batch | Sequence[Batch] | None,
                    held_retain_batch: Batch | None) -> tuple[list[Batch], list[Batch], Batch | None, float | None,
                                                              float | None, Any, int]:
        """What every step starts from: (forget, retain, held batch, its reference loss, target, the prepared
        context, the step's index)."""
        forget = _as_list(forget_batch)
        retain = _as_list(retain_batch)
        if not forget:
            raise ValueError("step() needs at least one forget batch")
        for what, batches in (("forget", forget), ("retain", retain)):
            check_batches(self.model, batches, what)
        held = self._held(held_retain_batch, retain)
        reference = self.reference_retain_loss(held) if held is not None else None
        target = self.current_target()
        context = self._prepare(forget, retain)
        index = self.step_count
        self.step_count += 1
        return forget, retain, held, reference, target, context, index

    # ------------------------------------------------------------------ public API
    def step(
        self,
        forget_batch: Batch | Sequence[Batch],
        retain_batch: Batch | Sequence[Batch] | None = None,
        held_retain_batch: Batch | None = None,
    ) -> StepRecord:
        """One update with the safety check (and up to `max_retries` retries); returns the last trial's record.

        `forget_batch` may be one batch or a list (the forget gradient is then over all of them). The held retain
        batch defaults to the first retain batch; without either, only the non-finite check guards the step.
        """
        forget, retain, held, reference, target, context, index = self._begin_step(
            forget_batch, retain_batch, held_retain_batch)
        record: StepRecord | None = None
        for trial in range(self.max_retries + 1):
            snapshot, extra = self._snapshot(), self._rollback_state()
            applied = self._apply_trial(context)
            try:
                score, forget_loss = self.forget_score(forget) if applied else (float("nan"), float("nan"))
                retain_loss = self.measure(held) if (applied and held is not None) else None
            except BaseException:  # an error (or Ctrl-C) while measuring: the trial was never accepted
                self._restore(snapshot)
                self._restore_state(extra)
                raise
            finite = applied and math.isfinite(forget_loss) and math.isfinite(score) and (
                retain_loss is None or math.isfinite(retain_loss))
            if finite:
                finite = all(bool(torch.isfinite(p).all()) for p in self.named_params().values())
            if not finite:
                reason = "non_finite"
            elif self.outside_trust_region(snapshot):
                reason = "trust_region"
            elif (reference is not None and retain_loss is not None
                  and over_retain_budget(retain_loss, reference, self.max_retain_increase)):
                reason = "retain_increase"
            elif target is not None and score >= target:
                reason = "target_reached"
            else:
                reason = "accepted"
            accepted = reason in ("accepted", "target_reached")
            record = self._emit(StepRecord(step=index, damping=self.damping, scale=self._record_scale(),
                                           forget_loss=forget_loss, retain_loss=retain_loss, accepted=accepted,
                                           reason=reason, trial=trial, target=target, forget_score=score))
            if accepted:
                self._accept()
                return record
            if applied:
                self._restore(snapshot)
            self._restore_state(extra)
            self._reject()
        assert record is not None
        return record

    def fit(
        self,
        forget_batches: Iterable[Batch],
        retain_batches: Iterable[Batch] | None = None,
        held_retain_batch: Batch | None = None,
        holdout_batches: Iterable[Batch] | None = None,
    ) -> list[StepRecord]:
        """The whole run: up to `steps` steps over all forget batches; stops early when the target is reached (see
        `calibrate`; `holdout_batches` set it), the retain budget is spent, or a step is rolled back after all
        retries. Sets `status` (warns with `NothingAcceptedWarning` when nothing was accepted) and returns every
        record of this run (rolled-back trials too)."""
        forget = _as_list(forget_batches)
        retain = _as_list(retain_batches)
        if not forget:
            raise ValueError("fit() needs at least one forget batch")
        check_finite_weights(self.model)
        for what, batches in (("forget", forget), ("retain", retain),
                              ("held retain", [held_retain_batch] if held_retain_batch is not None else []),
                              ("holdout", _as_list(holdout_batches))):
            check_batches(self.model, batches, what)
        if holdout_batches is not None:
            self.calibrate(holdout_batches)
        if held_retain_batch is None and retain:
            retain, held_retain_batch = held_out_retain(retain)
        self.check_holdout(forget, retain, held_retain_batch)
        start = len(self.history)
        self._begin_fit(forget, retain)
        self.require_measured_guard(held_retain_batch, retain)  # after the source's own checks (retain curvature)
        held = self._held(held_retain_batch, retain)
        score, nll = self.forget_score(forget)
        self._losses = {"forget_before": nll, "score_before": score,
                        "retain_before": self.reference_retain_loss(held) if held is not None else None}
        target = self.current_target()
        if target is not None and score >= target:
            self._status = "target_reached"  # nothing to do: the forget set already looks unseen
            self._losses.update(target=target, forget_after=nll, score_after=score,
                                retain_after=self._losses["retain_before"])
            return []
        for i in range(self.steps):
            self._before_step(i, forget, retain)
            step_retain = [retain[i % len(retain)]] if retain else []
            record = self.step(forget, step_retain, held)
            if not record.accepted or record.reason == "target_reached" or (
                    record.reason == "retain_budget" and self.stop_at_budget):
                break
        records = self.history[start:]
        self._losses["score_after"], self._losses["forget_after"] = self.forget_score(forget)
        self._losses["retain_after"] = self.measure(held) if held is not None else None
        self._finish(records, records[-1].target if records else target)
        return records


def clone_curvature(curvature: Curvature) -> Curvature:
    """A deep copy of a curvature's statistics that shares the model and the reduce/gather functions."""
    memo: dict[int, Any] = {id(curvature.model): curvature.model}
    for attr in ("reduce", "gather", "objective"):
        value = getattr(curvature, attr, None)
        if value is not None:
            memo[id(value)] = value
    return copy.deepcopy(curvature, memo)


#: the default recipe of the second-order methods (see `SecondOrderUnlearner`)
DEFAULT_RELATIVE_DAMPING = 0.1
DEFAULT_NEWTON_STEPS = 5


class SecondOrderUnlearner(Unlearner):
    """Methods with curvature: the damped Newton direction `d = (C + λI)^-1 (-∇U)` (U the forget objective to
    minimise; for `nll` this is `(C + λI)^-1 ∇L_forget`), on the parameters the curvature covers, and a step
    `η d` whose length η is searched.

    The default recipe (no knob set):
    - **scale-free damping**: `damping` is ρ = 0.1 relative to each layer's own curvature scale
      (`damping_mode="relative"`: λ_l = ρ · mean eigenvalue of layer l, see `Curvature.damping_scales`); with
      `damping_mode="absolute"` it is λ itself.
    - **a step search to the target**: the direction is computed once per step; η is found along it by
      bracketing (×4 / ÷4 from `scale`) and bisection in log space (`search_iters`), each point a forward pass over
      the forget set and the held retain batch. It takes the *smallest* η whose forget loss reaches the target
      (see `Unlearner.calibrate`) within the retain budget, or else the largest η within the budget. λ grows
      (×`damping_growth`) only when the direction is non-finite or no η makes progress.
    - **holdout protection** (`protect_holdout`, with holdout data): the direction is constrained to leave the
      holdout's losses in place to first order (`_direction`), so the step moves the forget set, not the whole kind
      of data.
    - **staged iteration**: `steps` steps (default 5), each with a new forget gradient (the curvature re-estimated
      every `refresh_every` steps, never by default); step k of K aims at the stage `s₀ + k/K (target − s₀)` of the
      forget score (s₀ its value when the run began), so the direction follows the forget set as it moves instead of
      one long step along the first gradient. A step that reaches the full target ends the run; `staged=False` aims
      every step at the full target. Measured on the demo's canaries (seed 0): staged, +0.09 % test perplexity at
      1.94 bits of exposure; one step, +1.23 % at 1.11 bits (the retrained model: 1.49 bits); on the tiny models of
      the tests, staged kept the held retain loss within +1.6 % where one step cost up to +4 %.
    - **retain-free guard**: without a held retain batch (e.g. `full_minus_forget` with no retain data), the
      retain budget is measured on the holdout and the step's predicted retain increase ½ΔᵀCΔ is bounded too;
      without holdout data either, `fit` refuses the request (`require_measured_guard`): a prediction alone is no
      bound.
    `step_search=False` gives the fixed step `scale · d` with Levenberg-Marquardt backtracking on λ.

    `curvature`: a finalized curvature is used as is; an unfinalized one (or None: built from `curvature_backend`
    and `curvature_kwargs`) is fitted by `fit()` on the `curvature_data` source: "retain" (retain batches),
    "forget" (forget batches) or "full_minus_forget" (`full_curvature`, a finalized checkpoint over the whole
    training data, minus a curvature of the forget batches; the checkpoint itself is not modified).
    """

    name = "second_order"

    def __init__(
        self,
        model: nn.Module,
        curvature: Curvature | None = None,
        *,
        curvature_backend: str = "kfac",
        curvature_data: str = "retain",
        full_curvature: Curvature | None = None,
        damping: float | None = None,
        damping_mode: str = "relative",
        scale: float = 1.0,
        steps: int = DEFAULT_NEWTON_STEPS,
        step_search: bool = True,
        staged: bool = True,
        protect_holdout: bool = True,
        protect_groups: int = 8,
        retain_repair: float = 0.0,
        reuse_protection: bool = False,
        stop_at_budget: bool = True,
        search_iters: int = 6,
        predicted_trust: float | None = DEFAULT_PREDICTED_TRUST,
        refresh_every: int | None = None,
        curvature_kwargs: Mapping[str, Any] | None = None,
        reduce: Reduce | None = None,
        gather: Reduce | None = None,
        **kw: Any,
    ) -> None:
        damping_mode = check_damping_mode(damping_mode)
        if damping is None:
            if damping_mode == "absolute":
                raise ValueError("damping_mode='absolute' needs damping=<λ>: absolute damping has no scale-free "
                                 "default; use damping_mode='relative' (the default, ρ = 0.1)")
            damping = DEFAULT_RELATIVE_DAMPING
        check_damping(damping)
        if not (math.isfinite(float(scale)) and float(scale) > 0):
            raise ValueError(f"scale must be a finite number > 0 (the first step length tried), got {scale}")
        super().__init__(model, damping=damping, scale=scale, reduce=reduce, steps=steps, **kw)
        curvature_backend = BACKEND_ALIASES.get(curvature_backend, curvature_backend)
        if curvature_backend not in CURVATURE_BACKENDS:
            raise ValueError(f"unknown curvature backend {curvature_backend!r}; choose one of "
                             f"{', '.join(CURVATURE_BACKENDS)}")
        if curvature_data not in CURVATURE_DATA:
            raise ValueError(f"unknown curvature_data {curvature_data!r}; choose one of {', '.join(CURVATURE_DATA)}")
        if curvature_data == "full_minus_forget":
            if full_curvature is None or not full_curvature.finalized:
                raise ValueError("curvature_data='full_minus_forget' needs full_curvature=<a finalized curvature over"
                                 " the whole training data> (e.g. a curvature checkpoint loaded with load_state_dict)")
        if refresh_every is not None and int(refresh_every) < 1:
            raise ValueError(f"refresh_every must be >= 1 or None, got {refresh_every}")
        if int(search_iters) < 0:
            raise ValueError(f"search_iters must be >= 0, got {search_iters}")
        if predicted_trust is not None and not (math.isfinite(float(predicted_trust)) and predicted_trust > 0):
            raise ValueError(f"predicted_trust must be a finite number > 0 or None, got {predicted_trust}")
        self.predicted_trust = None if predicted_trust is None else float(predicted_trust)
        self.curvature = curvature
        self.curvature_backend = curvature.name if curvature is not None else curvature_backend
        if full_curvature is not None and curvature is None:
            self.curvature_backend = full_curvature.name
        self.curvature_data = curvature_data
        self.full_curvature = full_curvature
        self.damping_mode = damping_mode
        self.step_search = bool(step_search)
        self.staged = bool(staged)
        self.protect_holdout = bool(protect_holdout)
        self.protect_groups = int(protect_groups)
        self.retain_repair = float(retain_repair)
        self.reuse_protection = bool(reuse_protection)
        self.stop_at_budget = bool(stop_at_budget)
        self._retain_gradient: Vector | None = None
        self._repair_data: list[Batch] = []
        self._repair_origin: Vector | None = None
        self._holdout_gradients: list[Vector] = []
        self.search_iters = int(search_iters)
        self._stage_origin = 0  # step_count when the current run began
        self._stage_start: float | None = None  # the forget loss when it began
        self.refresh_every = None if refresh_every is None else int(refresh_every)
        self.curvature_kwargs = dict(curvature_kwargs or {})
        self.gather = gather
        self._fixed_step_budget: float | None = None  # set during a fixed step (`step_search=False`)

    @property
    def param_names(self) -> tuple[str, ...]:
        if self.curvature is None:
            raise RuntimeError(f"{self.name}: no curvature yet; pass curvature=<finalized curvature>, call "
                               "fit_curvature(batches) or use fit(forget_batches, retain_batches)")
        return tuple(self.curvature.param_names)

    def _new_curvature(self) -> Curvature:
        kwargs = dict(self.curvature_kwargs)
        kwargs.setdefault("reduce", self.reduce)
        if self.gather is not None:
            kwargs.setdefault("gather", self.gather)
        return build_curvature(self.curvature_backend, self.model, **kwargs)

    def fit_curvature(self, batches: Iterable[Batch]) -> Curvature:
        """Accumulate and finalize the curvature on `batches` (the chosen source's data: retain batches, or forget
        batches for "forget" and "full_minus_forget"), at the current weights. Returns the finalized curvature."""
        batches = _as_list(batches)
        if not batches:
            raise ValueError(f"fit_curvature() got no batch; curvature_data={self.curvature_data!r} needs "
                             f"{'retain' if self.curvature_data == 'retain' else 'forget'} batches")
        if self.curvature_data == "full_minus_forget":
            assert self.full_curvature is not None
            forget_curvature = self._new_curvature().fit(batches)
            curvature = clone_curvature(self.full_curvature).subtract(forget_curvature)
        else:
            curvature = self.curvature if self.curvature is not None else self._new_curvature()
            if curvature.finalized:
                curvature.reset()
            curvature.fit(batches)
        self.curvature = curvature
        return curvature

    def _source(self, forget: Sequence[Batch], retain: Sequence[Batch]) -> list[Batch]:
        if self.curvature_data == "retain":
            if not retain:
                raise ValueError("curvature_data='retain' needs retain batches; pass retain_batches, a finalized "
                                 "curvature=, or use curvature_data='full_minus_forget' with a curvature checkpoint")
            return list(retain)
        return list(forget)

    def _begin_fit(self, forget: Sequence[Batch], retain: Sequence[Batch]) -> None:
        self._stage_origin, self._stage_start = self.step_count, None
        self._holdout_gradients = []  # the protection is computed at the first step of every run
        self._repair_data, self._repair_origin = list(retain), None
        if self.curvature is None or not self.curvature.finalized:
            self.fit_curvature(self._source(forget, retain))

    def stage_target(self, target: float | None, forget_loss: float) -> float | None:
        """What the current step aims at: stage k/K of the way from the run's first forget loss to `target`."""
        if self._stage_start is None:
            self._stage_start = forget_loss
        if target is None or not self.staged:
            return target
        fraction = min(1.0, (self.step_count - self._stage_origin) / self.steps)
        aim = self._stage_start + fraction * (target - self._stage_start)
        return target if forget_loss >= aim else aim

    def _before_step(self, index: int, forget: Sequence[Batch], retain: Sequence[Batch]) -> None:
        if self.refresh_every is not None and index > 0 and index % self.refresh_every == 0:
            self.fit_curvature(self._source(forget, retain))

    def named_params(self) -> dict[str, nn.Parameter]:
        # the curvature may have unwrapped the model (e.g. a PEFT wrapper): use its parameter names
        assert self.curvature is not None or not self.param_names
        params = dict(self.curvature.model.named_parameters())  # type: ignore[union-attr]
        return {n: params[n] for n in self.param_names}

    def newton_direction(self, gradient: Mapping[str, Tensor], damping: float | None = None) -> Vector:
        """`(C + λI)^-1 g` for a gradient dict over `param_names` (λ relative or absolute per `damping_mode`)."""
        assert self.curvature is not None
        lam = self.damping if damping is None else damping
        return self.curvature.apply({n: gradient[n] for n in self.param_names}, lam, -1.0, mode=self.damping_mode)

    def _prepare(self, forget: Sequence[Batch], retain: Sequence[Batch]) -> Any:
        if self.curvature is None or not self.curvature.finalized:
            raise RuntimeError(f"{self.name}: the curvature is not fitted; call fit_curvature(batches) first or "
                               "use fit(), which fits it on the curvature_data source")
        if not (self.protect_holdout and self.holdout):
            self._holdout_gradients = []
        elif not self._holdout_gradients or not self.reuse_protection:
            self._holdout_gradients = self.holdout_gradients()
        if self.retain_repair and self._repair_data:
            g = self.forget_gradient(self._repair_data, kind="nll")
            if self._repair_origin is None:
                self._repair_origin = g
            self._retain_gradient = {n: g[n] - self._repair_origin[n] for n in g}
        return self.forget_gradient(forget)

    def holdout_gradients(self) -> list[Vector]:
        """`∇` of the mean token NLL of up to `protect_groups` groups of holdout examples (example i in group
        i mod k of its batch), each reduced across processes: the constraints of `_direction`."""
        k = self.protect_groups
        groups = []
        for j in range(k):
            batches = []
            for b in self.holdout:
                rows = torch.arange(int(b["input_ids"].shape[0]))
                keep = rows[rows % k == j]
                if len(keep):
                    batches.append({key: (v[keep] if isinstance(v, Tensor) and v.shape[:1] == rows.shape else v)
                                    for key, v in b.items()})
            if batches:
                groups.append(batches)
        return [self.forget_gradient(g, kind="nll") for g in groups]

    def _direction(self, context: Any) -> Vector:
        """The search direction for the current damping: the Newton direction, with holdout data (and
        `protect_holdout`) constrained to leave the holdout loss unchanged to first order.

        Unlearning a template's secrets also lowers the likelihood of *every* secret of that template (the retain
        curvature does not see the template, so nothing holds it), and privacy is relative: a canary's exposure is
        its rank among all candidates. So the step is `d = d_f - α d_h` with `d_f = (C + λI)⁻¹ g_f`,
        `d_h = (C + λI)⁻¹ ∇L_holdout` and `α = ∇L_holdoutᵀ d_f / ∇L_holdoutᵀ d_h`: the most forgetting in the
        curvature's metric among steps that leave the holdout (the level "never seen") where it is. With
        `protect_groups=k` there are k such constraints (the holdout split in k groups), `α` solving a k × k system:
        the holdout's losses stay in place group by group, not only on average. A backend with a one-solve form of
        this (`constrained_inverse`: CG's projected solve) computes it in one solve instead of k + 1."""
        constrained = getattr(self.curvature, "constrained_inverse", None)
        if self._holdout_gradients and constrained is not None:
            return constrained({n: context[n] for n in self.param_names},
                               [{n: h[n] for n in self.param_names} for h in self._holdout_gradients],
                               self.damping, mode=self.damping_mode)
        direction = self.newton_direction(context)
        hs = self._holdout_gradients
        if not hs:
            return direction
        names = list(direction)

        def flat(v: Mapping[str, Tensor]) -> Tensor:
            return torch.cat([v[n].reshape(-1).double().cpu() for n in names])

        ds = [self.newton_direction(h) for h in hs]
        H, D = torch.stack([flat(h) for h in hs], 1), torch.stack([flat(d) for d in ds], 1)  # [p, k]
        gram = H.T @ D  # [k, k], Hᵀ(C + λI)⁻¹H: symmetric positive definite
        rhs = H.T @ flat(direction)
        alpha = torch.linalg.lstsq(gram + 1e-12 * gram.diagonal().mean() * torch.eye(len(hs), dtype=gram.dtype),
                                   rhs[:, None]).solution[:, 0]
        if not bool(torch.isfinite(alpha).all()):
            return direction
        out = {}
        for n in names:
            correction = sum(float(a) * d[n].double() for a, d in zip(alpha, ds))
            out[n] = (direction[n].double() - correction).to(direction[n].dtype)
        return out

    def _offset(self, context: Any) -> Vector | None:
        """A fixed part of the update that does not scale with η (Fisher Forgetting's noise); None here."""
        return None

    def _full_offset(self, context: Any) -> Vector | None:
        """`_offset` plus the retain repair `-retain_repair · (C + λI)⁻¹ ∇L_retain` (None when neither applies)."""
        offset = self._offset(context)
        if self._retain_gradient is None:
            return offset
        repair = self.newton_direction(self._retain_gradient)
        repair = {n: -self.retain_repair * r for n, r in repair.items()}
        if offset is None:
            return repair
        return {n: repair[n] + offset[n].to(repair[n].dtype) for n in repair}

    def _propose(self, context: Any) -> Vector:
        direction = self._direction(context)
        update = {n: self.scale * d for n, d in direction.items()}
        offset = self._full_offset(context)
        if offset is not None:
            update = {n: update[n] + offset[n].to(update[n].dtype) for n in update}
        return update

    # ------------------------------------------------------------------ the step search
    def step(
        self,
        forget_batch: Batch | Sequence[Batch],
        retain_batch: Batch | Sequence[Batch] | None = None,
        held_retain_batch: Batch | None = None,
    ) -> StepRecord:
        """One Newton step with the step-length search (see the class docstring); `step_search=False`: the fixed
        step `scale · d` under the base class's rollback rule."""
        if not self.step_search:
            held = self._held(held_retain_batch, _as_list(retain_batch))
            reference = self.reference_retain_loss(held) if held is not None else None
            self._fixed_step_budget = self._predicted_budget(held, reference)
            try:
                return super().step(forget_batch, retain_batch, held_retain_batch)
            finally:
                self._fixed_step_budget = None
        forget, retain, held, reference, target, context, index = self._begin_step(
            forget_batch, retain_batch, held_retain_batch)
        forget_before = self.forget_score(forget)
        aim = self.stage_target(target, forget_before[0])
        predicted_budget = self._predicted_budget(held, reference)
        record: StepRecord | None = None
        for trial in range(self.max_retries + 1):
            direction = self._direction(context)
            offset = self._full_offset(context)
            if not all(bool(torch.isfinite(d).all()) for d in direction.values()):
                record = self._emit(StepRecord(step=index, damping=self.damping, scale=float("nan"),
                                               forget_loss=float("nan"), retain_loss=None, accepted=False,
                                               reason="non_finite", trial=trial, target=target, evaluations=0))
                self._reject()
                continue
            curvature_norm = self.curvature.quadratic(direction) if predicted_budget is not None else None
            search = _LineSearch(self, direction, offset, forget, held, reference, aim, forget_before,
                                 predicted_budget, curvature_norm)
            eta, point, reason = search.run(min(self.scale, self._largest_trusted_step(direction, predicted_budget,
                                                                                     curvature_norm)),
                                            self.search_iters)
            if reason == "target_reached" and target is not None and point[0][0] < target:
                reason = "accepted"  # this step's stage, not yet the target
            if eta is not None:
                search.apply(eta)
                predicted = None if curvature_norm is None else 0.5 * eta**2 * curvature_norm
                record = self._emit(StepRecord(step=index, damping=self.damping, scale=eta,
                                               forget_loss=point[0][1], retain_loss=point[1], accepted=True,
                                               reason=reason, trial=trial, target=target,
                                               evaluations=search.evaluations, predicted_increase=predicted,
                                               forget_score=point[0][0]))
                self.scale = eta  # the next step's search starts where this one ended
                return record
            search.restore()
            record = self._emit(StepRecord(step=index, damping=self.damping, scale=float(self.scale),
                                           forget_loss=point[0][1], retain_loss=point[1], accepted=False,
                                           reason=reason, trial=trial, target=target,
                                           evaluations=search.evaluations, forget_score=point[0][0]))
            self._reject()
        assert record is not None
        return record


    def _predicted_budget(self, held: Batch | None, reference: float | None) -> float | None:
        """The bound on the curvature's predicted retain increase ½ΔᵀCΔ (nats) of one step: the guard itself without
        a held retain batch (the retain budget in nats, `retain_budget_nats`), a trust region (`predicted_trust` ×
        the budget) with one, when C is a retain curvature; None where neither applies."""
        if self.max_retain_increase is None:
            return None
        if held is None:
            return retain_budget_nats(self.max_retain_increase)
        if self.predicted_trust is not None and reference is not None and self.curvature_data != "forget":
            return self.predicted_trust * retain_budget_nats(self.max_retain_increase, reference)
        return None

    def outside_trust_region(self, snapshot: Mapping[str, Tensor]) -> bool:
        """The base class's bound on ‖Δθ‖ and, for the fixed step, the bound on ½ΔᵀCΔ (`_predicted_budget`)."""
        if super().outside_trust_region(snapshot):
            return True
        budget = self._fixed_step_budget
        if budget is None or self.curvature is None:
            return False
        params = self.named_params()
        delta = {n: (params[n].detach().float() - s.float()) for n, s in snapshot.items()}
        return 0.5 * self.curvature.quadratic(delta) > budget

    def _largest_trusted_step(self, direction: Vector, predicted_budget: float | None,
                              curvature_norm: float | None) -> float:
        """The largest η inside both trust regions, where they bound it: ½η²dᵀCd ≤ the predicted budget and
        η‖d‖ ≤ max_step_norm · ‖θ‖ (the search starts there when `scale` is larger)."""
        largest = math.inf
        if predicted_budget is not None and curvature_norm is not None and curvature_norm > 0:
            largest = math.sqrt(2.0 * predicted_budget / curvature_norm)
        if self.max_step_norm is not None:
            size = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in self.named_params().values()))
            length = math.sqrt(sum(float(d.double().pow(2).sum()) for d in direction.values()))
            if length > 0 and size > 0:
                largest = min(largest, self.max_step_norm * size / length)
        return largest


class _LineSearch:
    """Step lengths η along a fixed direction: θ(η) = θ₀ + offset + η d, each point one forward pass over the forget
    set and the held retain batch (no gradient, no curvature). See `SecondOrderUnlearner`."""

    growth = 4.0
    max_bracket = 12

    def __init__(self, owner: SecondOrderUnlearner, direction: Vector, offset: Vector | None,
                 forget: Sequence[Batch], held: Batch | None, reference: float | None, target: float | None,
                 forget_before: tuple[float, float], predicted_budget: float | None,
                 curvature_norm: float | None) -> None:
        self.owner, self.direction, self.offset = owner, direction, offset
        self.forget, self.held, self.reference, self.target = forget, held, reference, target
        self.forget_before = forget_before
        self.predicted_budget, self.curvature_norm = predicted_budget, curvature_norm
        self.snapshot = owner._snapshot()
        self.evaluations = 0
        #: η -> ((forget score, forget loss), retain loss, within budget, target reached); scores compare first,
        #: the loss breaks ties (a score stuck at 0 still shows progress)
        self.points: dict[float, tuple[tuple[float, float], float | None, bool, bool]] = {}
        self.refused: set[float] = set()  # step lengths outside the trust region

    def apply(self, eta: float) -> None:
        params = self.owner.named_params()
        with torch.no_grad():
            for n, s in self.snapshot.items():
                update = eta * self.direction[n].to(device=s.device, dtype=torch.float32)
                if self.offset is not None:
                    update = update + self.offset[n].to(device=s.device, dtype=torch.float32)
                params[n].copy_((s.float() + update).to(s.dtype))

    def restore(self) -> None:
        self.owner._restore(self.snapshot)

    def evaluate(self, eta: float) -> tuple[tuple[float, float], float | None, bool, bool]:
        """((forget score, forget loss), retain loss, within budget, target reached) at η (cached)."""
        if eta in self.points:
            return self.points[eta]
        self.evaluations += 1
        owner = self.owner
        if self.predicted_budget is not None and 0.5 * eta**2 * float(self.curvature_norm) > self.predicted_budget:
            nan = float("nan")
            point = ((nan, nan), None, False, False)  # outside the curvature's trust region: not even tried
            self.refused.add(eta)
        else:
            self.apply(eta)
            if owner.outside_trust_region(self.snapshot):
                nan = float("nan")
                point = ((nan, nan), None, False, False)  # moved the weights too far: not even measured
                self.refused.add(eta)
                self.points[eta] = point
                return point
            forget = owner.forget_score(self.forget)
            retain = owner.measure(self.held) if self.held is not None else None
            finite = all(map(math.isfinite, forget)) and (retain is None or math.isfinite(retain))
            finite = finite and all(bool(torch.isfinite(p).all()) for p in owner.named_params().values())
            ok = finite and not (self.reference is not None and retain is not None
                                 and over_retain_budget(retain, self.reference, owner.max_retain_increase))
            reached = ok and self.target is not None and forget[0] >= self.target
            point = (forget, retain, ok, reached)
        self.points[eta] = point
        return point

    def run(self, start: float, iters: int) -> tuple[float | None, tuple[float, float | None], str]:
        """(chosen η or None, its (forget, retain) losses, reason); an error (or Ctrl-C) during the search restores
        the weights of before the search (a point that was tried is never kept unless chosen)."""
        try:
            return self._search(start, iters)
        except BaseException:
            self.restore()
            raise

    def _search(self, start: float, iters: int) -> tuple[float | None, tuple[float, float | None], str]:
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
        reached_points = [e for e, p in self.points.items() if p[3]]
        if reached_points:
            best = min(reached_points)
            forget, retain, _, _ = self.points[best]
            return best, (forget, retain), "target_reached"
        ok_points = [e for e, p in self.points.items() if p[2]]
        if ok_points:
            best = max(ok_points, key=lambda e: self.points[e][0])
            forget, retain, _, _ = self.points[best]
            if forget > self.forget_before:
                # a larger step was out of the retain budget: this step spends it
                spent = any(not p[2] and e > best and e not in self.refused for e, p in self.points.items())
                return best, (forget, retain), "retain_budget" if spent else "accepted"
        nan = float("nan")
        probe = self.points.get(lo if lo is not None else hi, ((nan, nan), None, False, False))  # type: ignore[arg-type]
        failed = [p for p in self.points.values() if not math.isfinite(p[0][1])]
        if self.refused and len(self.refused) == len(self.points):
            reason = "trust_region"
        elif failed and len(failed) == len(self.points):
            reason = "non_finite"
        else:
            reason = "retain_increase" if not ok_points else "no_progress"
        return None, (probe[0], probe[1]), reason


METHODS: dict[str, type[Unlearner]] = {}


def register(name: str) -> Callable[[type[Unlearner]], type[Unlearner]]:
    """Class decorator adding a method to `METHODS` under `name`."""

    def wrap(cls: type[Unlearner]) -> type[Unlearner]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def check_method_settings(method: str, settings: Mapping[str, Any] | None = None) -> type[Unlearner]:
    """The class of `method`, after checking that it exists and accepts every key of `settings` (a driver's
    `method_kwargs`): drivers call it when they are built, so a typo fails before any work."""
    from . import first_order, fisher, newton  # noqa: F401  (registration)

    if method not in METHODS:
        raise ValueError(f"unknown unlearning method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    check_keywords(METHODS[method], settings or {}, f"method {method!r}")
    return METHODS[method]


def is_second_order(method: str) -> bool:
    """Whether the method named `method` uses curvature (a `SecondOrderUnlearner`); raises naming the choices for an
    unknown one. The one list of second-order methods: the registry itself."""
    return issubclass(check_method_settings(method), SecondOrderUnlearner)


def second_order_methods() -> tuple[str, ...]:
    """The names of the registered methods that use curvature, sorted."""
    check_method_settings("newton")  # registration
    return tuple(sorted(name for name, cls in METHODS.items() if issubclass(cls, SecondOrderUnlearner)))


def build_unlearner(method: str, model: nn.Module, **kwargs: Any) -> Unlearner:
    """Construct the method named `method` (a key of `METHODS`) for `model`."""
    return check_method_settings(method, kwargs)(model, **kwargs)
