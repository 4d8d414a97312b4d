"""Helpers of the Kronecker-factored curvature (`kfac.py`): G's eigenbasis in its three kept forms (dense
[out, out], block-diagonal [m, k, k], diagonal: None), and the partition of the layers across processes."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .layers import TrackedLayer


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of `n` that is <= `at_most` (>= 1)."""
    return next(k for k in range(max(1, min(n, at_most)), 0, -1) if n % k == 0)


def g_rows_to_basis(u: Tensor | None, g: Tensor) -> Tensor:
    """Rows `g` [n, out] expressed in G's eigenbasis, `g U_G`, for a dense `u` [out, out], block-diagonal
    `u` [m, k, k] or diagonal G (`u` None: the identity)."""
    if u is None:
        return g
    if u.dim() == 2:
        return g @ u
    m, k, _ = u.shape
    return torch.einsum("nmi,mij->nmj", g.reshape(-1, m, k), u).reshape(g.shape)


def g_to_basis(u: Tensor | None, x: Tensor) -> Tensor:
    """`U_Gᵀ x` for columns `x` [out, c] (see `g_rows_to_basis` for the forms of `u`)."""
    if u is None:
        return x
    if u.dim() == 2:
        return u.T @ x
    m, k, _ = u.shape
    return (u.transpose(1, 2) @ x.reshape(m, k, -1)).reshape(x.shape)


def g_from_basis(u: Tensor | None, y: Tensor) -> Tensor:
    """`U_G y` for columns `y` [out, c]: the inverse of `g_to_basis`."""
    if u is None:
        return y
    if u.dim() == 2:
        return u @ y
    m, k, _ = u.shape
    return (u @ y.reshape(m, k, -1)).reshape(y.shape)


def kronecker_scale_many(u_a: Tensor, u_g: Tensor | None, scale: Tensor, stacked: Tensor) -> Tensor:
    """`U_G (scale ⊙ (U_Gᵀ M U_A)) U_Aᵀ` for each matrix M [out, c] of `stacked` [n, out, c]: a function of a
    Kronecker-factored matrix (eigenbases U_A, U_G; `scale` [out, c] its eigenvalues' function) applied to n vectors
    in one product per factor."""
    return from_kronecker_basis(u_a, u_g, to_kronecker_basis(u_a, u_g, stacked) * scale)


def to_kronecker_basis(u_a: Tensor, u_g: Tensor | None, stacked: Tensor) -> Tensor:
    """`U_Gᵀ M U_A` for each matrix M [out, c] of `stacked` [n, out, c]: the matrices in the Kronecker eigenbasis (an
    orthogonal change of basis: inner products are kept)."""
    n, rows, cols = stacked.shape
    columns = stacked.permute(1, 0, 2).reshape(rows, n * cols)  # g_to_basis works on columns
    return g_to_basis(u_g, columns).reshape(rows, n, cols).permute(1, 0, 2) @ u_a


def factors_to_kronecker_basis(u_a: Tensor, u_g: Tensor | None, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """`U_Gᵀ (gᵀ a) U_A` [n, out, c] for each matrix of `pairs` given by its factors `g` [rows, out], `a` [rows, c] (a
    linear layer's gradient: the sum over positions of output gradient times input): `(g U_G)ᵀ (a U_A)`, without
    forming `gᵀ a`; the rows of all pairs rotated in one product per side."""
    g = g_rows_to_basis(u_g, torch.cat([g for g, _ in pairs]).to(u_a))
    a = torch.cat([a for _, a in pairs]).to(u_a) @ u_a
    sizes = [int(p[0].shape[0]) for p in pairs]
    return torch.stack([gi.T @ ai for gi, ai in zip(g.split(sizes), a.split(sizes))])


def factors_are_cheaper(rows: int, out: int, cols: int, g_width: int) -> bool:
    """Whether `factors_to_kronecker_basis` over `rows` positions costs fewer multiply-adds than `to_kronecker_basis`
    of the [out, cols] matrix: rows·(out·g_width + cols² + out·cols) against out·cols·g_width + out·cols², with
    `g_width` the width of G's eigenbasis blocks (out dense, k block-diagonal, 0 diagonal: `g_basis_width`). With
    few positions (a small set's gradient, or a wide layer) the factors win: a dense rotation costs out²·cols, a
    factored one rows·out²."""
    factored = rows * (out * g_width + cols * cols + out * cols)
    return factored < cols * out * g_width + out * cols * cols


def g_basis_width(u: Tensor | None) -> int:
    """The width of the blocks of G's eigenbasis `u` (dense [out, out]: out; [m, k, k]: k; diagonal None: 0)."""
    return 0 if u is None else int(u.shape[-1])


def from_kronecker_basis(u_a: Tensor, u_g: Tensor | None, stacked: Tensor) -> Tensor:
    """`U_G M U_Aᵀ` for each M of `stacked` [n, out, c]: the inverse of `to_kronecker_basis`."""
    n, rows, cols = stacked.shape
    back = (stacked @ u_a.T).permute(1, 0, 2).reshape(rows, n * cols)
    return g_from_basis(u_g, back).reshape(rows, n, cols).permute(1, 0, 2)


def g_structure(u: Tensor | None) -> str:
    """"dense", "block" or "diagonal": how a layer's G is kept, read from its eigenbasis."""
    return "diagonal" if u is None else ("block" if u.dim() == 3 else "dense")


def partition_layers(layers: Iterable[TrackedLayer], world_size: int) -> dict[str, int]:
    """{layer name: owning process} for `shard_factors`: by the size of the factors (`(in+1)² + out²`), largest first,
    each to the least loaded process (ties: the lowest rank); deterministic, so every process computes the same."""
    loads = [0] * world_size
    owner: dict[str, int] = {}
    sized = [(-(layer.in_features + int(layer.has_bias)) ** 2 - layer.out_features ** 2, i, layer)
             for i, layer in enumerate(layers)]
    for _, _, layer in sorted(sized, key=lambda t: (t[0], t[1])):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner[layer.name] = rank
        loads[rank] += (layer.in_features + int(layer.has_bias)) ** 2 + layer.out_features ** 2
    return {layer.name: owner[layer.name] for layer in layers}
