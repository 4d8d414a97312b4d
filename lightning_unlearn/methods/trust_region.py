"""The trust region of a step (`docs/recipe.md`: the step length): no accepted step moves the updated parameters by
more than `max_step_norm` times their norm, nor (second-order methods) predicts a retain increase ½ΔᵀCΔ above
`predicted_trust` times the retain budget. A guard that holds even when the held retain batch does not notice a huge
step (an untrained or tiny model). Shared by the methods and `lightning_unlearn.optim.NewtonUnlearner`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from torch import Tensor

from .target import retain_budget_nats

#: the trust region: no accepted step moves the updated parameters by more than this fraction of their norm
DEFAULT_MAX_STEP_NORM = 1.0
#: ... nor predicts (½ΔᵀCΔ, retain curvature) a retain increase above this multiple of the retain budget
DEFAULT_PREDICTED_TRUST = 2.0


def relative_step(pairs: Iterable[tuple[Tensor, Tensor]]) -> float:
    """‖θ - θ₀‖ / ‖θ₀‖ over (current, snapshot) parameter pairs (0 when θ₀ = 0 and θ = θ₀)."""
    moved = size = 0.0
    for param, start in pairs:
        moved += float((param.detach().double() - start.double()).pow(2).sum())
        size += float(start.double().pow(2).sum())
    if size == 0.0:
        return 0.0 if moved == 0.0 else math.inf
    return math.sqrt(moved / size)


def outside_step_norm(pairs: Iterable[tuple[Tensor, Tensor]], max_step_norm: float | None) -> bool:
    """Whether the parameters moved further from their snapshot than `max_step_norm` × its norm (None: no bound)."""
    return max_step_norm is not None and relative_step(pairs) > max_step_norm


def largest_trusted_step(params: Mapping[str, Tensor], direction: Mapping[str, Tensor], max_step_norm: float | None,
                         predicted_budget: float | None, curvature_norm: float | None) -> float:
    """The largest η inside both trust regions, where they bound it: ½η²dᵀCd ≤ `predicted_budget` (`curvature_norm`
    is dᵀCd) and η‖d‖ ≤ `max_step_norm` · ‖θ‖ (inf where neither bounds it)."""
    largest = math.inf
    if predicted_budget is not None and curvature_norm is not None and curvature_norm > 0:
        largest = math.sqrt(2.0 * predicted_budget / curvature_norm)
    if max_step_norm is not None:
        size = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params.values()))
        length = math.sqrt(sum(float(d.double().pow(2).sum()) for d in direction.values()))
        if length > 0 and size > 0:
            largest = min(largest, max_step_norm * size / length)
    return largest


def predicted_budget(max_retain_increase: float | None, held: bool, reference: float | None,
                     predicted_trust: float | None, *, retain_curvature: bool) -> float | None:
    """The bound on the curvature's predicted retain increase ½ΔᵀCΔ (nats) of one step: the guard itself without a
    held retain batch (`held` False: the retain budget in nats, `retain_budget_nats`), a trust region
    (`predicted_trust` × the budget above the `reference` loss) with one, when C is a retain curvature; None where
    neither applies."""
    if max_retain_increase is None:
        return None
    if not held:
        return retain_budget_nats(max_retain_increase)
    if predicted_trust is not None and reference is not None and retain_curvature:
        return predicted_trust * retain_budget_nats(max_retain_increase, reference)
    return None
