"""Protection constraints (`docs/recipe.md`: holdout protection): the Newton direction constrained to leave the
mean loss of groups of examples unchanged to first order.

With constraint gradients `h_1..h_k` and `solve(v) = (C + λI)⁻¹ v`, the step `d = d_f − Σ α_i solve(h_i)` with
`α` solving `Hᵀ solve(H) α = Hᵀ d_f` is the most forgetting in the curvature's metric among steps with `h_iᵀ d = 0`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..curvature.base import Vector
from ..curvature.constraints import constraint_weights
from .records import Batch


def example_group_ids(batch: Batch, k: int) -> Tensor:
    """The protection group of each example of `batch`: example i in group i mod k."""
    return torch.arange(int(batch["input_ids"].shape[0])) % k


def example_groups(batches: Sequence[Batch], k: int) -> list[list[Batch]]:
    """Up to `k` groups of the examples of `batches` (`example_group_ids`; empty groups dropped)."""
    groups = []
    for j in range(k):
        kept = []
        for b in batches:
            rows = torch.arange(int(b["input_ids"].shape[0]))
            keep = rows[example_group_ids(b, k) == j]
            if len(keep):
                kept.append({key: (v[keep] if isinstance(v, Tensor) and v.shape[:1] == rows.shape else v)
                             for key, v in b.items()})
        if kept:
            groups.append(kept)
    return groups


def constrained_direction(direction: Vector, constraints: Sequence[Mapping[str, Tensor]],
                          solve: Callable[[Mapping[str, Tensor]], Vector],
                          solved: Sequence[Vector] | None = None) -> Vector:
    """`direction` (= solve(g_f)) minus its component along `solve(h_i)` so that every `h_iᵀ d = 0`; `direction`
    unchanged when the k × k system has no finite solution. `solved`: the `solve(h_i)` when already computed."""
    names = list(direction)

    def flat(v: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([v[n].reshape(-1).double().cpu() for n in names])

    ds = list(solved) if solved is not None else [solve(h) for h in constraints]
    H, D = torch.stack([flat(h) for h in constraints], 1), torch.stack([flat(d) for d in ds], 1)  # [p, k]
    alpha = constraint_weights(H.T @ D, H.T @ flat(direction))  # [k, k] Hᵀ(C + λI)⁻¹H, [k] Hᵀ d_f
    if alpha is None:
        return direction
    out = {}
    for n in names:
        correction = sum(float(a) * d[n].double() for a, d in zip(alpha, ds))
        out[n] = (direction[n].double() - correction).to(direction[n].dtype)
    return out
