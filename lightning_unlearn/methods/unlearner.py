"""The unlearning engine's run protocol: trial update, safety check, target, status, decision log.

    unlearner = build_unlearner("newton", model)            # the default recipe: K-FAC, relative damping
    records = unlearner.fit(forget_batches, retain_batches, holdout_batches=holdout_batches)
    unlearner.status       # "target_reached" | "budget_exhausted" | "nothing_accepted"
    unlearner.summary()    # status, target, steps, losses before and after (numbers only)

A run is `begin` (checks, curvature, the losses before; it may find the target already met), then `step` until
`should_stop`, then `finish` (the losses after, the status, the warnings of `records.warn_how_it_ended`).
`fit` is that loop; `UnlearningModule` runs the same protocol with Lightning driving the steps.

Every method proposes an update from the forget data; `step` applies it as a *trial*: the held retain loss and the
forget loss are measured, and the trial is rolled back (weights restored bit for bit from a copy) when anything is
non-finite, the step left the trust region (`trust_region`), or the held retain loss spent the retain budget
(`target`). After a rollback the damping grows (×`damping_growth`) and the step is retried, at most `max_retries`
times; after a success it shrinks back towards its initial value. Every trial is one `StepRecord` in `history` and
is passed to `log`. The target (`calibrate`, a holdout of the forget set's kind) is explained in `target`;
what a run measures (losses, the forget score, the retain budget's batches) is `measures.RunMeasures`.

Losses are the mean token NLL over positions with labels != -100 (the span, for span-level forgetting); sums and
counts go through `reduce` (a cross-process sum, identity by default) so that every process takes the same
decision. Torch only: drivers (Lightning, Fabric) inject `reduce`/`gather`.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature.base import Reduce, Vector, eval_mode, identity
from ..curvature.layers import unwrap_model
from .inputs import (
    all_finite,
    check_batches,
    check_finite_weights,
    check_gradients_allowed,
    check_sets,
    check_settings,
)
from .losses import DEFAULT_FORGET_LOSS, check_forget_loss, forget_objective, gradient_sum, labelled_rows
from .measures import RunMeasures
from .records import (
    Batch,
    RunTrustRegionWarning,
    StepRecord,
    as_batches,
    run_status,
    stops_run,
    summarize,
    trial_reason,
    warn_how_it_ended,
)
from .score_memo import ScoreMemo
from .target import held_out_retain, over_retain_budget
from .trust_region import DEFAULT_MAX_STEP_NORM, RunPath, exceeds_step_norm, sized_squares, step_length


class Unlearner(RunMeasures, ABC):
    """Base of every method: trial update -> safety check -> accept or roll back, logged.

    Subclasses implement `param_names` (what they update), `_prepare` (work done once per step, e.g. the forget
    gradient) and `_propose` (the update for the current damping, from the prepared context), or override
    `_apply_trial` for updates made by a torch optimizer.
    """

    name: str = "unlearner"
    #: whether a step that spends the retain budget ends the run (second-order methods make it a setting)
    stop_at_budget: bool = True
    #: steps `fit` may take after `steps` while the last one fell short of its aim with nothing else stopping the run
    final_repeats: int = 0

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
        check_settings(steps=steps, damping_growth=damping_growth, max_retries=max_retries,
                       max_retain_increase=max_retain_increase, max_step_norm=max_step_norm, damping=damping,
                       scale=scale, target_score=target_score, forget_target=forget_target, forget_loss=forget_loss)
        self.model = unwrap_model(model)  # the engine's names are the model's own (see curvature.layers.unwrap_model)
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
        self._reference: tuple[Batch | list[Batch], float] | None = None
        self.holdout: list[Batch] = []
        self.holdout_loss: float | None = None  # the holdout's mean token NLL before unlearning
        self._holdout_hist: Tensor | None = None  # its per-example losses before unlearning, as a histogram
        self.relative_target = bool(relative_target)
        self.target_score = float(target_score)
        self.target_source = "forget_target" if forget_target is not None else "none"
        self._status: str | None = None
        self._run_start = 0  # index in `history` of the current run's first record
        self._path: RunPath | None = None  # the run's trust region (set by `begin`; None: steps outside a run)
        #: the tensors the norm trust region leaves out for the run: no nonzero entry at its start (`trust_region`)
        self.trust_free: frozenset[str] = frozenset()
        self._losses: dict[str, float | None] = {}
        self._score_memo = ScoreMemo()

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
        """Hook at the start of a run (curvature fitting)."""
        return None

    def refresh_due(self, index: int) -> bool:
        """Whether the run's step `index` starts by re-estimating the curvature (never for first-order methods)."""
        return False

    def _before_step(self, index: int, forget: Sequence[Batch], retain: Sequence[Batch]) -> None:
        """Hook before step `index` of `fit` (curvature refresh)."""
        return None

    def _record_scale(self) -> float:
        return self.scale

    # ------------------------------------------------------------------ helpers
    def named_params(self) -> dict[str, nn.Parameter]:
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.param_names}

    def forget_gradient(self, forget: Sequence[Batch], kind: str | None = None,
                        example_weights: Tensor | None = None) -> Vector:
        """`-∇ U` over `param_names` (U the forget objective to minimise, `kind` or `forget_loss`): the direction
        that forgets, averaged over the batches by their weights (positions or examples) and reduced across
        processes. `kind="nll"` gives `+∇` of the mean token NLL. `example_weights`: one per labelled example of
        this process's batches, in order (`losses.forget_objective`'s `weights`)."""
        params = self.named_params()
        plist = list(params.values())
        start = 0

        def objective(batch: Batch) -> tuple[Tensor, int]:
            nonlocal start
            weights = None
            if example_weights is not None:
                n = labelled_rows(batch)
                weights, start = example_weights[start:start + n], start + n
            return forget_objective(self.model, batch, kind or self.forget_loss, plist, weights)

        with torch.enable_grad(), eval_mode(self.model):
            grads, weight = gradient_sum(forget, objective, params)
        total = float(self.reduce(torch.tensor(weight, dtype=torch.float64)))
        if total <= 0:
            raise ValueError("the forget batches have no position with labels != -100; nothing to forget")
        # 0 - Σ: bit for bit the sum of the negated terms (-∇U is the direction that forgets)
        return {n: (self.reduce(0.0 - g) / total).to(params[n].dtype) for n, g in grads.items()}

    def _snapshot(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.named_params().items()}

    def outside_trust_region(self, snapshot: Mapping[str, Tensor]) -> bool:
        """Whether the current weights moved further from `snapshot` than the trust region allows
        (`trust_region`): this step alone, or the run's steps together (`RunPath`)."""
        params = self.named_params()
        squares = sized_squares(snapshot, self.trust_free)
        length = step_length((params[n], snapshot[n]) for n in squares)
        return self.step_leaves_trust_region(length, math.sqrt(sum(squares.values())))

    def step_leaves_trust_region(self, length: float, start_norm: float) -> bool:
        """`outside_trust_region` for a step of known `length` from weights of norm `start_norm`."""
        if exceeds_step_norm(length, start_norm, self.max_step_norm):
            return True
        return self._path is not None and self._path.exceeded_by(length)

    def _count_step(self, snapshot: Mapping[str, Tensor]) -> None:
        """An accepted step from `snapshot`: its length goes on the run's path."""
        if self._path is not None:
            params = self.named_params()
            self._path.add(step_length((params[n], s) for n, s in snapshot.items() if n not in self.trust_free))

    def path_remaining(self) -> float:
        """The length the run's trust region leaves to its steps (inf outside a run or without a bound)."""
        return math.inf if self._path is None else self._path.remaining()

    def _restore(self, snapshot: Mapping[str, Tensor]) -> None:
        params = self.named_params()
        with torch.no_grad():
            for n, s in snapshot.items():
                params[n].copy_(s)

    def _apply_trial(self, context: Any) -> bool:
        """Apply the trial update in place; False (nothing applied) when the update is non-finite."""
        update = self._propose(context)
        if not all_finite(update.values()):
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

    # ------------------------------------------------------------------ one step
    def _begin_step(self, forget_batch: Batch | Sequence[Batch], retain_batch: Batch | Sequence[Batch] | None,
                    held_retain_batch: Batch | None) -> tuple[list[Batch], list[Batch], Batch | list[Batch] | None,
                                                              float | None, float | None, Any, int]:
        """What every step starts from: (forget, retain, the budget's batches, their reference loss, target, the
        prepared context, the step's index)."""
        forget = as_batches(forget_batch)
        retain = as_batches(retain_batch)
        if not forget:
            raise ValueError("step() needs at least one forget batch")
        for what, batches in (("forget", forget), ("retain", retain)):
            check_batches(self.model, batches, what)
        held = self.budget_batches(held_retain_batch, retain)
        reference = self.reference_retain_loss(held) if held is not None else None
        target = self.current_target()
        context = self._prepare(forget, retain)
        index = self.step_count
        self.step_count += 1
        return forget, retain, held, reference, target, context, index

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
                finite = all_finite(self.named_params().values())
            reason = trial_reason(
                finite=finite, outside_trust_region=finite and self.outside_trust_region(snapshot),
                over_budget=(reference is not None and retain_loss is not None
                             and over_retain_budget(retain_loss, reference, self.max_retain_increase)),
                target_reached=target is not None and score >= target)
            accepted = reason in ("accepted", "target_reached")
            record = StepRecord(step=index, damping=self.damping, scale=self._record_scale(),
                                forget_loss=forget_loss, retain_loss=retain_loss, accepted=accepted, reason=reason,
                                trial=trial, target=target, forget_score=score)
            if accepted:
                self._count_step(snapshot)
                self._emit(record)
                self._accept()
                return record
            # undone before the record goes out: a `log` that raises (or Ctrl-C in it) leaves the weights of before
            if applied:
                self._restore(snapshot)
            self._restore_state(extra)
            self._emit(record)
            self._reject()
        assert record is not None
        return record

    # ------------------------------------------------------------------ the run
    def begin(self, forget: Sequence[Batch], retain: Sequence[Batch] = (),
              held_retain_batch: Batch | None = None) -> bool:
        """Start a run (after `calibrate`): check the holdout, fit the curvature, refuse a run with nothing to
        measure the damage on, measure the losses before. True when the target is already met: the run is then
        over ("target_reached"), with nothing to do."""
        forget, retain = as_batches(forget), as_batches(retain)
        self.check_holdout(forget, retain, held_retain_batch)
        self._run_start, self._status = len(self.history), None
        self._reference = None  # each run reads its own budget baseline (a second fit starts from the first's end)
        self._path, self.trust_free = None, frozenset()
        self._begin_fit(forget, retain)
        start = self.named_params()
        squares = sized_squares(start)
        self.trust_free = frozenset(start) - squares.keys()
        self._path = RunPath(math.sqrt(sum(squares.values())), self.max_step_norm)
        self.require_measured_guard(held_retain_batch, retain)  # after the source's own checks (retain curvature)
        held = self.budget_batches(held_retain_batch, retain)
        score, nll = self.forget_score(forget)
        self._losses = {"forget_before": nll, "score_before": score,
                        "retain_before": self.reference_retain_loss(held) if held is not None else None}
        target = self.current_target()
        self._losses["target"] = target
        if target is not None and score >= target:
            self._status = "target_reached"  # nothing to do: the forget set already looks unseen
            self._losses.update(forget_after=nll, score_after=score, retain_after=self._losses["retain_before"])
            return True
        return False

    def should_stop(self, record: StepRecord) -> bool:
        """Whether the step that gave `record` ends the run (`records.stops_run`), or the run's steps have used its
        trust region (`trust_region.RunPath`, with a `RunTrustRegionWarning`)."""
        return stops_run(record, self.stop_at_budget) or self.run_path_spent()

    def run_path_spent(self) -> bool:
        """Whether the run's steps have used its trust region (`trust_region.RunPath`); warns when they have."""
        if self._path is not None and self._path.spent():
            warnings.warn(self._path.spent_message(self.name), RunTrustRegionWarning, stacklevel=2)
            return True
        return False

    def step_due(self, index: int, record: StepRecord | None) -> bool:
        """Whether the run takes its step `index` (0-based) after the step that gave `record`: one of its `steps`, or
        a repeat of the last stage (`repeats_last_stage`) while `final_repeats` remain. `fit`'s loop, and a driver's
        whose steps another loop drives (`UnlearningModule`)."""
        if index >= self.steps + self.final_repeats:
            return False
        return index < self.steps or self.repeats_last_stage(record)

    def limit_steps(self, most: int | None) -> None:
        """Fit the run into `most` steps (a driver's cap, e.g. Lightning's `max_steps`; None: no cap): at most `most`
        staged steps, then the repeats that are left. Call it after `begin`, which sets the regime's steps."""
        if most is None:
            return
        self.steps = min(self.steps, int(most))
        self.final_repeats = max(0, min(self.final_repeats, int(most) - self.steps))

    def repeats_last_stage(self, record: StepRecord | None) -> bool:
        """Whether `fit` takes one more step (of `final_repeats`) after the step that gave `record`: it was accepted
        short of its aim with nothing else to say (not the target, not the retain budget, not a rollback)."""
        return record is not None and record.accepted and record.reason == "accepted"

    @property
    def run_records(self) -> list[StepRecord]:
        """Every record of the current (or last) run, rolled-back trials too."""
        return self.history[self._run_start:]

    def finish(self, forget: Sequence[Batch], retain: Sequence[Batch] = (),
               held_retain_batch: Batch | None = None) -> str:
        """End a run: measure the losses after, set `status` and warn where it needs the user
        (`records.warn_how_it_ended`). Returns the status."""
        if self._status == "target_reached" and not self.run_records:  # `begin` found nothing to do
            return self._status
        records = self.run_records
        held = self.budget_batches(held_retain_batch, as_batches(retain))
        self._losses["score_after"], self._losses["forget_after"] = self.forget_score(as_batches(forget))
        self._losses["retain_after"] = self._score_memo.held_loss(self, held) if held is not None else None
        self._score_memo.clear()  # let the forget and held batches go
        if records:
            self._losses["target"] = records[-1].target
        self._status = run_status(records) or "nothing_accepted"
        warn_how_it_ended(self.name, self._status, len(records),
                          budget_on_holdout=held is not None and held is self.holdout)
        return self._status

    @property
    def status(self) -> str | None:
        """How the run ended: "target_reached", "budget_exhausted" or "nothing_accepted"; during a run, how it
        would end now (None before its first step)."""
        if self._status is not None:
            return self._status
        return run_status(self.run_records)

    def summary(self) -> dict[str, Any]:
        """Numbers only (`records.SUMMARY_FIELDS`) of the current (or last) run: status, target and where it came
        from, steps accepted, losses before and after, and whether the knowledge regime ran (second-order methods;
        None for the others)."""
        losses = self._losses
        return summarize(self.run_records, self.status, target=losses.get("target"),
                         target_source=self.target_source, holdout_loss=self.holdout_loss,
                         forget_score_before=losses.get("score_before"), forget_score_after=losses.get("score_after"),
                         forget_loss_before=losses.get("forget_before"), forget_loss_after=losses.get("forget_after"),
                         retain_loss_before=losses.get("retain_before"), retain_loss_after=losses.get("retain_after"),
                         knowledge_regime=getattr(self, "knowledge_regime", None))

    def fit(
        self,
        forget_batches: Iterable[Batch],
        retain_batches: Iterable[Batch] | None = None,
        *,
        held_retain_batch: Batch | None = None,
        holdout_batches: Iterable[Batch] | None = None,
    ) -> list[StepRecord]:
        """The whole run: `begin`, up to `steps` (+ `final_repeats`) steps until `should_stop`, `finish`.
        `holdout_batches` set the target (`calibrate`); without `held_retain_batch` the last of two or more retain
        batches is held out for the budget (`target.held_out_retain`). Returns this run's records (rollbacks too).
        Both are keywords: `serve_request` takes the holdout third, and a holdout batch given here third would be
        read as the held retain batch, a run without a target and without a word."""
        forget = as_batches(forget_batches)
        retain = as_batches(retain_batches)
        holdout = as_batches(holdout_batches) if holdout_batches is not None else None  # read once: may be an iterator
        if not forget:
            raise ValueError("fit() needs at least one forget batch")
        check_gradients_allowed("fit()")
        check_finite_weights(self.model)
        check_sets(self.model, {"forget": forget, "retain": retain, "held retain": as_batches(held_retain_batch),
                                "holdout": holdout or []}, self.reduce)
        if holdout is not None:
            self.calibrate(holdout)
        if held_retain_batch is None and retain:
            retain, held_retain_batch = held_out_retain(retain)
        if self.begin(forget, retain, held_retain_batch):
            return []
        held, record = self.budget_batches(held_retain_batch, retain), None
        for i in range(self.steps + self.final_repeats):
            if not self.step_due(i, record):
                break
            self._before_step(i, forget, retain)
            record = self.step(forget, [retain[i % len(retain)]] if retain else [], held)
            if self.should_stop(record):
                break
        self.finish(forget, retain, held_retain_batch)
        return self.run_records
