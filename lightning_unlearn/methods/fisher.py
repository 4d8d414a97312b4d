"""The seed paper's methods (Gu et al., 2024): Fisher Removal and Fisher Forgetting.

- `fisher_removal`: the Newton step with the Woodbury empirical Fisher (`woodfisher`) as curvature.
- `fisher_forgetting`: a Newton step plus noise `(μσ²)^(1/4) (C + λI)^(-1/4) ε`, `ε ~ N(0, I)` drawn from a
  generator seeded with `seed` (same seed, same noise), so that the noise covariance is
  `(μσ²)^(1/2) (C + λI)^(-1/2)`: large where the curvature is small (Golatkar et al., 2020). Any backend that
  provides `power=-1/4` works (woodfisher, diagonal, kfac).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..curvature.base import Curvature, Vector
from .newton import SecondOrderUnlearner
from .records import Batch


class FisherRemoval(SecondOrderUnlearner):
    """Newton removal with the inverse empirical Fisher of per-example gradients (Woodbury identity)."""

    name = "fisher_removal"

    def __init__(self, model: nn.Module, curvature: Curvature | None = None, *,
                 curvature_backend: str = "woodfisher", **kw: Any) -> None:
        super().__init__(model, curvature, curvature_backend=curvature_backend, **kw)


class FisherForgetting(SecondOrderUnlearner):
    """Newton step plus curvature-shaped Gaussian noise of scale `(mu * sigma**2) ** (1/4)`, seeded by `seed`."""

    name = "fisher_forgetting"

    def __init__(self, model: nn.Module, curvature: Curvature | None = None, *,
                 curvature_backend: str = "woodfisher", mu: float = 1e-6, sigma: float = 1.0, seed: int = 0,
                 newton_step: bool = True, **kw: Any) -> None:
        super().__init__(model, curvature, curvature_backend=curvature_backend, **kw)
        if mu < 0 or sigma < 0:
            raise ValueError(f"mu and sigma must be >= 0, got mu={mu}, sigma={sigma}")
        self.mu, self.sigma, self.seed = float(mu), float(sigma), int(seed)
        self.newton_step = newton_step
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)

    @property
    def noise_scale(self) -> float:
        """`(μσ²)^(1/4)`."""
        return (self.mu * self.sigma**2) ** 0.25

    def draw_epsilon(self) -> Vector:
        """`ε ~ N(0, I)` over the curvature's parameters, from the seeded generator (CPU, then moved)."""
        params = self.named_params()
        return {n: torch.randn(p.shape, generator=self.generator, dtype=torch.float32).to(p.device)
                for n, p in params.items()}

    def noise(self, epsilon: Vector | None = None) -> Vector:
        """`(μσ²)^(1/4) (C + λI)^(-1/4) ε` (ε drawn from the seeded generator when not given; the current λ, relative
        or absolute per `damping_mode`)."""
        assert self.curvature is not None
        eps = self.draw_epsilon() if epsilon is None else epsilon
        shaped = self.curvature.apply(eps, self.damping, -0.25, mode=self.damping_mode)
        return {n: self.noise_scale * v for n, v in shaped.items()}

    def _prepare(self, forget: Sequence[Batch], retain: Sequence[Batch]) -> Any:
        gradient = super()._prepare(forget, retain) if self.newton_step else None
        return gradient, self.draw_epsilon()  # ε drawn once per step: retries change λ only

    def _direction(self, context: Any) -> Vector:
        gradient, _ = context
        if gradient is None:
            return {n: torch.zeros_like(p) for n, p in self.named_params().items()}
        return super()._direction(gradient)

    def _offset(self, context: Any) -> Vector:
        """The noise: added once, whatever the Newton step's length."""
        return self.noise(context[1])
