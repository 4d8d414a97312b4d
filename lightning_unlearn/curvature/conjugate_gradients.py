"""Conjugate gradients on `A x = b` for a matrix-free symmetric `A`, optionally projected onto the null space of
constraints, stopped on the quadratic model's progress (`HessianFree` runs it with `A = C + λI`).

Apart from the operator: this file knows nothing of models or batches, only `op(p) = A p` on flat vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: a solve that ends at `max_iter` while its last iterations still made more than this share of the quadratic model's
#: decrease is warned about (once per curvature object): the truncation then changes the direction
TRUNCATION_WARNING = 0.05


class NegativeCurvatureError(ArithmeticError):
    """CG met a direction `p` with `p^T (C + λI) p <= 0` (only possible with `product="hessian"` or after a
    subtraction that left the curvature indefinite)."""


@dataclass(frozen=True)
class StoppingRule:
    """When a solve ends: `rtol` (relative residual), `max_iter`, `progress_tol` (the model's stall, 0: off), and
    what a non-positive curvature does (`"raise"` or `"stop"`); `what` names the operator in messages."""

    rtol: float
    max_iter: int
    progress_tol: float
    on_negative_curvature: str = "raise"
    what: str = "ggn products"


def projector(constraints: Tensor | None) -> Callable[[Tensor], Tensor]:
    """`v -> v - U Uᵀ v` (applied twice, for float32), U an orthonormal basis of the constraints' span (columns
    of `constraints` [d, k] whose singular value is below 1e-6 of the largest are dropped); identity for None."""
    if constraints is None:
        return lambda v: v
    u, s, _ = torch.linalg.svd(constraints.double(), full_matrices=False)
    keep = s > (s.max() * 1e-6 if len(s) else 0.0)
    basis = u[:, keep].to(constraints.dtype)

    def project(v: Tensor) -> Tensor:
        v = v - basis @ (basis.T @ v)
        return v - basis @ (basis.T @ v)

    return project


def conjugate_gradients(op: Callable[[Tensor], Tensor], b: Tensor, rule: StoppingRule, *, damping: float,
                        constraints: Tensor | None = None, start: Tensor | None = None,
                        warn: Callable[[str, str], None] = lambda kind, message: None,
                        ) -> tuple[Tensor, dict[str, Any]]:
    """CG on flat vectors: returns `x ≈ A^-1 b` (`op(p) = A p`, `A = C + λI` with `damping` λ, recorded in the
    info) and the info dict; with `constraints` [d, k], the solution restricted to `constraintsᵀ x = 0` (projected
    CG, Gould, Hribar & Nocedal 2001); `start`: a warm start (projected first).

    When to stop. CG minimises the quadratic model `q(x) = ½ xᵀAx - bᵀx` over growing Krylov spaces, so `q` falls at
    every iteration, while the residual norm need not: on a tiny memorising Qwen2 it rose from 1 to 2.1 over the first
    iterations and was still 0.28 after 50, when the iterate already held 98.6 % of the exact solution's decrease of
    `q` (cosine 0.995 with it). A solve therefore ends at the first of: the relative residual at most `rtol`; the
    model's progress stalled (Martens 2010: the last k = max(10, i/10) iterations lowered `q` by less than
    `k × progress_tol` of its value; `stopped="progress"`); `max_iter` iterations (`stopped="max_iter"`, a truncated
    Newton step, `warn("max_iter", ...)` when its last iterations still made more than `TRUNCATION_WARNING` of the
    decrease); `q` rising (round-off or a curvature that is not positive definite, `stopped="breakdown"`, warned),
    when the iterate before the rise is returned. `info["progress"]` is the share of `q`'s decrease made by the last k
    iterations."""
    project = projector(constraints)
    pb = project(b)
    bnorm = float(pb.norm())
    info: dict[str, Any] = {"iterations": 0, "relative_residual": 0.0, "converged": True,
                            "negative_curvature": False, "damping": damping, "stopped": "converged",
                            "progress": 0.0, "constrained": 0 if constraints is None else int(constraints.shape[1])}
    if bnorm == 0.0:
        return torch.zeros_like(b), info
    if start is not None and start.shape == b.shape:
        x = project(start.clone())
        r = b - op(x)
    else:
        x = torch.zeros_like(b)
        r = b.clone()
    g = project(r)
    p = g.clone()
    rg = float(r @ g)
    info["relative_residual"] = float(g.norm()) / bnorm
    info["converged"] = info["relative_residual"] <= rule.rtol
    q = -0.5 * float(x.double() @ (b + r).double())
    history = [q]
    best_q, best_x = q, x
    k = 0
    while not info["converged"] and k < rule.max_iter:
        ap = op(p)
        curv = float(p @ ap)
        k += 1
        if not curv > 0.0:
            info["negative_curvature"] = True
            info["stopped"] = "negative_curvature"
            info["iterations"] = k
            if rule.on_negative_curvature == "raise":
                raise NegativeCurvatureError(
                    f"cg: negative curvature p^T (C + λI) p = {curv:.3e} <= 0 at iteration {k} with damping "
                    f"{damping:g} ({rule.what}); raise the damping, use product='ggn' (PSD), or "
                    "on_negative_curvature='stop' to return the last iterate"
                )
            if k == 1 and not bool(best_x.any()):
                best_x = pb / damping
            break
        alpha = rg / curv
        x = x + alpha * p
        r = r - alpha * ap
        g = project(r)
        rg_new = float(r @ g)
        q = -0.5 * float(x.double() @ (b + r).double())
        history.append(q)
        info["iterations"] = k
        info["relative_residual"] = math.sqrt(max(rg_new, 0.0)) / bnorm
        if not q <= best_q + 1e-4 * abs(best_q):  # q must fall: round-off (or an indefinite C) took over
            info["stopped"] = "breakdown"
            break
        best_q, best_x = min(q, best_q), x  # within round-off of the lowest q: CG's latest iterate is its best
        if info["relative_residual"] <= rule.rtol:
            info["converged"] = True
            break
        window = max(10, math.ceil(0.1 * k))
        if k > window and q < 0.0:
            info["progress"] = (q - history[k - window]) / q
            if rule.progress_tol > 0 and info["progress"] < window * rule.progress_tol:
                info["converged"], info["stopped"] = True, "progress"
                break
        p = g + (rg_new / rg) * p
        rg = rg_new
    if not info["converged"] and not info["negative_curvature"]:
        window = min(max(10, math.ceil(0.1 * k)), k)
        if k and history[k] < 0.0:
            info["progress"] = (history[k] - history[k - window]) / history[k]
        if info["stopped"] == "breakdown":
            warn("breakdown", (
                f"cg: the quadratic model stopped decreasing at iteration {k} (float round-off, or a curvature "
                f"that is not positive definite); the best iterate is used; raise the damping or use float64 "
                f"weights"))
        else:
            info["stopped"] = "max_iter"
        if info["stopped"] == "max_iter" and info["progress"] > TRUNCATION_WARNING:
            warn("max_iter", (
                f"cg: not converged after {k} iterations (relative residual {info['relative_residual']:.2e} > rtol "
                f"{rule.rtol:g}; the last iterations still made {info['progress']:.0%} of the quadratic model's "
                f"decrease): the best iterate is used, a truncated Newton step; raise max_iter, or the damping, "
                f"for a converged solve, or use curvature='kfac' for a cheaper one (warned once per curvature)"))
    return best_x, info
