"""The weights of first-order constraints on a Newton direction (`docs/recipe.md`: holdout protection).

With constraint gradients `h_1..h_k`, `A = C + λI` and the direction `d_f = A⁻¹ g`, the step
`d = d_f − Σ α_i A⁻¹ h_i` with `α` solving `Hᵀ A⁻¹ H α = Hᵀ d_f` is the most forgetting in the curvature's metric among
steps with `h_iᵀ d = 0`. `constraint_weights(gram, rhs)` solves for α; `methods.protection.constrained_direction`
(any backend, from k + 1 solves) and `KFAC.constrained_inverse` (in the eigenbasis) both use it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def constraint_weights(gram: Tensor, rhs: Tensor) -> Tensor | None:
    """α with `gram α = rhs` (`gram` = Hᵀ A⁻¹ H [k, k], symmetric positive semi-definite; `rhs` = Hᵀ A⁻¹ g [k]), in
    float64 on the CPU with a 1e-12 relative ridge (least squares: dependent constraints are allowed); None when it has
    no finite solution (the caller leaves the direction unconstrained)."""
    gram, rhs = gram.detach().double().cpu(), rhs.detach().double().cpu()  # k × k: small, solved on the CPU
    ridge = 1e-12 * gram.diagonal().mean() * torch.eye(len(rhs), dtype=gram.dtype)
    alpha = torch.linalg.lstsq(gram + ridge, rhs[:, None]).solution[:, 0]
    return alpha if bool(torch.isfinite(alpha).all()) else None
