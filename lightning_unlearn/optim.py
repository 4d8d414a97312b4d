"""`NewtonUnlearner`: a `torch.optim.Optimizer` that turns accumulated forget gradients into damped Newton steps.

Sign convention (`maximize=True`, the default): `p.grad` holds the gradient of the **forget loss to ascend**
(e.g. `forget_nll.backward()`), and `step()` moves uphill in the curvature's metric,

    θ ← θ + lr · (C + λI)^-1 ∇L_forget.

With `maximize=False`, `p.grad` is the gradient of an unlearning objective to *minimise* (e.g. the unlikelihood
loss `-log(1 - p)` of `lightning_unlearn.methods.losses`) and `θ ← θ − lr · (C + λI)^-1 ∇U`.

`closure` (optional) re-evaluates and returns the **held retain loss** (it is called without gradients). With it,
`step` is guarded Levenberg-Marquardt style: a trial whose retain loss rises more than `max_retain_increase`
(relative, against the value before the step), that is non-finite, or that moves the covered parameters by more
than `max_step_norm` × their norm (the trust region) is rolled back (weights restored bit for bit)
and retried with λ × `damping_growth`, at most `max_retries` times; on success λ shrinks back towards its initial
value. Without a closure only non-finite steps are refused. Parameters that the curvature does not cover (e.g. the
embeddings under K-FAC) are left untouched. Usable in plain PyTorch and in Lightning manual optimisation::

    opt = NewtonUnlearner(model.parameters(), curvature, lr=1.0, damping=1e-3)
    opt.zero_grad(); forget_nll(model, forget_batch).backward()
    opt.step(lambda: retain_nll(model, held_batch))

`state_dict()` holds the current λ and step count (per param group); the curvature is saved separately with its
own `state_dict()` (a curvature checkpoint). Torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .curvature.base import Curvature
from .methods.inputs import all_finite, check_positive, check_settings
from .methods.records import StepRecord, run_status, summarize, trial_reason
from .methods.target import over_retain_budget
from .methods.trust_region import DEFAULT_MAX_STEP_NORM, outside_step_norm


class NewtonUnlearner(torch.optim.Optimizer):
    """Damped Newton steps `θ ± lr (C + λI)^-1 p.grad` from a finalized curvature, with rollback on a closure."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        curvature: Curvature,
        *,
        lr: float = 1.0,
        damping: float = 1e-3,
        maximize: bool = True,
        max_retain_increase: float | None = 0.05,
        damping_growth: float = 10.0,
        max_retries: int = 4,
        max_step_norm: float | None = DEFAULT_MAX_STEP_NORM,
        log: Callable[[StepRecord], None] | None = None,
    ) -> None:
        if not curvature.finalized:
            raise ValueError("NewtonUnlearner needs a finalized curvature; accumulate batches and call finalize()")
        check_settings(damping=damping, damping_growth=damping_growth, max_step_norm=max_step_norm,
                       max_retain_increase=max_retain_increase, max_retries=max_retries)
        check_positive("lr", lr)
        self.max_step_norm = None if max_step_norm is None else float(max_step_norm)
        defaults = dict(lr=float(lr), damping=float(damping), initial_damping=float(damping), maximize=maximize,
                        steps=0)
        super().__init__(params, defaults)
        self.curvature = curvature
        self.max_retain_increase = max_retain_increase
        self.damping_growth = float(damping_growth)
        self.max_retries = int(max_retries)
        self.log = log
        self.history: list[StepRecord] = []
        self._first_retain: float | None = None  # the held retain loss before the first step (closure given)
        self._last_retain: float | None = None  # ... after the last accepted step
        by_id = {id(p): n for n, p in curvature.model.named_parameters()}
        covered = set(curvature.param_names)
        self._names: dict[int, str] = {}
        for group in self.param_groups:
            for p in group["params"]:
                name = by_id.get(id(p))
                if name in covered:
                    self._names[id(p)] = name
        if not self._names:
            raise ValueError("none of the optimizer's parameters is covered by the curvature; pass the parameters of"
                             " the model the curvature was built on (curvature.param_names)")

    @property
    def damping(self) -> float:
        """The current λ (of the first param group)."""
        return float(self.param_groups[0]["damping"])

    def _direction(self, group: dict) -> dict[int, Tensor] | None:
        """`sign · lr · (C + λI)^-1 g` for the group's covered params with a gradient (zeros for covered params
        without one, since the curvature couples parameters)."""
        params = {self._names[id(p)]: p for p in group["params"] if id(p) in self._names}
        if not any(p.grad is not None for p in params.values()):
            return None
        all_params = dict(self.curvature.model.named_parameters())
        grad = {}
        for n in self.curvature.param_names:
            p = params.get(n, all_params[n])
            g = p.grad if (n in params and p.grad is not None) else None
            grad[n] = torch.zeros_like(p) if g is None else g.detach()
        direction = self.curvature.apply(grad, group["damping"], -1.0)
        sign = 1.0 if group["maximize"] else -1.0
        return {id(p): sign * group["lr"] * direction[n] for n, p in params.items()}

    def _outside_trust_region(self, snapshot: dict[int, Tensor]) -> bool:
        """‖θ - θ₀‖ > max_step_norm · ‖θ₀‖ over the covered parameters (θ₀ = `snapshot`; `trust_region`)."""
        pairs = ((p, snapshot[id(p)]) for group in self.param_groups for p in group["params"] if id(p) in snapshot)
        return outside_step_norm(pairs, self.max_step_norm)

    @property
    def status(self) -> str | None:
        """How the steps so far went (`records.run_status`, the rule of every run): "budget_exhausted" once a step
        was accepted (there is no target here), "nothing_accepted" when every trial was rolled back."""
        return run_status(self.history)

    def summary(self) -> dict[str, Any]:
        """The steps so far in the summary schema of every run (`records.SUMMARY_FIELDS`; no target and no forget
        loss here: the closure measures the held retain loss only)."""
        return summarize(self.history, self.status, target_source="none", retain_loss_before=self._first_retain,
                         retain_loss_after=self._last_retain)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor | float] | None = None) -> float | None:  # type: ignore[override]
        """One guarded Newton step. Returns the held retain loss after the step (closure given) or None."""
        reference = None if closure is None else float(closure())
        if self._first_retain is None:
            self._first_retain = reference
        last = None
        for trial in range(self.max_retries + 1):
            snapshot = {id(p): p.detach().clone() for g in self.param_groups for p in g["params"]
                        if id(p) in self._names}
            finite = True
            for group in self.param_groups:
                update = self._direction(group)
                if update is None:
                    continue
                if not all_finite(update.values()):
                    finite = False
                    break
                for p in group["params"]:
                    if id(p) in update:
                        p.add_(update[id(p)].to(p.dtype))
            if finite:
                finite = all_finite(p for g in self.param_groups for p in g["params"] if id(p) in self._names)
            retain = float(closure()) if (finite and closure is not None) else None
            finite = finite and (retain is None or math.isfinite(retain))
            reason = trial_reason(
                finite=finite, outside_trust_region=finite and self._outside_trust_region(snapshot),
                over_budget=(reference is not None and retain is not None
                             and over_retain_budget(retain, reference, self.max_retain_increase)),
                target_reached=False)
            group0 = self.param_groups[0]
            record = StepRecord(step=int(group0["steps"]), damping=float(group0["damping"]), scale=float(group0["lr"]),
                                forget_loss=float("nan"), retain_loss=retain, accepted=reason == "accepted",
                                reason=reason, trial=trial)
            self.history.append(record)
            if self.log is not None:
                self.log(record)
            last = retain
            if record.accepted:
                self._last_retain = retain
                for group in self.param_groups:
                    group["damping"] = max(group["initial_damping"], group["damping"] / self.damping_growth)
                    group["steps"] += 1
                return last
            for group in self.param_groups:  # roll back, bit for bit, and damp harder
                for p in group["params"]:
                    if id(p) in snapshot:
                        p.copy_(snapshot[id(p)])
                group["damping"] *= self.damping_growth
        for group in self.param_groups:
            group["steps"] += 1
        return reference
