"""K-FAC's products with its vectors, in the Kronecker eigenbasis (the operator's part that `apply`, `apply_many`,
`quadratic` and `constrained_inverse` share; `kfac.py` fits, decomposes, subtracts and saves the factors).

For a layer's `[out, in+1]` matrix V, `(C + λI)^p V = U_G [ (U_G^T V U_A) ⊙ (s + λ)^p ] U_A^T` with `s` the layer's
eigenvalues (`s_G s_Aᵀ`, or EK-FAC's corrected ones). Each layer's part is computed by the process that owns it
(`shard_factors`) and summed across processes by `reduce`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .base import Vector
from .carried import SolvedVector, layer_factors
from .constraints import constraint_weights
from .kronecker import (
    factors_are_cheaper,
    factors_to_kronecker_basis,
    from_kronecker_basis,
    g_basis_width,
    g_to_basis,
    kronecker_scale_many,
    to_kronecker_basis,
)
from .layers import TrackedLayer


class KFACProducts:
    """Mixin of `KFAC`: the products with the curvature in its eigenbasis (see the module docstring)."""

    def _eigenvalues(self, name: str) -> Tensor:
        """The layer's eigenvalues in its Kronecker eigenbasis, [out, in+1]: EK-FAC's when corrected."""
        if name in self.corrected:
            return self.corrected[name].to(self.compute_dtype)
        _, s_a, _, s_g = self.eigen[name]
        return s_g.to(self.compute_dtype)[:, None] * s_a.to(self.compute_dtype)[None, :]

    def _damping_scales(self) -> dict[str, float]:
        """Per layer: the mean of its eigenvalue products `s_G s_Aᵀ` (= mean(s_G) · mean(s_A); EK-FAC's mean when
        corrected)."""
        self._check_corrected("fit(batches) does it")
        out = {}
        for layer in self._owned_layers():
            if layer.name in self.corrected:
                out[layer.name] = float(self.corrected[layer.name].float().mean())
            else:
                _, s_a, _, s_g = self.eigen[layer.name]
                out[layer.name] = float(s_g.double().mean() * s_a.double().mean())
        if self.sharded:  # every process needs every layer's scale (the floor of `damping_scales` uses them all)
            values = torch.tensor([out.get(layer.name, 0.0) for layer in self.layers], dtype=torch.float64)
            values = self.reduce(values)
            out = {layer.name: float(v) for layer, v in zip(self.layers, values)}
        return out

    def _block_parameters(self) -> dict[str, tuple[str, ...]]:
        """Per layer (the blocks of `_damping_scales`): its weight and bias names (an expert's: `name[expert]`, its
        slices, `layers.split_label`)."""
        return {layer.name: layer.block_labels for layer in self.layers}

    def _check_corrected(self, hint: str = "and again after subtract()") -> None:
        if self.eigenvalue_correction and not self.corrected:
            raise RuntimeError("kfac: eigenvalue_correction=True but the eigenvalues are not corrected; call "
                               f"correct_eigenvalues(batches) after finalize() ({hint})")

    def _bases(self, name: str, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """(U_A, U_G) of a layer on `device` in the compute dtype."""
        u_a, _, u_g, _ = self.eigen[name]
        u_a = u_a.to(device=device, dtype=self.compute_dtype)
        return u_a, None if u_g is None else u_g.to(device=device, dtype=self.compute_dtype)

    def _layer_terms(self, layer: TrackedLayer, vectors: Sequence[Vector], damping: Callable[[str], float]
                     ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """(the layer's matrices of `vectors` stacked [n, out, c] in the compute dtype, U_A, U_G, its damped
        eigenvalues `s + λ_l`)."""
        stacked = torch.stack([layer.to_matrix(v) for v in vectors]).to(self.compute_dtype)
        u_a, u_g = self._bases(layer.name, stacked.device)
        return stacked, u_a, u_g, self._eigenvalues(layer.name).to(stacked.device) + damping(layer.name)

    def _assemble(self, per_layer: Mapping[str, Tensor], like: Vector) -> Vector:
        """One parameter-shaped vector from each owned layer's [out, c] result (zeros for the layers other processes
        own), summed across processes when the factors are sharded; dtypes as in `like`."""
        out: Vector = {}
        for layer in self.layers:
            v = layer.to_matrix(like)
            layer.write(out, per_layer[layer.name].to(v.dtype) if layer.name in per_layer else torch.zeros_like(v),
                        like)
        if self.sharded:
            out = {name: self.reduce(t.contiguous()) for name, t in out.items()}
        return out

    def _rotated_constraints(self, layer: TrackedLayer, vectors: Sequence[Vector],
                             constraints: Sequence[Mapping[str, Tensor]], damping: Callable[[str], float]
                             ) -> tuple[Tensor, Tensor]:
        """(`vectors`' layer matrices in the eigenbasis [n, out, c], the damped eigenvalues' reciprocal): the
        constraints that carry the layer's low-rank factors (`carried.FactoredGradient`) rotated from them where that
        is cheaper (`kronecker.factors_are_cheaper`), the rest as matrices in one stacked product."""
        out, cols, stored_u_g = layer.out_features, layer.in_features + int(layer.has_bias), self.eigen[layer.name][2]
        factored: dict[int, tuple[Tensor, Tensor]] = {}
        for i, h in enumerate(constraints, start=1):
            pair = layer_factors(h, layer.name)
            if pair is not None and factors_are_cheaper(pair[0].shape[0], out, cols, g_basis_width(stored_u_g)):
                factored[i] = pair
        dense = [i for i in range(len(vectors)) if i not in factored]
        stacked, u_a, u_g, damped = self._layer_terms(layer, [vectors[i] for i in dense], damping)
        rotated = to_kronecker_basis(u_a, u_g, stacked)
        if not factored:
            return rotated, damped.reciprocal()
        r = rotated.new_empty(len(vectors), *rotated.shape[1:])
        r[dense] = rotated
        r[list(factored)] = factors_to_kronecker_basis(u_a, u_g, list(factored.values()))
        return r, damped.reciprocal()

    def _quadratic(self, vector: Vector) -> float:
        total = 0.0
        for layer in self._owned_layers():
            v = layer.to_matrix(vector)
            u_a, u_g = self._bases(layer.name, v.device)
            m = g_to_basis(u_g, v.to(self.compute_dtype)) @ u_a
            total += float((m.pow(2) * self._eigenvalues(layer.name).to(m.device)).sum())
        if self.sharded:  # each process summed its own layers
            total = float(self.reduce(torch.tensor(total, dtype=torch.float64)))
        return total

    def _apply(self, vector: Vector, damping, power: float) -> Vector:
        return self._apply_many([vector], damping, power)[0]

    def _apply_many(self, vectors: list[Vector], damping, power: float) -> list[Vector]:
        """`(C + λ_l I)^power v` for each of `vectors`: per layer one stacked product in the eigenbasis
        (`kronecker_scale_many`), so the 1 + k solves of a protected Newton step cost one call; `_apply` is the
        case of one vector."""
        self._check_corrected()
        results: list[dict[str, Tensor]] = [{} for _ in vectors]
        for layer in self._owned_layers():
            stacked, u_a, u_g, damped = self._layer_terms(layer, vectors, damping)
            for result, r in zip(results, kronecker_scale_many(u_a, u_g, damped.pow(power), stacked)):
                result[layer.name] = r
        return [self._assemble(result, v) for result, v in zip(results, vectors)]

    def constrained_inverse(self, vector: Mapping[str, Tensor], constraints: list[Mapping[str, Tensor]],
                            damping: float, *, mode: str = "absolute") -> Vector:
        """The damped Newton direction of `vector` that leaves each constraint's loss in place to first order:
        `x = A⁻¹v − A⁻¹Hα` with `HᵀA⁻¹H α = HᵀA⁻¹v` (A = C + λI, H the constraint gradients, e.g. holdout groups),
        what `methods.protection.constrained_direction` computes from the k + 1 solves of `apply_many`, here in the
        eigenbasis: the 1 + k vectors are rotated in once, the k × k system is formed from inner products there (the
        rotation is orthogonal: `hᵀA⁻¹g = (Uᵀh)ᵀ D⁻¹ (Uᵀg)`), and only x is rotated back, so about half the products
        of the k + 1 solves. `vector` solved unconstrained when the system has no finite solution; `damping`/`mode`
        as in `apply`."""
        vectors = [dict(vector), *(dict(h) for h in constraints)]
        block_damping = self._checked_damping(damping, -1.0, mode, vectors)
        if not constraints:
            return self._apply_many(vectors, block_damping, -1.0)[0]
        self._check_corrected()
        k = len(constraints)
        device = next(iter(vector.values())).device  # the system is reduced across processes on the vectors' device
        gram = torch.zeros(k, k, dtype=torch.float64, device=device)
        rhs = torch.zeros(k, dtype=torch.float64, device=device)
        rotated: dict[str, tuple[Tensor, Tensor]] = {}
        for layer in self._owned_layers():
            r, inverse = self._rotated_constraints(layer, vectors, constraints, block_damping)  # [1 + k, out, c]
            rotated[layer.name] = (r, inverse)
            flat = r.reshape(len(vectors), -1).double()
            solved = flat * inverse.reshape(1, -1).double()
            gram += (flat[1:] @ solved[1:].T).to(device)
            rhs += (flat[1:] @ solved[0]).to(device)
        if self.sharded:  # each process summed its own layers
            gram, rhs = self.reduce(gram), self.reduce(rhs)
        alpha = constraint_weights(gram, rhs)
        result, quadratic = {}, torch.zeros((), dtype=torch.float64, device=device)
        for name, (r, inverse) in rotated.items():
            combined = r[0]
            if alpha is not None:
                combined = combined - torch.einsum("k,kij->ij", alpha.to(device=r.device, dtype=r.dtype), r[1:])
            u_a, u_g = self._bases(name, r.device)
            solved = combined * inverse  # the direction in the eigenbasis: its dᵀCd is an elementwise sum here
            quadratic += (solved.double().pow(2) * self._eigenvalues(name).to(solved.device).double()).sum().to(device)
            result[name] = from_kronecker_basis(u_a, u_g, solved[None])[0]
        if self.sharded:  # each process summed its own layers
            quadratic = self.reduce(quadratic)
        return SolvedVector(self._assemble(result, vector), float(quadratic))
