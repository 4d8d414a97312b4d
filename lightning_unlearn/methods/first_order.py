"""First-order baselines, for honest comparison: a torch optimizer on a forget objective.

- `gradient_ascent`: minimise the forget objective U (for `nll`: ascend the forget NLL).
- `gradient_difference`: U + `retain_weight` · NLL on retain batches (descent on retain).
- `npo`: negative preference optimisation against a frozen copy of the model taken at construction
  (or `reference=`), plus an optional retain NLL term.
- `simnpo`: SimNPO (Fan et al., 2024), reference-free, length-normalised NPO (`beta`, margin `gamma`), plus the same
  optional retain NLL term.

Each `step` is one optimizer step under the same safety check as the Newton methods; after a rollback the
weights and the optimizer's moments are restored and the learning rate is divided by `damping_growth`
(`StepRecord.damping` is that divisor, `StepRecord.scale` the effective learning rate).

Defaults: Adam at `lr=1e-4` for up to `steps=100` steps, a run that ends at the target (with holdout data or
`forget_target`), when a step is rolled back after every retry (the retain budget is spent), or after the 100 steps.
One Adam step moves each weight by about `lr`, so a single step at 1e-4 does nothing measurable: on a tiny GPT-2 that
memorised digit canaries it took the forget loss from 0.110 to 0.126 nats, where 100 guarded steps take it to 4.3
(gradient ascent; NPO 5.9) with the held retain loss within its budget.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature.base import checked_grad, eval_mode
from ..curvature.layers import trainable_parameters
from ..curvature.objective import model_logits
from ..errors import UserInputError
from .inputs import all_finite, check_positive
from .losses import forget_objective, gradient_sum, npo_objective, simnpo_objective, token_nll
from .records import Batch
from .unlearner import Unlearner

OPTIMIZERS = ("adam", "sgd")
#: the step budget of the first-order methods (each step one optimizer step under the safety check)
DEFAULT_FIRST_ORDER_STEPS = 100


class FirstOrderUnlearner(Unlearner):
    """A torch optimizer (`optimizer`="adam" | "sgd", `lr`) on the trainable parameters (or `params` names), for up
    to `steps` (default `DEFAULT_FIRST_ORDER_STEPS`) guarded steps."""

    retain_weight_default = 0.0

    def __init__(self, model: nn.Module, *, optimizer: str = "adam", lr: float = 1e-4,
                 retain_weight: float | None = None, params: Sequence[str] | None = None, **kw: Any) -> None:
        kw.setdefault("damping", 1.0)
        kw.setdefault("steps", DEFAULT_FIRST_ORDER_STEPS)
        super().__init__(model, **kw)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        named = dict(model.named_parameters())
        names = trainable_parameters(model, params)
        self._names = names
        self.lr = float(lr)
        self.retain_weight = self.retain_weight_default if retain_weight is None else float(retain_weight)
        plist = [named[n] for n in names]
        if optimizer == "adam" and any(p.dtype == torch.float16 for p in plist):
            raise UserInputError(
                f"{self.name}: Adam on float16 weights keeps its moment estimates in float16, where they underflow "
                "and every step is NaN; load the model in bfloat16 or float32, or pass optimizer='sgd'")
        self.optimizer = torch.optim.Adam(plist, lr=lr) if optimizer == "adam" else torch.optim.SGD(plist, lr=lr)

    @property
    def param_names(self) -> tuple[str, ...]:
        return self._names

    def _begin_fit(self, forget: Sequence[Batch], retain: Sequence[Batch]) -> None:
        """Refuse a retain term with no retain batches (on any process): the method would silently be gradient
        ascent."""
        if self.retain_weight and not float(self.reduce(torch.tensor(float(len(retain)), dtype=torch.float64))):
            raise UserInputError(
                f"{self.name} has a retain term (retain_weight={self.retain_weight:g}) but no retain batch reaches its"
                " steps: pass retain data, or set retain_weight=0 (the forget term alone)")

    def _record_scale(self) -> float:
        return self.lr / self.damping

    def forget_term(self, batch: Batch, params: list[Tensor]) -> tuple[Tensor, int]:
        return forget_objective(self.model, batch, self.forget_loss, params)

    def _prepare(self, forget: Sequence[Batch], retain: Sequence[Batch]) -> Any:
        """The gradient of the total objective (forget term averaged over batches + retain term), reduced."""
        params = self.named_params()
        names, plist = list(params), list(params.values())
        with torch.enable_grad(), eval_mode(self.model):
            grads, weight = gradient_sum(forget, lambda b: self.forget_term(b, plist), params)
            total = float(self.reduce(torch.tensor(weight, dtype=torch.float64)))
            if total <= 0:
                raise ValueError("the forget batches have no position with labels != -100; nothing to forget")
            grads = {n: self.reduce(g) / total for n, g in grads.items()}
            if self.retain_weight and retain:
                rgrads = {n: torch.zeros_like(g) for n, g in grads.items()}
                count = 0.0
                for b in retain:
                    nll, _ = token_nll(model_logits(self.model, b), b)
                    if nll.numel() == 0:
                        continue
                    for n, g in zip(names, checked_grad("retain gradient", nll.sum(), plist, allow_unused=True)):
                        if g is not None:
                            rgrads[n] += g.detach().float()
                    count += nll.numel()
                count = float(self.reduce(torch.tensor(count, dtype=torch.float64)))
                if count > 0:
                    grads = {n: g + self.retain_weight * self.reduce(rgrads[n]) / count for n, g in grads.items()}
        return grads

    def _apply_trial(self, context: Any) -> bool:
        if not all_finite(context.values()):
            return False
        params = self.named_params()
        kept = {n: p.grad for n, p in params.items()}  # the caller's gradients, given back after the step
        for n, p in params.items():
            p.grad = context[n].to(p.dtype)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr / self.damping
        try:
            self.optimizer.step()
        finally:
            for n, p in params.items():
                p.grad = kept[n]
        return True

    def _rollback_state(self) -> Any:
        return copy.deepcopy(self.optimizer.state_dict())

    def _restore_state(self, state: Any) -> None:
        self.optimizer.load_state_dict(state)


class GradientAscent(FirstOrderUnlearner):
    """Minimise the forget objective alone (ascent on the forget NLL for `forget_loss="nll"`)."""

    name = "gradient_ascent"


class GradientDifference(FirstOrderUnlearner):
    """Forget objective + `retain_weight` (default 1) × retain NLL."""

    name = "gradient_difference"

    retain_weight_default = 1.0


class NPO(FirstOrderUnlearner):
    """Negative preference optimisation (`beta`) against a frozen reference copy, + `retain_weight` × retain NLL."""

    name = "npo"

    def __init__(self, model: nn.Module, *, beta: float = 0.1, reference: nn.Module | None = None,
                 **kw: Any) -> None:
        super().__init__(model, **kw)
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta = float(beta)
        if reference is None:
            reference = copy.deepcopy(model)
        self.reference = reference.eval().requires_grad_(False)

    def forget_term(self, batch: Batch, params: list[Tensor]) -> tuple[Tensor, int]:
        return npo_objective(self.model, self.reference, batch, self.beta)


class SimNPO(FirstOrderUnlearner):
    """SimNPO (Fan et al., 2024): NPO without a reference model, on the length-normalised log-likelihood:
    `mean_i -(2/β) log σ(-(β/|y_i|) log π_θ(y_i|x_i) - γ)` over forget examples, + `retain_weight` × retain NLL
    (default 0, like `npo`).

    Defaults: `beta=2.5`, `gamma=0.0` (the authors' TOFU config, OPTML-Group/Unlearn-Simple `TOFU/config/forget.yaml`;
    open-unlearning's `configs/trainer/SimNPO.yaml` uses β = 4.5, δ = 0). The authors' code and open-unlearning
    subtract their margin inside the β product, `β (NLL/|y| - δ)`: their δ is this `gamma / beta`. Their
    `simnpo_grad_diff` weighs forget by 0.1375 (open-unlearning: 0.125) and retain NLL by 1: `retain_weight` ≈ 7.3
    (8) here, up to the scale of the learning rate. `|y|` counts the labelled positions that are predicted (after the
    shift); theirs counts `labels != -100` before it, one more when the first position is labelled."""

    name = "simnpo"

    def __init__(self, model: nn.Module, *, beta: float = 2.5, gamma: float = 0.0, **kw: Any) -> None:
        check_positive("simnpo: beta (the inverse temperature of the length-normalised NPO loss)", beta)
        if not math.isfinite(float(gamma)):
            raise ValueError(f"simnpo: gamma (the reward margin) must be a finite number, got {gamma}")
        super().__init__(model, **kw)
        self.beta = float(beta)
        self.gamma = float(gamma)

    def forget_term(self, batch: Batch, params: list[Tensor]) -> tuple[Tensor, int]:
        return simnpo_objective(self.model, batch, self.beta, self.gamma)
