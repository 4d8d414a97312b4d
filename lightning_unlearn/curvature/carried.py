"""Vectors that carry what a later product needs, so that it is not computed twice: a gradient's low-rank form
(`FactoredGradient`), a solved direction's `dᵀCd` (`SolvedVector`).

A linear layer's weight gradient over a set of positions is `Σ_p g_p a_pᵀ` (`g` the output gradient, `a` the input,
a column of ones for the bias): rank at most the number of positions. Where that number is small against the layer's
width (a few short holdout examples; any set once layers are wide), rotating the factors into K-FAC's eigenbasis
costs less than rotating the matrix: `rows·(out² + c²)` against `out·c·(out + c)` (`kronecker.factors_are_cheaper`).
The protected Newton step rotates k such constraint gradients per step (`KFAC.constrained_inverse`), which is what
grows fastest with width (width³ per vector) in the request's cost.

K-FAC's constrained solve has its direction in the eigenbasis before rotating it back, where `dᵀCd` is one elementwise
sum; the Newton step needs that number for its trust region and would otherwise rotate the direction in again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor

from .base import Curvature, Vector


class FactoredGradient(dict):
    """A parameter-shaped gradient (name → tensor, as every backend reads it) whose `factors` give, per tracked layer
    name, `(g [rows, out], a [rows, in (+1 bias)])` with the layer's `[out, in (+1)]` matrix equal to `gᵀ a`."""

    def __init__(self, values: Mapping[str, Tensor], factors: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        super().__init__(values)
        self.factors: dict[str, tuple[Tensor, Tensor]] = dict(factors)


def layer_factors(vector: Mapping[str, Tensor], layer: str) -> tuple[Tensor, Tensor] | None:
    """The `(g, a)` factors of `layer`'s part of `vector`, or None (a plain vector, or a layer without them)."""
    return getattr(vector, "factors", {}).get(layer)


def restricted(vector: Mapping[str, Tensor], names: Iterable[str]) -> Vector:
    """`vector` on `names` only, keeping its factors (a plain dict for a plain vector)."""
    values = {n: vector[n] for n in names}
    factors = getattr(vector, "factors", None)
    return FactoredGradient(values, factors) if factors is not None else values


class SolvedVector(dict):
    """A vector a backend solved for together with its `vᵀ C v` (`quadratic`, no damping): a caller that needs both
    reads `quadratic_of` instead of paying another product. Valid for the vector and the curvature as returned."""

    def __init__(self, values: Mapping[str, Tensor], quadratic: float) -> None:
        super().__init__(values)
        self.quadratic = float(quadratic)


def quadratic_of(curvature: Curvature, vector: Mapping[str, Tensor]) -> float:
    """`vᵀ C v`: the value `vector` carries when a backend returned it as a `SolvedVector`, else
    `curvature.quadratic(vector)`."""
    return vector.quadratic if isinstance(vector, SolvedVector) else curvature.quadratic(vector)
