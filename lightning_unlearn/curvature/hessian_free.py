"""Hessian-free curvature: solve `(C + λI) x = v` by conjugate gradients with matrix-free curvature products.

    cg = HessianFree(model, product="ggn", max_iter=50, rtol=1e-4, progress_tol=1e-3)
    for batch in curvature_batches:
        cg.accumulate(batch)                 # stores the batch (detached, on the model's device)
    cg.finalize()                            # sums the number of valid positions across processes
    x = cg.inverse(grad, damping=1e-3)       # CG; cg.last_solve = {"iterations", "relative_residual", ...}
    x = cg.constrained_inverse(grad, [h], damping=1e-3)   # the same, restricted to hᵀx = 0 (projected CG)

A solve stops when the relative residual reaches `rtol`, when the quadratic model it minimises stops improving
(`progress_tol`), or after `max_iter` iterations, and returns its best iterate (see `solve`: the residual norm of CG
is not monotone and is a poor measure of the direction's quality). On ill-conditioned curvature (a memorising
model, relative damping 0.1) a solve of 50 iterations is a truncated Newton step that already holds most of the
exact step's decrease of the model (98.6 % on a tiny Qwen2, where K-FAC's direction holds 10 %).

Products (`C v`, see `matvec`):
- `product="ggn"`: the generalised Gauss-Newton `J^T H_out J v` (forward-mode `torch.func.jvp` for `J v`,
  `torch.func.vjp` for `J^T u`, `H_out` from `objective.hessian_vector`); always PSD.
- `product="hessian"`: the exact Hessian of the loss by double backward; may be indefinite. When CG meets
  a direction with `p^T (C + λI) p <= 0` it stops: `on_negative_curvature="raise"` (default) raises
  `NegativeCurvatureError`, `"stop"` returns the last iterate (`v / λ` if it happens at the first step) and
  sets `last_solve["negative_curvature"] = True`.

`C` is the curvature of the *mean* token loss over all stored batches: each product sums the per-batch
products of the summed per-position losses, passes the sum through `reduce` (one call per product, so every
process makes the same calls: after the reduction all processes hold the same numbers and run the same CG
iterations) and divides by the total number of valid positions. Products run through
`torch.func.functional_call` on the unwrapped module (DDP `.module` / `torch.compile` `_orig_mod`) in eval
mode (a CG solve needs one fixed linear operator, so dropout is switched off during the solve) and with eager
attention: fused kernels (transformers' default `sdpa`, flash attention) lack forward-mode AD and double backward,
so every Hugging Face model inside the module is switched to `"eager"` for the products
(`set_attn_implementation`) and back to its own implementation afterwards (`functional.eager_attention`); the same for
mixture-of-experts kernels (`grouped_mm` has no forward-mode AD; `set_experts_implementation`). A model that cannot
switch gets a `UserInputError` saying to load it with `attn_implementation="eager"` (`experts_implementation`).

Covered parameters: by default those of `find_layers(model, include, exclude)` (linear/Conv1D layers without
embeddings and LM head), the same set K-FAC covers, so the backends are comparable; `params=` names any
trainable parameters instead.

`state_dict()` keeps the configuration and the position count only: the batches are not saved (they may be
private training text), so a CG curvature is re-estimated from batches after loading (`reset()`,
`accumulate`, `finalize`); `apply` on a loaded, batch-less instance raises.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp

from ..errors import UserInputError
from .base import (
    Curvature,
    Vector,
    check_damping,
    check_damping_mode,
    check_finite,
    checked_grad,
    eval_mode,
    tensor_bytes,
)
from .conjugate_gradients import StoppingRule, conjugate_gradients
from .functional import EAGER_HINT, FunctionalModel, eager_attention
from .layers import covered_parameters, find_layers, layer_parameter_names, unwrap_model, warn_uncovered
from .objective import Objective, model_logits

PRODUCTS = ("ggn", "hessian")
ON_NEGATIVE = ("raise", "stop")
#: torch's errors for what torch.func cannot transform inside the model's forward -> what it is and the fix
TORCH_FUNC_LIMITS = (
    (("saved tensor hooks", "setup_context"),
     "the model's forward uses activation checkpointing (torch.utils.checkpoint, with use_reentrant True or False) "
     "or another autograd.Function / saved-tensor hook, which torch.func (the jvp/vjp of cg's products) does not "
     "support; turn the checkpointing off inside the forward (Hugging Face's gradient_checkpointing_enable() is fine: "
     "it is off in eval mode, where the products run), or use curvature='kfac'"),
    (("doesn't have storage", "does not have storage"),
     "a hook or the forward reads tensor data (e.g. .cpu().numpy(), .item() or .tolist() in a forward hook that "
     "records activations), which cg's products cannot do: they run the forward under torch.func (jvp/vjp), whose "
     "tensors have no storage; remove such hooks while unlearning, or use curvature='kfac'"),
)


class HessianFree(Curvature):
    """Conjugate gradients on `(C + λI) x = v` with GGN- or Hessian-vector products over stored batches."""

    name = "cg"
    supported_powers = (-1.0,)

    def __init__(
        self,
        model: nn.Module,
        *,
        product: str = "ggn",
        max_iter: int = 50,
        rtol: float = 1e-4,
        progress_tol: float = 1e-3,
        warm_start: bool = False,
        on_negative_curvature: str = "raise",
        params: Iterable[str] | None = None,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        objective: Objective | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(unwrap_model(model), objective=objective, **kwargs)
        if product not in PRODUCTS:
            raise ValueError(f"product must be one of {PRODUCTS}, got {product!r}")
        if on_negative_curvature not in ON_NEGATIVE:
            raise ValueError(f"on_negative_curvature must be one of {ON_NEGATIVE}, got {on_negative_curvature!r}")
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        if not (math.isfinite(float(rtol)) and float(rtol) > 0):
            raise ValueError(f"rtol must be a finite number > 0, got {rtol}")
        if not (math.isfinite(float(progress_tol)) and float(progress_tol) >= 0):
            raise ValueError(f"progress_tol must be a finite number >= 0 (0: stop on rtol or max_iter only), got "
                             f"{progress_tol}")
        self.product = product
        self.max_iter = int(max_iter)
        self.rtol = float(rtol)
        self.progress_tol = float(progress_tol)
        self.warm_start = bool(warm_start)
        self.on_negative_curvature = on_negative_curvature
        self._warned: set[str] = set()
        if params is None:
            layers = find_layers(self.model, include, exclude)
            warn_uncovered(self.model, layers, self.name, include, exclude)
            self.param_names = layer_parameter_names(layers)
        else:
            self.param_names = covered_parameters(self.model, params, include, exclude)
        self.last_solve: dict[str, Any] = {}
        self._reset()

    # ------------------------------------------------------------------ statistics
    def _reset(self) -> None:
        #: (batch, sign): sign -1 marks batches removed by `subtract`
        self.batches: list[tuple[dict[str, Tensor], float]] = []
        self.count = torch.zeros((), dtype=torch.float64)
        self._local_count = 0
        self._loaded = False
        self._previous: Tensor | None = None
        self.last_solve = {}

    def _device(self) -> torch.device:
        params = dict(self.model.named_parameters())
        return params[self.param_names[0]].device

    def _accumulate(self, batch: Mapping[str, Tensor]) -> None:
        device = self._device()
        stored = {k: v.detach().to(device).clone() for k, v in batch.items() if isinstance(v, Tensor)}
        with torch.no_grad(), eval_mode(self.model):
            pos = self.objective.positions(model_logits(self.model, stored), stored)
        self.batches.append((stored, 1.0))
        self._local_count += pos.count

    def _finalize(self) -> None:
        count = float(self.reduce(torch.tensor(float(self._local_count), dtype=torch.float64, device=self._device())))
        if count <= 0:
            raise RuntimeError("cg: no valid position was seen; accumulate batches with labels != -100 first")
        params = dict(self.model.named_parameters())
        for n in self.param_names:
            check_finite(f"parameter {n!r} (the model's weights)", params[n].detach())
        self.count = torch.tensor(count, dtype=torch.float64)

    # ------------------------------------------------------------------ products
    def _work_dtype(self) -> torch.dtype:
        params = dict(self.model.named_parameters())
        dtype = params[self.param_names[0]].dtype
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def _flatten(self, vector: Mapping[str, Tensor]) -> Tensor:
        dtype, device = self._work_dtype(), self._device()
        return torch.cat([vector[n].detach().reshape(-1).to(device=device, dtype=dtype) for n in self.param_names])

    def _unflatten(self, flat: Tensor, like: Mapping[str, Tensor] | None = None) -> Vector:
        params = dict(self.model.named_parameters())
        out, offset = {}, 0
        for n in self.param_names:
            p = params[n]
            ref = like[n] if like is not None else p
            out[n] = flat[offset: offset + p.numel()].reshape(p.shape).to(dtype=ref.dtype, device=ref.device)
            offset += p.numel()
        return out

    def _batch_product(self, batch: Mapping[str, Tensor], tangent: Vector) -> Vector:
        """The curvature of the *summed* per-position loss of one batch times `tangent`."""
        model = self.model
        named = dict(model.named_parameters())
        fixed = {n: p.detach() for n, p in named.items() if n not in tangent}
        primals = {n: named[n].detach() for n in self.param_names}

        def logits_of(p: Vector) -> Tensor:
            return model_logits(FunctionalModel(model, {**fixed, **p}), batch)

        if self.product == "ggn":
            def outputs_of(p: Vector) -> Tensor:
                logits = logits_of(p)
                return self.objective.positions(logits, batch).outputs

            outputs, vjp_fn = vjp(outputs_of, primals)
            if outputs.shape[0] == 0:
                return {n: torch.zeros_like(t) for n, t in primals.items()}
            _, jv = jvp(outputs_of, (primals,), (tangent,))
            hjv = self.objective.hessian_vector(outputs.detach(), jv)
            (result,) = vjp_fn(hjv)
            return result
        # exact Hessian by double backward
        leaves = {n: t.clone().requires_grad_(True) for n, t in primals.items()}
        with torch.enable_grad():
            logits = logits_of(leaves)
            pos = self.objective.positions(logits, batch)
            if pos.count == 0:
                return {n: torch.zeros_like(t) for n, t in primals.items()}
            loss = self.objective.per_position_loss(pos.outputs, pos.targets).sum()
            plist = [leaves[n] for n in self.param_names]
            grads = checked_grad(self.name, loss, plist, create_graph=True, allow_unused=True)
            pairs = [(g, tangent[n]) for g, n in zip(grads, self.param_names) if g is not None and g.requires_grad]
            hv = checked_grad(self.name, [g for g, _ in pairs], plist, grad_outputs=[t for _, t in pairs],
                              allow_unused=True) if pairs else [None] * len(plist)
        return {n: (torch.zeros_like(primals[n]) if h is None else h.detach()) for n, h in zip(self.param_names, hv)}

    def _matvec_flat(self, flat: Tensor) -> Tensor:
        """`C v` on flat vectors (work dtype); one `reduce` call per product."""
        params = dict(self.model.named_parameters())
        tangent = self._unflatten(flat)
        tangent = {n: t.to(params[n].dtype) for n, t in tangent.items()}
        total = torch.zeros_like(flat)
        with eval_mode(self.model), eager_attention(self.model):
            for batch, sign in self.batches:
                try:
                    prod = self._batch_product(batch, tangent)
                except (NotImplementedError, RuntimeError) as err:
                    text = str(err)
                    for fragments, fix in TORCH_FUNC_LIMITS:
                        if any(f in text for f in fragments):
                            raise UserInputError(f"cg: {fix} (torch: {text.splitlines()[0][:120]})") from err
                    # a fused kernel outside transformers' switch
                    if "attention" not in text or ("forward AD" not in text and "not implemented" not in text):
                        raise
                    raise UserInputError(f"cg: the model's attention kernel has no forward-mode AD or double "
                                         f"backward ({text.splitlines()[0]}); {EAGER_HINT}") from err
                total += sign * self._flatten(prod)
        total = self.reduce(total) / float(self.count)
        offset = 0
        for n in self.param_names:
            size = params[n].numel()
            check_finite(f"parameter {n!r} ({self.product}-vector product)", total[offset: offset + size])
            offset += size
        return total

    def matvec(self, vector: Mapping[str, Tensor]) -> Vector:
        """`C v` (no damping) for a parameter-shaped vector: the mean-loss GGN or Hessian times `v`."""
        if not self.finalized:
            raise RuntimeError("cg: matvec() before finalize(); accumulate batches, then call finalize()")
        self.check_vector(vector)
        self._check_batches()
        return self._unflatten(self._matvec_flat(self._flatten(vector)), like=vector)

    def _check_batches(self) -> None:
        if self._loaded:
            raise RuntimeError(
                "cg: this curvature was restored from a state_dict, which keeps no batches (CG is matrix-free);"
                " call reset(), accumulate curvature batches and finalize() again"
            )

    # ------------------------------------------------------------------ solve
    #: Rademacher probes of the Hutchinson trace estimate behind relative damping
    trace_probes: int = 4

    def _damping_scales(self) -> dict[str, float]:
        """One block: the mean eigenvalue trace(C)/d, by Hutchinson's estimate with `trace_probes` Rademacher
        probes from a generator seeded with `seed` (`trace_probes` products over the curvature batches)."""
        self._check_batches()
        gen = torch.Generator(device="cpu").manual_seed(self.seed + 1)
        d = sum(int(t.numel()) for t in self._flatten_shapes())
        total = 0.0
        for _ in range(self.trace_probes):
            z = (torch.randint(0, 2, (d,), generator=gen) * 2 - 1).to(device=self._device(), dtype=self._work_dtype())
            total += float(z @ self._matvec_flat(z))
        return {"all": total / (self.trace_probes * d)}

    def _flatten_shapes(self) -> list[Tensor]:
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.param_names]

    def _quadratic(self, vector: Vector) -> float:
        self._check_batches()
        flat = self._flatten(vector)
        return float(flat @ self._matvec_flat(flat))

    def _apply(self, vector: Vector, damping_of, power: float) -> Vector:
        self._check_batches()
        b = self._flatten(vector)
        check_finite("the vector passed to apply()", b)
        x, info = self.solve(b, damping_of("all"))
        self.last_solve = info
        return self._unflatten(x, like=vector)

    def constrained_inverse(self, vector: Mapping[str, Tensor], constraints: list[Mapping[str, Tensor]],
                            damping: float, *, mode: str = "absolute") -> Vector:
        """`argmin_x ½ xᵀ(C + λI)x - vᵀx` subject to `hᵀx = 0` for every `h` in `constraints` (parameter-shaped
        vectors, e.g. holdout gradients): the damped Newton direction of `v` that leaves each constraint's loss in
        place to first order. One *projected* CG solve (CG restricted to the null space of the constraints, Gould,
        Hribar & Nocedal 2001) instead of the k + 1 solves of `x = A⁻¹v - A⁻¹H α`, `HᵀA⁻¹H α = HᵀA⁻¹v` that other
        backends use (the same x, up to the solves' accuracy); `damping`/`mode` as in `apply`."""
        damping = check_damping(damping)
        check_damping_mode(mode)
        if not self.finalized:
            raise RuntimeError("cg: constrained_inverse() before finalize(); accumulate batches, then call finalize()")
        self.check_vector(vector)
        for h in constraints:
            self.check_vector(h)
        self._check_batches()
        lam = damping if mode == "absolute" else damping * self.damping_scales()["all"]
        b = self._flatten(vector)
        check_finite("the vector passed to constrained_inverse()", b)
        h = torch.stack([self._flatten(c) for c in constraints], 1) if constraints else None
        x, info = self.solve(b, lam, constraints=h)
        self.last_solve = info
        return self._unflatten(x, like=vector)

    def _warn_once(self, kind: str, message: str) -> None:
        """One warning of each kind per curvature object (a run solves many systems; the first says it all)."""
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=5)

    def solve(self, b: Tensor, damping: float, constraints: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
        """CG on flat vectors (`conjugate_gradients.conjugate_gradients`, its stopping rule from this curvature's
        `rtol`, `progress_tol` and `max_iter`): returns `x ≈ (C + λI)^-1 b` and the info dict (also kept in
        `last_solve`); with `constraints` [d, k], the solution restricted to `constraintsᵀ x = 0` (projected CG)."""
        rule = StoppingRule(self.rtol, self.max_iter, self.progress_tol, self.on_negative_curvature,
                            f"{self.product} products")
        x, info = conjugate_gradients(lambda p: self._matvec_flat(p) + damping * p, b, rule, damping=damping,
                                      constraints=constraints, start=self._previous if self.warm_start else None,
                                      warn=self._warn_once)
        self._previous = x.detach().clone() if self.warm_start else None
        self.last_solve = info
        return x, info

    # ------------------------------------------------------------------ subtract, state, memory
    def _subtract(self, other: Curvature) -> None:
        """`C = (n C - n_o C_o) / (n - n_o)`: the other's batches enter every product with sign -1. Exact (and
        PSD for GGN products) when the other's batches are among this one's; otherwise CG reports negative
        curvature if the difference is indefinite."""
        assert isinstance(other, HessianFree)
        self._check_batches()
        other._check_batches()
        if other.product != self.product:
            raise ValueError(f"cannot subtract {other.product} products from {self.product} products")
        n, n_o = float(self.count), float(other.count)
        if n_o >= n:
            raise ValueError(f"cannot remove {n_o:.0f} positions from a curvature of {n:.0f}; is the full curvature"
                             " really accumulated over a superset of the forget data?")
        self.batches = self.batches + [(b, -s) for b, s in other.batches]
        self.count = torch.tensor(n - n_o, dtype=torch.float64)
        self._previous = None

    def _state(self) -> dict[str, Any]:
        return {"product": self.product, "max_iter": self.max_iter, "rtol": self.rtol,
                "progress_tol": self.progress_tol, "warm_start": self.warm_start,
                "on_negative_curvature": self.on_negative_curvature, "count": self.count.clone()}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self._reset()
        self.product = state["product"]
        self.max_iter = int(state["max_iter"])
        self.rtol = float(state["rtol"])
        self.progress_tol = float(state.get("progress_tol", self.progress_tol))  # files from before it existed
        self.warm_start = bool(state["warm_start"])
        self.on_negative_curvature = state["on_negative_curvature"]
        self.count = torch.as_tensor(state["count"], dtype=torch.float64)
        self._loaded = True

    def memory_footprint(self) -> dict[str, int]:
        """Stored batches plus an estimate of CG's work vectors (b, x, r, p, Ap and the product accumulator);
        the activations of each product (one batch at a time, like a training step) are not counted."""
        batches = sum(tensor_bytes(*b.values()) for b, _ in self.batches)
        params = dict(self.model.named_parameters())
        d = sum(params[n].numel() for n in self.param_names)
        work = 6 * d * torch.empty((), dtype=self._work_dtype()).element_size()
        work += 0 if self._previous is None else tensor_bytes(self._previous)
        return {"batches": batches, "cg_vectors": work, "total": batches + work}
