"""What a run measures (a mixin of `Unlearner`): losses (mean token NLL, per example, reduced across processes), the
forget score against the holdout (`target`), the target and where it comes from (`calibrate`), the batches the retain
budget is measured on and their reference loss, and the holdout's checks before the first step (`holdout`).

It reads what the host sets: `name`, `model`, `reduce`, `holdout`, `holdout_loss`, `_holdout_hist`,
`forget_target`, `relative_target`, `target_score`, `target_source`, `max_retain_increase`, `_reference` and the
score memo.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..curvature.base import Reduce, identity
from ..errors import UserInputError
from . import holdout as holdout_checks
from .inputs import vocabulary_size
from .losses import example_losses, example_losses_joined
from .records import Batch, as_batches
from .score_memo import ScoreMemo
from .target import forget_score, holdout_histogram


class RunMeasures:
    """Losses, the forget score, the target and the retain budget's batches of a run (see the module docstring)."""

    name: str
    model: nn.Module
    reduce: Reduce
    holdout: list[Batch]
    holdout_loss: float | None
    _holdout_hist: Tensor | None
    forget_target: float | None
    relative_target: bool
    target_score: float
    target_source: str
    max_retain_increase: float | None
    _reference: tuple[Batch | list[Batch], float] | None
    _score_memo: ScoreMemo

    def measure(self, batches: Batch | Sequence[Batch]) -> float:
        """Mean token NLL over valid positions of one batch or several (token-weighted, reduced across processes)."""
        _, total, count = self.example_losses(batches)
        return total / count

    def example_losses(self, batches: Batch | Sequence[Batch]) -> tuple[Tensor, float, float]:
        """(this process's per-example mean token NLL [n], token NLL sum, token count), the sums reduced."""
        return example_losses(self.model, as_batches(batches), self.reduce)

    def _holdout_histogram(self, losses_out: list[Tensor] | None = None,
                           measured: tuple[Tensor, float, float] | None = None) -> tuple[Tensor, float]:
        """The holdout's per-example losses as a histogram (`target.holdout_histogram`) and its mean token NLL, at
        the current weights (the losses themselves appended to `losses_out`; `measured`: the holdout's
        `example_losses` at these weights, already measured). A non-finite loss makes the mean non-finite on every
        process (the sums are reduced): the callers read that as "no score"."""
        losses, total, count = measured if measured is not None else self.example_losses(self.holdout)
        if losses_out is not None:
            losses_out.append(losses)
        return holdout_histogram(losses, self.reduce), total / count

    def forget_score(self, forget: Batch | Sequence[Batch],
                     losses_out: list[Tensor] | None = None) -> tuple[float, float]:
        """`measure_forget_score`, measured once per weights and data (see `score_memo`)."""
        return self._score_memo.score(self, as_batches(forget), losses_out)

    def measure_forget_score(self, forget: Batch | Sequence[Batch],
                             losses_out: list[Tensor] | None = None) -> tuple[float, float]:
        """(score, mean token NLL) of the forget batches. The score is what the target is compared with: with a
        holdout target, the mean percentile of the forget examples' losses among the holdout examples' losses
        (`target.forget_score`) at the current weights (before unlearning with `relative_target=False`); otherwise
        the mean token NLL. NaN when a loss of either set is not finite (a trial that is rolled back).
        `losses_out` receives this process's per-example forget losses and, with a relative holdout target, the
        holdout's (what `target.score_between` interpolates). In one process the forget and holdout batches of one
        shape run in one forward (`losses.example_losses_joined`)."""
        held_out = None
        if self.holdout and self.forget_target is None and self.relative_target and self.reduce is identity:
            (losses, total, count), held_out = example_losses_joined(self.model, [as_batches(forget), self.holdout])
        else:
            losses, total, count = self.example_losses(forget)
        if losses_out is not None:
            losses_out.append(losses)
        nll = total / count
        if not self.holdout or self.forget_target is not None:
            return nll, nll
        if not math.isfinite(nll):  # reduced sums: every process returns here alike
            return float("nan"), nll
        if self.relative_target:
            hist, holdout_loss = self._holdout_histogram(losses_out, held_out)
            if not math.isfinite(holdout_loss):
                return float("nan"), nll
        else:
            hist = self._holdout_hist
        return forget_score(losses, hist, self.reduce), nll

    def reference_retain_loss(self, held: Batch | list[Batch]) -> float:
        """The loss of what the retain budget is measured on when it was first seen (the budget's reference)."""
        if self._reference is None or self._reference[0] is not held:
            self._reference = (held, self.measure(held))
        return self._reference[1]

    def calibrate(self, holdout_batches: Iterable[Batch] | Batch | None) -> float | None:
        """Use `holdout_batches` (never-trained data of the forget set's kind) for the target (see `target`) and,
        for second-order methods, as the data whose loss the step leaves in place. An explicit `forget_target`
        wins. Returns the target (None without one)."""
        self.holdout = as_batches(holdout_batches)
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

    def budget_batches(self, held_retain_batch: Batch | None, retain: Sequence[Batch]) -> Batch | list[Batch] | None:
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
        holdout): a prediction alone (the curvature's ½ΔᵀCΔ) is no bound. `max_retain_increase=None` runs without a
        check."""
        if self.max_retain_increase is None or self.budget_batches(held_retain_batch, retain) is not None:
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
        others = [*retain, *([held_retain_batch] if held_retain_batch is not None else [])]
        counts = self.reduce(torch.tensor(holdout_checks.duplicate_counts(self.holdout, forget, others) +
                                          holdout_checks.shared_token_counts(self.holdout, forget),
                                          dtype=torch.float64))
        held = self.budget_batches(held_retain_batch, list(retain))
        holdout_loss = self.holdout_loss if self.holdout_loss is not None else self.measure(self.holdout)
        refusal, found = holdout_checks.holdout_findings(
            duplicates=counts[:3].tolist(), shared=counts[3:].tolist(), vocabulary=vocabulary_size(self.model),
            holdout_loss=holdout_loss, forget_loss=self.forget_score(forget)[1],  # both reused by begin
            retain_loss=self.reference_retain_loss(held) if held is not None and held is not self.holdout else None)
        if refusal is not None:
            raise UserInputError(f"{self.name}: {refusal}")
        for message in found:
            warnings.warn(f"{self.name}: {message}", holdout_checks.HoldoutWarning, stacklevel=4)
