"""K-FAC: a Kronecker-factored Fisher/GGN per linear layer, `C_l ≈ A_l ⊗ G_l`, inverted in the eigenbasis.

For a tracked layer with input `a` (a ones column appended when it has a bias) and output `o`:

    A = (1/N) Σ_n [a_n, 1][a_n, 1]^T            G = (1/N) Σ_n g_n g_n^T,   g_n = d l_n / d o_n

summed over the valid positions n (shifted label != -100) of every accumulated batch, with `l_n` the loss of
one position, so that `A ⊗ G` approximates the Fisher/GGN of the *mean* loss (the scale of
curvlinops' `KFACLinearOperator`). "expand" convention (Eschenhagen et al., 2023): every token position is a
sample. "reduce" convention: per sequence, the inputs are averaged and the output gradients summed over its
valid positions; then `A = Σ_b â_b â_b^T / B` (B sequences) and `G = Σ_b ĝ_b ĝ_b^T / N`.

The output gradients `g` come from `torch.autograd.grad` w.r.t. the layer outputs (captured by forward hooks),
never through `.grad`. Which loss they are gradients of is the Fisher type:
- `mc` (default): labels sampled from the model (the true Fisher; `mc_samples` draws, averaged);
- `empirical`: the data labels (the empirical Fisher);
- `type2`: exact, one backward pass per column of the output Hessian's square root (small outputs only).

`apply` works in the Kronecker eigenbasis, `A = U_A diag(s_A) U_A^T`, `G = U_G diag(s_G) U_G^T`, for a
layer's `[out, in+1]` matrix V:

    (C + λI)^p V = U_G [ (U_G^T V U_A) ⊙ (s_G s_A^T + λ)^p ] U_A^T

which is exact damping and any real power p. With the EK-FAC eigenvalue correction (George et al., 2018),
`s_G s_A^T` is replaced by the second moments of the *per-position* gradients projected into that eigenbasis,
`E_n[(U_G^T g_n a_n^T U_A)^2]` (per-position, consistent with the expand convention; per-example moments would
also count cross-position terms, and cost a [B, out, in] tensor per batch).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .base import Curvature, Vector, check_finite, tensor_bytes
from .layers import TrackedLayer, find_layers
from .objective import Objective

FISHER_TYPES = ("mc", "empirical", "type2")
KFAC_APPROX = ("expand", "reduce")
#: the largest output dimension for which `type2` (one backward pass per output) is allowed
TYPE2_MAX_OUTPUTS = 512


class _Capture:
    """What a forward hook saw of one layer during one forward: inputs (detached) and outputs (in the graph)."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []


class KFAC(Curvature):
    """Kronecker-factored curvature over the `nn.Linear`/`Conv1D` layers of a model (see the module docstring).

    Args:
        model: any module mapping a batch to logits (see `objective.model_logits`).
        fisher_type: "mc" (sampled labels, default), "empirical" (data labels) or "type2" (exact, small outputs).
        mc_samples: label draws per position for "mc".
        kfac_approx: "expand" (every token position a sample, default) or "reduce".
        include, exclude: regular expressions on module names choosing the tracked layers (see `find_layers`).
        eigenvalue_correction: run `correct_eigenvalues(batches)` after `finalize()` for EK-FAC.
        storage_dtype: dtype of the stored factors and eigen-decompositions (e.g. torch.bfloat16); computations
            run in float32 (float64 for float64 models).
        objective, reduce, gather, seed: see `Curvature`.
    """

    name = "kfac"
    supported_powers = None

    def __init__(
        self,
        model: nn.Module,
        *,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        eigenvalue_correction: bool = False,
        storage_dtype: torch.dtype | None = None,
        objective: Objective | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, objective=objective, **kwargs)
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROX}, got {kfac_approx!r}")
        if int(mc_samples) < 1 or (fisher_type != "mc" and int(mc_samples) != 1):
            raise ValueError(f"mc_samples must be >= 1, and 1 unless fisher_type='mc'; got {mc_samples}")
        self.fisher_type = fisher_type
        self.mc_samples = int(mc_samples)
        self.kfac_approx = kfac_approx
        self.eigenvalue_correction = bool(eigenvalue_correction)
        self.layers: list[TrackedLayer] = find_layers(model, include, exclude)
        self.param_names = tuple(n for layer in self.layers for n in layer.param_names)
        dtype = self.layers[0].module.weight.dtype
        self.compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.storage_dtype = storage_dtype if storage_dtype is not None else self.compute_dtype
        self._reset()

    def __deepcopy__(self, memo: dict[int, Any]) -> KFAC:
        """Copy the statistics; the tracked layers are re-resolved by name in the (copied or shared) model.

        `copy.deepcopy(kfac, {id(model): model})` shares the model (and does not copy the tracked submodules).
        """
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key != "layers":
                setattr(new, key, copy.deepcopy(value, memo))
        new.layers = [dataclasses.replace(layer, module=new.model.get_submodule(layer.name)) for layer in self.layers]
        return new

    # ------------------------------------------------------------------ statistics
    def _reset(self) -> None:
        self.a_sums: dict[str, Tensor] = {}
        self.g_sums: dict[str, Tensor] = {}
        self.a_counts: dict[str, Tensor] = {}  # samples behind A (positions, or sequences for "reduce")
        self.count = torch.zeros((), dtype=torch.float64)  # valid positions N (behind G)
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}  # normalised (A, G)
        self.factor_counts: dict[str, float] = {}  # A's sample count after finalize
        self.eigen: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # (U_A, s_A, U_G, s_G)
        self.corrected: dict[str, Tensor] = {}  # EK-FAC eigenvalues [out, in+1]

    def _forward_with_hooks(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, _Capture]]:
        captures = {layer.name: _Capture() for layer in self.layers}

        def hook(name: str):
            def fn(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                captures[name].inputs.append(inputs[0].detach())
                captures[name].outputs.append(output)

            return fn

        handles = [layer.module.register_forward_hook(hook(layer.name)) for layer in self.layers]
        try:
            logits = self.logits(batch)
        finally:
            for h in handles:
                h.remove()
        missing = [name for name, c in captures.items() if not c.outputs]
        if missing:
            raise RuntimeError(
                f"kfac: tracked layer(s) {missing[:3]} saw no forward pass on this batch; exclude them "
                "(exclude=...) or make sure the model calls them"
            )
        return logits, captures

    def _backward_terms(self, pos) -> list[tuple[Tensor, float]]:
        """Scalars whose gradients w.r.t. the layer outputs are the per-position gradients `g`, with weights."""
        if self.fisher_type == "empirical":
            return [(self.objective.per_position_loss(pos.outputs, pos.targets).sum(), 1.0)]
        if self.fisher_type == "mc":
            terms = []
            for _ in range(self.mc_samples):
                y = self.objective.sample_targets(pos.outputs, self.generator).to(pos.outputs.device)
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

    def _select(self, layer: TrackedLayer, x: Tensor, mask: Tensor) -> Tensor:
        """Rows of `x` [..., d] at the valid positions -> [N, d] (expand), or [B, T, d] masked (reduce)."""
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
        return x[mask]

    def _with_ones(self, layer: TrackedLayer, a: Tensor) -> Tensor:
        if not layer.has_bias:
            return a
        return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)

    def _layer_stats(self, pos, captures: dict[str, _Capture]):
        """Yield per layer and per call: (layer, a-rows, [(g-rows, weight)]) with the convention applied."""
        mask = pos.mask
        outputs = [(layer, i) for layer in self.layers for i in range(len(captures[layer.name].outputs))]
        out_tensors = [captures[layer.name].outputs[i] for layer, i in outputs]
        terms = self._backward_terms(pos)
        grads_per_term = []
        for t, (scalar, w) in enumerate(terms):
            grads = torch.autograd.grad(scalar, out_tensors, retain_graph=t < len(terms) - 1, allow_unused=True)
            for (layer, _), g in zip(outputs, grads):
                if g is None:
                    raise RuntimeError(
                        f"kfac: tracked layer {layer.name!r} saw a forward but no backward (its output does not "
                        "reach the loss); exclude it (exclude=...) or freeze its weight"
                    )
            grads_per_term.append(([g.detach() for g in grads], w))
        reduce_seq = self.kfac_approx == "reduce" and mask.dim() >= 2
        seq_valid = mask.reshape(mask.shape[0], -1).any(-1) if reduce_seq else None
        for j, (layer, i) in enumerate(outputs):
            a = self._with_ones(layer, self._select(layer, captures[layer.name].inputs[i], mask))
            gs = [(self._select(layer, grads[j], mask), w) for grads, w in grads_per_term]
            if reduce_seq:
                # a: mean over the valid positions of each sequence; g: sum over them
                dims = tuple(range(1, a.dim() - 1))
                n_valid = mask.reshape(mask.shape[0], -1).sum(-1).clamp_min(1).to(a.dtype)
                a = (a.sum(dims) / n_valid[:, None])[seq_valid]
                if layer.has_bias:
                    a[:, -1] = 1.0
                gs = [(g.sum(dims)[seq_valid], w) for g, w in gs]
            yield layer, a, gs

    def _accumulate(self, batch: Mapping[str, Tensor]) -> None:
        logits, captures = self._forward_with_hooks(batch)
        pos = self.objective.positions(logits, batch)
        if pos.count == 0:
            return
        for layer, a, gs in self._layer_stats(pos, captures):
            a_sum = a.T @ a
            g_sum = sum(w * (g.T @ g) for g, w in gs)
            self.a_sums[layer.name] = a_sum if layer.name not in self.a_sums else self.a_sums[layer.name] + a_sum
            self.g_sums[layer.name] = g_sum if layer.name not in self.g_sums else self.g_sums[layer.name] + g_sum
            cnt = torch.tensor(float(a.shape[0]), dtype=torch.float64)
            self.a_counts[layer.name] = cnt if layer.name not in self.a_counts else self.a_counts[layer.name] + cnt
        self.count += pos.count

    # ------------------------------------------------------------------ finalize
    def _eigh(self, matrix: Tensor) -> tuple[Tensor, Tensor]:
        m = matrix.to(self.compute_dtype)
        s, u = torch.linalg.eigh((m + m.T) / 2)
        return u, s.clamp_min(0)

    def _store(self, x: Tensor) -> Tensor:
        return x.to(self.storage_dtype)

    def _decompose(self, name: str, a: Tensor, g: Tensor) -> None:
        u_a, s_a = self._eigh(a)
        u_g, s_g = self._eigh(g)
        self.eigen[name] = (self._store(u_a), self._store(s_a), self._store(u_g), self._store(s_g))
        self.factors[name] = (self._store(a), self._store(g))

    def _finalize(self) -> None:
        device = self.layers[0].module.weight.device
        sums = []
        for layer in self.layers:  # fixed order on every process: layer order, then A, G, A's count
            d_in = layer.in_features + int(layer.has_bias)
            a = self.a_sums.get(layer.name, torch.zeros(d_in, d_in, dtype=self.compute_dtype, device=device))
            g = self.g_sums.get(layer.name, torch.zeros(layer.out_features, layer.out_features,
                                                         dtype=self.compute_dtype, device=device))
            c = self.a_counts.get(layer.name, torch.zeros((), dtype=torch.float64))
            sums.append((self.reduce(a.clone()), self.reduce(g.clone()), float(self.reduce(c.clone()))))
        count = float(self.reduce(self.count.clone()))
        if count <= 0:
            raise RuntimeError("kfac: no valid position was seen; accumulate batches with labels != -100 first")
        for layer, (a, g, c) in zip(self.layers, sums):
            a, g = a / max(c, 1.0), g / count
            check_finite(f"layer {layer.name!r}", a)
            check_finite(f"layer {layer.name!r}", g)
            self._decompose(layer.name, a, g)
            self.factor_counts[layer.name] = c
        self.count = torch.tensor(count, dtype=torch.float64)
        self.a_sums, self.g_sums, self.a_counts = {}, {}, {}

    def correct_eigenvalues(self, batches: Iterable[Mapping[str, Tensor]]) -> KFAC:
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
            for layer, a, gs in self._layer_stats(pos, captures):
                u_a, _, u_g, _ = (t.to(self.compute_dtype) for t in self.eigen[layer.name])
                pa = (a @ u_a).pow(2)  # [n, in+1]
                s = sum(w * ((g @ u_g).pow(2).T @ pa) for g, w in gs)
                sums[layer.name] = s if layer.name not in sums else sums[layer.name] + s
            count += pos.count
        total = float(self.reduce(count.clone()))
        for layer in self.layers:
            d_in = layer.in_features + int(layer.has_bias)
            s = sums.get(layer.name, torch.zeros(layer.out_features, d_in, dtype=self.compute_dtype,
                                                 device=self.layers[0].module.weight.device))
            sums[layer.name] = self.reduce(s.clone())
        if total <= 0:
            raise RuntimeError("kfac: correct_eigenvalues() saw no valid position; pass batches with labels != -100")
        for layer in self.layers:
            s = sums[layer.name] / total
            check_finite(f"layer {layer.name!r}", s)
            self.corrected[layer.name] = self._store(s)
        self._scales = None
        return self

    def _after_fit(self, batches: list[Mapping[str, Tensor]]) -> None:
        if self.eigenvalue_correction:
            self.correct_eigenvalues(batches)

    # ------------------------------------------------------------------ apply
    def _eigenvalues(self, name: str) -> Tensor:
        """The layer's eigenvalues in its Kronecker eigenbasis, [out, in+1]: EK-FAC's when corrected."""
        if name in self.corrected:
            return self.corrected[name].to(self.compute_dtype)
        _, s_a, _, s_g = self.eigen[name]
        return s_g.to(self.compute_dtype)[:, None] * s_a.to(self.compute_dtype)[None, :]

    def _damping_scales(self) -> dict[str, float]:
        """Per layer: the mean of its eigenvalue products `s_G s_Aᵀ` (= mean(s_G) · mean(s_A); EK-FAC's mean when
        corrected)."""
        if self.eigenvalue_correction and not self.corrected:
            raise RuntimeError("kfac: eigenvalue_correction=True but the eigenvalues are not corrected; call "
                               "correct_eigenvalues(batches) after finalize() (fit(batches) does it)")
        out = {}
        for layer in self.layers:
            if layer.name in self.corrected:
                out[layer.name] = float(self.corrected[layer.name].float().mean())
            else:
                _, s_a, _, s_g = self.eigen[layer.name]
                out[layer.name] = float(s_g.double().mean() * s_a.double().mean())
        return out

    def _quadratic(self, vector: Vector) -> float:
        total = 0.0
        for layer in self.layers:
            v = layer.to_matrix(vector)
            u_a, _, u_g, _ = (t.to(device=v.device, dtype=self.compute_dtype) for t in self.eigen[layer.name])
            m = u_g.T @ v.to(self.compute_dtype) @ u_a
            total += float((m.pow(2) * self._eigenvalues(layer.name).to(m.device)).sum())
        return total

    def _apply(self, vector: Vector, damping, power: float) -> Vector:
        if self.eigenvalue_correction and not self.corrected:
            raise RuntimeError("kfac: eigenvalue_correction=True but the eigenvalues are not corrected; call "
                               "correct_eigenvalues(batches) after finalize() (and again after subtract())")
        out: Vector = {}
        for layer in self.layers:
            v = layer.to_matrix(vector)
            u_a, _, u_g, _ = (t.to(device=v.device, dtype=self.compute_dtype) for t in self.eigen[layer.name])
            s = self._eigenvalues(layer.name).to(v.device)
            m = u_g.T @ v.to(self.compute_dtype) @ u_a
            m = m * (s + damping(layer.name)).pow(power)
            result = (u_g @ m @ u_a.T).to(v.dtype)
            out.update(layer.from_matrix(result))
        return out

    # ------------------------------------------------------------------ full_minus_forget
    def _subtract(self, other: Curvature) -> None:
        assert isinstance(other, KFAC)
        n, n_o = float(self.count), float(other.count)
        if n_o >= n:
            raise ValueError(f"cannot remove {n_o:.0f} positions from a curvature of {n:.0f}; is the full curvature"
                             " really accumulated over a superset of the forget data?")
        if self.corrected:
            warnings.warn("kfac: subtract() drops the EK-FAC eigenvalue correction; call correct_eigenvalues() "
                          "again on retain batches if you need it", stacklevel=3)
        for layer in self.layers:
            na, na_o = self.factor_counts[layer.name], other.factor_counts[layer.name]
            if na_o >= na:
                raise ValueError(f"kfac: layer {layer.name!r}: cannot remove {na_o:.0f} samples from {na:.0f}")
            a, g = (t.to(self.compute_dtype) for t in self.factors[layer.name])
            a_o, g_o = (t.to(device=a.device, dtype=self.compute_dtype) for t in other.factors[layer.name])
            a = (na * a - na_o * a_o) / (na - na_o)
            g = (n * g - n_o * g_o) / (n - n_o)
            # keep PSD: project each factor onto the PSD cone (negative eigenvalues -> 0)
            u_a, s_a = self._eigh(a)
            u_g, s_g = self._eigh(g)
            a, g = (u_a * s_a) @ u_a.T, (u_g * s_g) @ u_g.T
            self.eigen[layer.name] = tuple(self._store(t) for t in (u_a, s_a, u_g, s_g))
            self.factors[layer.name] = (self._store(a), self._store(g))
            self.factor_counts[layer.name] = na - na_o
        self.corrected = {}
        self.count = torch.tensor(n - n_o, dtype=torch.float64)

    # ------------------------------------------------------------------ persistence, memory
    def factor(self, layer_name: str) -> tuple[Tensor, Tensor]:
        """The normalised Kronecker factors `(A, G)` of a tracked layer (after finalize)."""
        if not self.finalized:
            raise RuntimeError("kfac: factor() before finalize(); accumulate batches, then call finalize()")
        return self.factors[layer_name]

    def _state(self) -> dict[str, Any]:
        return {
            "fisher_type": self.fisher_type,
            "kfac_approx": self.kfac_approx,
            "count": self.count.clone(),
            "layers": {
                layer.name: {
                    "A": self.factors[layer.name][0],
                    "G": self.factors[layer.name][1],
                    "a_count": self.factor_counts[layer.name],
                    "eigen": self.eigen[layer.name],
                    "corrected": self.corrected.get(layer.name),
                }
                for layer in self.layers
            },
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        names = [layer.name for layer in self.layers]
        if list(state["layers"]) != names:
            raise ValueError("kfac: saved curvature covers other layers than this model's tracked ones")
        self._reset()
        self.fisher_type = state["fisher_type"]
        self.kfac_approx = state["kfac_approx"]
        self.count = torch.as_tensor(state["count"], dtype=torch.float64)
        device = self.layers[0].module.weight.device
        for name in names:
            entry = state["layers"][name]
            self.factors[name] = (self._store(entry["A"].to(device)), self._store(entry["G"].to(device)))
            self.factor_counts[name] = float(entry["a_count"])
            self.eigen[name] = tuple(self._store(t.to(device)) for t in entry["eigen"])
            if entry.get("corrected") is not None:
                self.corrected[name] = self._store(entry["corrected"].to(device))

    def memory_footprint(self) -> dict[str, int]:
        factors = tensor_bytes(*(t for pair in self.factors.values() for t in pair))
        factors += tensor_bytes(*self.a_sums.values(), *self.g_sums.values())
        eigvecs = tensor_bytes(*(e[i] for e in self.eigen.values() for i in (0, 2)))
        eigvals = tensor_bytes(*(e[i] for e in self.eigen.values() for i in (1, 3)), *self.corrected.values())
        return {"factors": factors, "eigenvectors": eigvecs, "eigenvalues": eigvals,
                "total": factors + eigvecs + eigvals}
