"""K-FAC's statistics: what one batch adds to the sums of A and G (forward hooks on the tracked layers, the output
gradients of the Fisher type's loss), and EK-FAC's eigenvalue correction; `kfac.py` turns them into the operator.

The scalars whose output gradients are the per-position `g` depend on the Fisher type: the data labels
(`empirical`), `mc_samples` labels drawn from the model (`mc`), or one backward pass per column of the output
Hessian's square root (`type2`, small outputs only). The conventions: "expand" (every valid position a sample) and
"reduce" (per sequence: inputs averaged, output gradients summed over its valid positions).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserInputError
from .base import REENTRANT_FIX, check_finite
from .experts import check_router_output, experts_recorders, routed, router_logits
from .kronecker import g_rows_to_basis
from .layers import TrackedLayer

#: the largest output dimension for which `type2` (one backward pass per output) is allowed
TYPE2_MAX_OUTPUTS = 512


def exclude_hint(names: Iterable[str]) -> str:
    """How to leave the layers `names` out of K-FAC, directly and through a request's settings."""
    patterns = [f"^{re.escape(n)}$" for n in names]
    return (f"leave {'it' if len(patterns) == 1 else 'them'} out with exclude={patterns!r} (KFAC(model, exclude=...); "
            f"in a request: UnlearnSettings(curvature_kwargs={{'exclude': {patterns!r}}}))")


def symmetric_gram(x: Tensor, leaf: int | None = None) -> Tensor:
    """`xᵀx` for rows `x` [n, d], computing each off-diagonal block once: split the columns in halves, form the
    cross block `x₁ᵀx₂` and mirror it, recurse on the diagonal blocks down to `leaf` columns (128 on CPU; 1024
    elsewhere, not measured there: larger products keep an accelerator busy). Each level saves a quarter of the
    products it splits; the entries are those of `x.T @ x` up to rounding. Measured: `docs/curvature.md`."""
    if leaf is None:
        leaf = 128 if x.device.type == "cpu" else 1024
    d = x.shape[1]
    if d <= leaf:
        return x.T @ x
    h = d // 2
    first, second = x[:, :h], x[:, h:]
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    out[:h, :h] = symmetric_gram(first, leaf)
    out[h:, h:] = symmetric_gram(second, leaf)
    cross = first.T @ second
    out[:h, h:] = cross
    out[h:, :h] = cross.T
    return out


def _rows(x: Tensor, mask: Tensor) -> Tensor:
    """`x[mask]` (rows of `x` [..., T, d] at the True positions of `mask` [..., T], in order), by slicing where the
    mask is every position, or every position but the last (unpadded text under the causal shift, whose last position
    has no target): a boolean index finds the rows one by one, about 5 × the time of the copy (2,048 rows of 513,
    timed by hand)."""
    if mask.dim() >= 1 and mask.shape[-1] >= 1:
        if bool(mask.all()):
            return x.reshape(-1, x.shape[-1])
        if bool(mask[..., :-1].all()) and not bool(mask[..., -1].any()):
            return x[..., :-1, :].reshape(-1, x.shape[-1])
    return x[mask]


class _Capture:
    """What a forward hook saw of one layer during one forward: inputs (detached) and outputs (in the graph); for an
    expert, also the token rows (of the flattened batch) it was routed, per call."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self.rows: list[Tensor] = []


class KFACStatistics:
    """The statistics half of `KFAC` (a mixin): `_accumulate(batch)` adds one batch's sums of A and G (and sample
    counts) per tracked layer, `correct_eigenvalues(batches)` fits EK-FAC's eigenvalues. It reads the attributes that
    `KFAC` sets: `layers`, `objective`, `fisher_type`, `mc_samples`, `kfac_approx`, `compute_dtype`, `g_block`, the
    sums and `count`, `eigen` and `corrected`."""

    layers: list[TrackedLayer]
    objective: Any
    fisher_type: str
    mc_samples: int
    kfac_approx: str
    compute_dtype: torch.dtype
    g_block: dict[str, int]
    a_sums: dict[str, Tensor]
    g_sums: dict[str, Tensor]
    a_counts: dict[str, Tensor]
    count: Tensor
    eigen: dict[str, tuple[Tensor, Tensor, Tensor | None, Tensor]]
    corrected: dict[str, Tensor]
    _checked_experts: set[str]  # the experts modules (routers) whose routed forward (logits) were checked

    def _forward_with_hooks(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, _Capture]]:
        captures = {layer.name: _Capture() for layer in self.layers}

        routers = {layer.name for layer in self.layers if layer.router}

        def hook(name: str):
            def fn(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                output = router_logits(output)
                if name in routers and name not in self._checked_experts:
                    check_router_output(name, module, inputs[0], output)
                    self._checked_experts.add(name)
                captures[name].inputs.append(inputs[0].detach())
                captures[name].outputs.append(output)

            return fn

        def keep(name: str, x: Tensor, out: Tensor, rows: Tensor) -> None:
            captures[name].inputs.append(x)
            captures[name].outputs.append(out)
            captures[name].rows.append(rows)

        experts, recorder = experts_recorders(self.layers, keep)
        handles = [layer.module.register_forward_hook(hook(layer.name)) for layer in self.layers
                   if layer.expert is None]
        try:
            with routed(experts, recorder, self._checked_experts):
                logits = self.logits(batch)
        finally:
            for h in handles:
                h.remove()
        # an expert the router sent no token of this batch has nothing to add
        missing = [layer.name for layer in self.layers if layer.expert is None and not captures[layer.name].outputs]
        if missing:
            # K-FAC's block of a layer that never runs has no statistics (A = G = 0): its gradient is 0 and so is
            # its Newton step, but a fractional power (fisher_forgetting's noise) would put damping^p-sized noise on
            # its weights, and dropping it here would change the covered parameters after construction (and the
            # checkpoint format); so it is refused, naming the exact fix
            raise UserInputError(
                f"kfac: tracked layer(s) {missing[:3]}{' ...' if len(missing) > 3 else ''} saw no forward pass on this "
                f"batch (the model does not call them), so K-FAC has no statistics for them; {exclude_hint(missing)},"
                " or make sure the model calls them"
            )
        return logits, captures

    def _backward_terms(self, pos, batch: Mapping[str, Tensor]) -> list[tuple[Tensor, float]]:
        """Scalars whose gradients w.r.t. the layer outputs are the per-position gradients `g`, with weights."""
        if self.fisher_type == "empirical":
            return [(self.objective.per_position_loss(pos.outputs, pos.targets).sum(), 1.0)]
        if self.fisher_type == "mc":
            terms = []
            for draw in range(self.mc_samples):
                y = self.sample_targets(pos, batch, draw)
                terms.append((self.objective.per_position_loss(pos.outputs, y).sum(), 1.0 / self.mc_samples))
            return terms
        c = pos.outputs.shape[-1]
        if c > TYPE2_MAX_OUTPUTS:
            raise ValueError(
                f"kfac: fisher_type='type2' needs one backward pass per output ({c} here, more than "
                f"{TYPE2_MAX_OUTPUTS}); use fisher_type='mc' (the default) or 'empirical' for language models"
            )
        sqrt = self.objective.hessian_sqrt(pos.outputs.detach())  # [N, C, K]
        return [((pos.outputs * sqrt[:, :, k]).sum(), 1.0) for k in range(sqrt.shape[-1])]

    def _select(self, layer: TrackedLayer, x: Tensor, mask: Tensor, rows: Tensor | None = None) -> Tensor:
        """Rows of `x` [..., d] at the valid positions -> [N, d] (expand), or [B, T, d] masked (reduce). An expert's
        rows `x` [n, d] are the tokens `rows` of the flattened batch routed to it: those at valid positions."""
        if rows is not None:
            flat = mask.reshape(-1)
            if int(rows.max()) >= flat.numel():
                raise ValueError(f"kfac: expert {layer.name!r} sees token rows beyond the logits' {flat.numel()} "
                                 "positions; K-FAC needs one experts row per output position (exclude its experts)")
            return x[flat[rows.to(flat.device)]].to(self.compute_dtype)
        lead = tuple(x.shape[:-1])
        if lead != tuple(mask.shape):
            if math.prod(lead) != mask.numel():
                raise ValueError(
                    f"kfac: layer {layer.name!r} sees inputs/outputs with leading shape {lead}, but the logits' "
                    f"positions have shape {tuple(mask.shape)}; K-FAC needs one layer row per output position "
                    "(exclude this layer)"
                )
            x = x.reshape(*mask.shape, x.shape[-1])
        x = x.to(self.compute_dtype)
        if self.kfac_approx == "reduce" and mask.dim() >= 2:
            return x * mask.unsqueeze(-1).to(x.dtype)
        return _rows(x, mask)

    def _with_ones(self, layer: TrackedLayer, a: Tensor) -> Tensor:
        if not layer.has_bias:
            return a
        return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)

    def _layer_stats(self, pos, captures: dict[str, _Capture], batch: Mapping[str, Tensor]):
        """Yield per layer and per call: (layer, a-rows, [(g-rows, weight)]) with the convention applied."""
        mask = pos.mask
        outputs = [(layer, i) for layer in self.layers for i in range(len(captures[layer.name].outputs))]
        out_tensors = [captures[layer.name].outputs[i] for layer, i in outputs]
        terms = self._backward_terms(pos, batch)
        grads_per_term = []
        cut = list(dict.fromkeys(layer.name for (layer, _), o in zip(outputs, out_tensors) if not o.requires_grad))
        if cut:  # run without gradients (reentrant checkpointing, torch.no_grad): autograd.grad cannot reach them
            raise UserInputError(f"kfac: the outputs of tracked layer(s) {cut[:3]} do not require grad; "
                                 f"{REENTRANT_FIX}")
        for t, (scalar, w) in enumerate(terms):
            grads = torch.autograd.grad(scalar, out_tensors, retain_graph=t < len(terms) - 1, allow_unused=True)
            grads_per_term.append(([None if g is None else g.detach() for g in grads], w))
        # a call whose output does not reach the loss adds nothing to the curvature (its g is 0) and is left out:
        # e.g. DoRA runs its adapters on an identity matrix to measure the weight's norm, detached; a layer none of
        # whose calls reaches the loss is refused
        unused = {j for j in range(len(outputs)) if all(grads[j] is None for grads, _ in grads_per_term)}
        dead = [layer.name for layer in self.layers if layer.expert is None
                and all(j in unused for j, (other, _) in enumerate(outputs) if other.name == layer.name)]
        if dead:
            raise UserInputError(
                f"kfac: tracked layer {dead[0]!r} saw a forward but no backward (its output does not reach the loss, "
                f"so its gradient is 0); {exclude_hint([dead[0]])}, or freeze its weight (requires_grad_(False))"
            )
        reduce_seq = self.kfac_approx == "reduce" and mask.dim() >= 2
        seq_valid = mask.reshape(mask.shape[0], -1).any(-1) if reduce_seq else None
        for j, (layer, i) in enumerate(outputs):
            if j in unused:
                continue
            rows = captures[layer.name].rows[i] if layer.expert is not None else None
            a = self._with_ones(layer, self._select(layer, captures[layer.name].inputs[i], mask, rows))
            gs = [(self._select(layer, torch.zeros_like(out_tensors[j]) if grads[j] is None else grads[j], mask,
                                rows), w) for grads, w in grads_per_term]
            if reduce_seq:
                # a: mean over the valid positions of each sequence; g: sum over them
                dims = tuple(range(1, a.dim() - 1))
                n_valid = mask.reshape(mask.shape[0], -1).sum(-1).clamp_min(1).to(a.dtype)
                a = (a.sum(dims) / n_valid[:, None])[seq_valid]
                if layer.has_bias:
                    a[:, -1] = 1.0
                gs = [(g.sum(dims)[seq_valid], w) for g, w in gs]
            yield layer, a, gs

    def _g_moment(self, layer: TrackedLayer, g: Tensor) -> Tensor:
        """Σ_n g_n g_nᵀ in the form this layer keeps: [out, out], its diagonal blocks [m, k, k], or its diagonal."""
        k = self.g_block[layer.name]
        if k == layer.out_features:
            return symmetric_gram(g)
        if k == 1:
            return g.pow(2).sum(0)
        blocks = g.reshape(g.shape[0], -1, k).transpose(0, 1)  # [m, n, k]
        return blocks.transpose(1, 2) @ blocks

    def _g_zeros(self, layer: TrackedLayer, device: torch.device) -> Tensor:
        d, k = layer.out_features, self.g_block[layer.name]
        shape = (d, d) if k == d else ((d,) if k == 1 else (d // k, k, k))
        return torch.zeros(shape, dtype=self.compute_dtype, device=device)

    def _accumulate(self, batch: Mapping[str, Tensor]) -> None:
        logits, captures = self._forward_with_hooks(batch)
        pos = self.objective.positions(logits, batch)
        if pos.count == 0:
            return
        for layer, a, gs in self._layer_stats(pos, captures, batch):
            a_sum = symmetric_gram(a)
            g_sum = sum(w * self._g_moment(layer, g) for g, w in gs)
            self.a_sums[layer.name] = a_sum if layer.name not in self.a_sums else self.a_sums[layer.name] + a_sum
            self.g_sums[layer.name] = g_sum if layer.name not in self.g_sums else self.g_sums[layer.name] + g_sum
            cnt = torch.tensor(float(a.shape[0]), dtype=torch.float64)
            self.a_counts[layer.name] = cnt if layer.name not in self.a_counts else self.a_counts[layer.name] + cnt
        self.count += pos.count

    def correct_eigenvalues(self, batches: Iterable[Mapping[str, Tensor]]) -> Any:
        """EK-FAC: replace `s_G s_A^T` by `E_n[(U_G^T g_n a_n^T U_A)^2]` over the valid positions of `batches`.

        Call after `finalize()`; sums go through `reduce` like the factors. Returns self.
        """
        if not self.finalized:
            raise RuntimeError("kfac: correct_eigenvalues() before finalize(); accumulate and finalize first")
        sums: dict[str, Tensor] = {}
        count = torch.zeros((), dtype=torch.float64)
        for batch in batches:
            logits, captures = self._forward_with_hooks(batch)
            pos = self.objective.positions(logits, batch)
            if pos.count == 0:
                continue
            for layer, a, gs in self._layer_stats(pos, captures, batch):
                u_a, _, u_g, _ = (None if t is None else t.to(self.compute_dtype) for t in self.eigen[layer.name])
                pa = (a @ u_a).pow(2)  # [n, in+1]
                s = sum(w * (g_rows_to_basis(u_g, g).pow(2).T @ pa) for g, w in gs)
                sums[layer.name] = s if layer.name not in sums else sums[layer.name] + s
            count += pos.count
        total = float(self.reduce(count.clone()))
        for layer in self.layers:
            d_in = layer.in_features + int(layer.has_bias)
            s = sums.get(layer.name, torch.zeros(layer.out_features, d_in, dtype=self.compute_dtype,
                                                 device=self.layers[0].weight.device))
            sums[layer.name] = self.reduce(s.clone())
        if total <= 0:
            raise RuntimeError("kfac: correct_eigenvalues() saw no valid position; pass batches with labels != -100")
        for layer in self.layers:
            s = sums[layer.name] / total
            check_finite(f"layer {layer.name!r}", s)
            self.corrected[layer.name] = self._store(s)
        self._scales = self._raw = None
        return self
