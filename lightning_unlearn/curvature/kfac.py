"""K-FAC: a Kronecker-factored Fisher/GGN per linear layer, `C_l ≈ A_l ⊗ G_l`, inverted in the eigenbasis.

For a tracked layer with input `a` (a ones column appended when it has a bias) and output `o`:

    A = (1/N) Σ_n [a_n, 1][a_n, 1]^T            G = (1/N) Σ_n g_n g_n^T,   g_n = d l_n / d o_n

summed over the valid positions n (shifted label != -100) of every accumulated batch, with `l_n` the loss of
one position, so that `A ⊗ G` approximates the Fisher/GGN of the *mean* loss (the scale of
curvlinops' `KFACLinearOperator`). "expand" convention (Eschenhagen et al., 2023): every token position is a
sample. "reduce" convention: per sequence, the inputs are averaged and the output gradients summed over its
valid positions; then `A = Σ_b â_b â_b^T / B` (B sequences) and `G = Σ_b ĝ_b ĝ_b^T / N`.

The output gradients `g` come from `torch.autograd.grad` w.r.t. the layer outputs (captured by forward hooks),
never through `.grad` (the statistics are gathered by `kfac_statistics.KFACStatistics`, this module's operator
decomposes, subtracts and saves them, `kfac_products.KFACProducts` applies them; G's eigenbasis helpers are in
`kronecker`).
Which loss they are gradients of is the Fisher type:
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

What is kept after `finalize` (memory, measured on GPT-2-small shapes by `python -m benchmarks.kfac_memory`):
- `keep_factors=True` (default) keeps A and G next to their eigendecompositions; `keep_factors=False` keeps only
  the eigenbases and eigenvalues. `subtract` (full_minus_forget) and `factor()` then rebuild a factor as
  `U diag(s) Uᵀ` (one matmul; the factor's PSD projection, equal to it up to float error since A and G are PSD).
- `storage_dtype=torch.bfloat16` stores everything in bf16 (computations stay in float32).
- `wide_layer="diagonal"` / `"block"`: for layers with `out > wide_ratio × (in+1)` (attention QKV, MLP
  up-projection, an included LM head) G — out × out, the dominant piece — is kept as its diagonal, or as diagonal
  blocks of `wide_block` outputs (default: the layer's input width, so the blocks hold as many numbers as the
  weight). Then `C ≈ A ⊗ blockdiag(G_1..G_m)`, whose eigenbasis is `U_A ⊗ blockdiag(U_1..U_m)`: `apply` stays
  exact damping and any power, for that structured G.
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

from ..errors import UserInputError
from .base import Curvature, check_finite, tensor_bytes
from .kfac_products import KFACProducts
from .kfac_statistics import KFACStatistics
from .kronecker import g_structure, largest_divisor, partition_layers
from .layers import TrackedLayer, find_layers, layer_parameter_names, shared_parameters, warn_uncovered
from .objective import Objective

FISHER_TYPES = ("mc", "empirical", "type2")
KFAC_APPROX = ("expand", "reduce")
#: how G of a wide layer is kept: None (dense, every layer), "diagonal", or "block" (block-diagonal)
WIDE_LAYER = (None, "diagonal", "block")
STORAGE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
                  "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class KFAC(KFACStatistics, KFACProducts, Curvature):
    """Kronecker-factored curvature over the `nn.Linear`/`Conv1D` layers of a model (see the module docstring).

    Args:
        model: any module mapping a batch to logits (see `objective.model_logits`).
        fisher_type: "mc" (sampled labels, default), "empirical" (data labels) or "type2" (exact, small outputs).
        mc_samples: label draws per position for "mc".
        kfac_approx: "expand" (every token position a sample, default) or "reduce".
        include, exclude: regular expressions on module names choosing the tracked layers (see `find_layers`).
        eigenvalue_correction: run `correct_eigenvalues(batches)` after `finalize()` for EK-FAC.
        storage_dtype: dtype of the stored factors and eigen-decompositions (e.g. torch.bfloat16 or "bf16");
            computations run in float32 (float64 for float64 models).
        keep_factors: keep A and G after finalize (True, default) or only their eigendecompositions (False: less
            memory; `subtract` and `factor()` rebuild them as `U diag(s) Uᵀ`).
        wide_layer: None (dense G everywhere, default), "diagonal" or "block": how G is kept for layers with
            `out > wide_ratio × (in + 1)` (see the module docstring).
        wide_ratio: the output/input ratio above which a layer counts as wide.
        wide_block: outputs per diagonal block of G for `wide_layer="block"` (default: the layer's input width);
            the largest divisor of `out` not above it is used.
        shard_factors: keep each layer's factors and eigendecomposition on one process only (its owner; layers are
            partitioned by the size of their factors, largest first, to the least loaded process), so that each of
            N processes stores about 1/N of the state (FSDP2 runs). The owner computes its layers' part of `apply`
            and `quadratic`, which `reduce` then sums, so every process gets the full result. Needs
            `torch.distributed` to be initialised for more than one process (otherwise: every layer is owned).
        objective, reduce, gather, seed: see `Curvature` (`seed` fixes the sampled labels of "mc").
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
        storage_dtype: torch.dtype | str | None = None,
        keep_factors: bool = True,
        wide_layer: str | None = None,
        wide_ratio: float = 2.0,
        wide_block: int | None = None,
        shard_factors: bool = False,
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
        if wide_layer not in WIDE_LAYER:
            raise ValueError(f"wide_layer must be one of {WIDE_LAYER}, got {wide_layer!r}")
        if not (isinstance(wide_ratio, (int, float)) and math.isfinite(wide_ratio) and wide_ratio >= 0):
            raise ValueError(f"wide_ratio must be a finite number >= 0, got {wide_ratio!r}")
        if wide_block is not None and (isinstance(wide_block, bool) or int(wide_block) < 1):
            raise ValueError(f"wide_block must be a positive integer or None, got {wide_block!r}")
        if isinstance(storage_dtype, str):
            if storage_dtype not in STORAGE_DTYPES:
                raise ValueError(f"storage_dtype must be a torch dtype or one of {sorted(STORAGE_DTYPES)}, "
                                 f"got {storage_dtype!r}")
            storage_dtype = STORAGE_DTYPES[storage_dtype]
        self.fisher_type = fisher_type
        self.mc_samples = int(mc_samples)
        self.kfac_approx = kfac_approx
        self.eigenvalue_correction = bool(eigenvalue_correction)
        self.keep_factors = bool(keep_factors)
        self.wide_layer, self.wide_ratio, self.wide_block = wide_layer, float(wide_ratio), wide_block
        self.shard_factors = bool(shard_factors)
        if self.shard_factors and self.eigenvalue_correction:
            raise ValueError("kfac: shard_factors=True does not support eigenvalue_correction (EK-FAC projects every "
                             "process's data on every layer's eigenbasis, which only its owner holds); use one of them")
        # fused mixture-of-experts projections get one block per expert; their rows are routed tokens, which the
        # "reduce" convention's per-sequence averages are not defined for: there they stay uncovered (warned)
        self.layers: list[TrackedLayer] = find_layers(self.model, include, exclude, experts=kfac_approx == "expand")
        shared = shared_parameters(self.layers)
        if shared:  # A ⊗ G is per module: a weight used by two modules would get the second one's factors only
            name, users = next(iter(shared.items()))
            raise UserInputError(
                f"kfac: parameter {name!r} is shared by the tracked layers {users} (the same nn.Parameter in several "
                "modules); K-FAC keeps one Kronecker factor pair per module and cannot combine them; use "
                "curvature='diagonal' or 'cg' (or 'woodfisher'), which take the parameter's whole gradient"
            )
        warn_uncovered(self.model, self.layers, self.name, include, exclude)
        self.param_names = layer_parameter_names(self.layers)
        dtype = self.layers[0].weight.dtype
        self.compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.storage_dtype = storage_dtype if storage_dtype is not None else self.compute_dtype
        self._checked_experts: set[str] = set()
        self._reset()

    def _configured_block(self, layer: TrackedLayer) -> int:
        """The block size of G that the constructor's `wide_*` options give `layer`."""
        d_in, d_out = layer.in_features + int(layer.has_bias), layer.out_features
        if self.wide_layer is None or d_out <= self.wide_ratio * d_in:
            return d_out
        if self.wide_layer == "diagonal":
            return 1
        return largest_divisor(d_out, int(self.wide_block) if self.wide_block is not None else layer.in_features)

    def __deepcopy__(self, memo: dict[int, Any]) -> KFAC:
        """Copy the statistics; the tracked layers are re-resolved by name in the (copied or shared) model.

        `copy.deepcopy(kfac, {id(model): model})` shares the model (and does not copy the tracked submodules).
        """
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key != "layers":
                setattr(new, key, copy.deepcopy(value, memo))
        new.layers = [dataclasses.replace(layer, module=new.model.get_submodule(layer.module_name))
                      for layer in self.layers]
        return new

    # ------------------------------------------------------------------ statistics
    def _reset(self) -> None:
        #: outputs per diagonal block of each layer's G: `out` (dense), 1 (diagonal) or in between (block)
        self.g_block: dict[str, int] = {layer.name: self._configured_block(layer) for layer in self.layers}
        self.a_sums: dict[str, Tensor] = {}
        self.g_sums: dict[str, Tensor] = {}
        self.a_counts: dict[str, Tensor] = {}  # samples behind A (positions, or sequences for "reduce")
        self.count = torch.zeros((), dtype=torch.float64)  # valid positions N (behind G)
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}  # normalised (A, G) (G as kept: see `g_block`)
        self.factor_counts: dict[str, float] = {}  # A's sample count after finalize
        # (U_A, s_A, U_G, s_G); U_G is [out, out], [m, k, k] (block-diagonal) or None (diagonal G)
        self.eigen: dict[str, tuple[Tensor, Tensor, Tensor | None, Tensor]] = {}
        self.corrected: dict[str, Tensor] = {}  # EK-FAC eigenvalues [out, in+1]
        #: the layers whose factors this process keeps (all of them unless `shard_factors`; set at finalize/load)
        self.owned: tuple[str, ...] = tuple(layer.name for layer in self.layers)
        self.shard: tuple[int, int] = (0, 1)  # (rank, world size) of the partition

    # ------------------------------------------------------------------ finalize
    def _eigh(self, matrix: Tensor) -> tuple[Tensor, Tensor]:
        m = matrix.to(self.compute_dtype)
        s, u = torch.linalg.eigh((m + m.T) / 2)
        return u, s.clamp_min(0)

    def _eigh_g(self, g: Tensor) -> tuple[Tensor | None, Tensor]:
        """(U_G, s_G) of G as kept: dense [out, out], blocks [m, k, k] (batched), or the diagonal (U_G None)."""
        if g.dim() == 1:
            return None, g.to(self.compute_dtype).clamp_min(0)
        if g.dim() == 2:
            return self._eigh(g)
        m = g.to(self.compute_dtype)
        s, u = torch.linalg.eigh((m + m.transpose(1, 2)) / 2)
        return u, s.clamp_min(0).reshape(-1)

    def _store(self, x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(self.storage_dtype)

    def _decompose(self, name: str, a: Tensor, g: Tensor, *, psd_factors: bool = False) -> None:
        """Eigendecompose A and G; keep the factors too when `keep_factors` (their PSD projections when
        `psd_factors`)."""
        u_a, s_a = self._eigh(a)
        u_g, s_g = self._eigh_g(g)
        self.eigen[name] = (self._store(u_a), self._store(s_a), self._store(u_g), self._store(s_g))
        if not self.keep_factors:
            self.factors.pop(name, None)
        elif psd_factors:
            self.factors[name] = (self._store((u_a * s_a) @ u_a.T), self._store(self._rebuild_g(u_g, s_g)))
        else:
            self.factors[name] = (self._store(a), self._store(g))

    def _rebuild_g(self, u: Tensor | None, s: Tensor) -> Tensor:
        """G (in its kept form) from its eigendecomposition."""
        if u is None:
            return s
        if u.dim() == 2:
            return (u * s) @ u.T
        return (u * s.reshape(u.shape[0], 1, -1)) @ u.transpose(1, 2)

    def _kept_factors(self, name: str) -> tuple[Tensor, Tensor]:
        """(A, G in its kept form) in the compute dtype: stored, or rebuilt from the eigendecomposition."""
        if name in self.factors:
            return tuple(t.to(self.compute_dtype) for t in self.factors[name])  # type: ignore[return-value]
        u_a, s_a, u_g, s_g = (None if t is None else t.to(self.compute_dtype) for t in self.eigen[name])
        return (u_a * s_a) @ u_a.T, self._rebuild_g(u_g, s_g)

    def _finalize(self) -> None:
        device = self.layers[0].weight.device
        sums = []
        for layer in self.layers:  # fixed order on every process: layer order, then A, G, A's count
            d_in = layer.in_features + int(layer.has_bias)
            a = self.a_sums.get(layer.name, torch.zeros(d_in, d_in, dtype=self.compute_dtype, device=device))
            g = self.g_sums.get(layer.name, self._g_zeros(layer, device))
            c = self.a_counts.get(layer.name, torch.zeros((), dtype=torch.float64))
            sums.append((self.reduce(a.clone()), self.reduce(g.clone()), float(self.reduce(c.clone()))))
        count = float(self.reduce(self.count.clone()))
        if count <= 0:
            raise RuntimeError("kfac: no valid position was seen; accumulate batches with labels != -100 first")
        self._partition()
        for layer, (a, g, c) in zip(self.layers, sums):
            if layer.name not in self.owned:
                continue  # another process owns this layer's factors
            a, g = a / max(c, 1.0), g / count
            check_finite(f"layer {layer.name!r}", a)
            check_finite(f"layer {layer.name!r}", g)
            self._decompose(layer.name, a, g)
            self.factor_counts[layer.name] = c
        self.count = torch.tensor(count, dtype=torch.float64)
        self.a_sums, self.g_sums, self.a_counts = {}, {}, {}

    def _partition(self) -> None:
        """Set `owned` and `shard`: every layer (one process, or `shard_factors=False`), else this process's share of
        a partition of the layers by factor size (largest first, each to the least loaded process; ties to the
        lowest rank), the same on every process."""
        rank, world = 0, 1
        if self.shard_factors and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.shard = (rank, world)
        if world == 1:
            self.owned = tuple(layer.name for layer in self.layers)
            return
        self.owned = tuple(name for name, owner in partition_layers(self.layers, world).items() if owner == rank)

    @property
    def sharded(self) -> bool:
        """Whether the factors are split across processes (each keeps its `owned` layers)."""
        return self.shard[1] > 1

    def _owned_layers(self) -> list[TrackedLayer]:
        owned = set(self.owned)
        return [layer for layer in self.layers if layer.name in owned]

    def _after_fit(self, batches: list[Mapping[str, Tensor]]) -> None:
        if self.eigenvalue_correction:
            self.correct_eigenvalues(batches)

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
        if other.owned != self.owned:
            raise ValueError("kfac: cannot subtract curvatures whose factors are split differently across processes; "
                             "fit both with the same shard_factors setting and number of processes")
        mismatched = [layer.name for layer in self._owned_layers()
                      if g_structure(self.eigen[layer.name][2]) != g_structure(other.eigen[layer.name][2])
                      or self.eigen[layer.name][3].shape != other.eigen[layer.name][3].shape
                      or (self.eigen[layer.name][2] is not None
                          and self.eigen[layer.name][2].shape != other.eigen[layer.name][2].shape)]
        if mismatched:
            raise ValueError(f"kfac: cannot subtract: layer(s) {mismatched[:3]} keep G in another form in the two "
                             "curvatures; build both with the same wide_layer/wide_ratio/wide_block")
        for layer in self._owned_layers():
            na, na_o = self.factor_counts[layer.name], other.factor_counts[layer.name]
            if na_o >= na:
                raise ValueError(f"kfac: layer {layer.name!r}: cannot remove {na_o:.0f} samples from {na:.0f}")
            # stored factors, or rebuilt from the eigendecomposition (keep_factors=False): U diag(s) Uᵀ
            a, g = self._kept_factors(layer.name)
            a_o, g_o = (t.to(a.device) for t in other._kept_factors(layer.name))
            a = (na * a - na_o * a_o) / (na - na_o)
            g = (n * g - n_o * g_o) / (n - n_o)
            # keep PSD: project each factor onto the PSD cone (negative eigenvalues -> 0)
            self._decompose(layer.name, a, g, psd_factors=True)
            self.factor_counts[layer.name] = na - na_o
        self.corrected = {}
        self.count = torch.tensor(n - n_o, dtype=torch.float64)

    # ------------------------------------------------------------------ persistence, memory
    def factor(self, layer_name: str) -> tuple[Tensor, Tensor]:
        """The normalised Kronecker factors `(A, G)` of a tracked layer (after finalize), as dense matrices.

        The stored tensors when `keep_factors` and G is dense; otherwise built on demand (from the eigendecomposition
        when the factors were not kept; a diagonal or block-diagonal G expanded to its dense matrix)."""
        if not self.finalized:
            raise RuntimeError("kfac: factor() before finalize(); accumulate batches, then call finalize()")
        if layer_name not in self.owned and any(layer.name == layer_name for layer in self.layers):
            raise ValueError(f"kfac: layer {layer_name!r} is owned by another process (shard_factors=True); ask its "
                             "owner, or fit with shard_factors=False for every factor on every process")
        if layer_name in self.factors and self.factors[layer_name][1].dim() == 2:
            return self.factors[layer_name]
        a, g = self._kept_factors(layer_name)
        if g.dim() == 1:
            g = torch.diag(g)
        elif g.dim() == 3:
            g = torch.block_diag(*g.contiguous().unbind(0))
        dtype = self.storage_dtype
        return a.to(dtype), g.to(dtype)

    def _state(self) -> dict[str, Any]:
        layers: dict[str, dict[str, Any]] = {}
        for layer in self._owned_layers():
            entry: dict[str, Any] = {}
            if layer.name in self.factors:  # absent with keep_factors=False: load_state_dict rebuilds them if asked
                entry["A"], entry["G"] = self.factors[layer.name]
            entry.update({"a_count": self.factor_counts[layer.name], "eigen": self.eigen[layer.name],
                          "corrected": self.corrected.get(layer.name)})
            layers[layer.name] = entry
        state = {"fisher_type": self.fisher_type, "kfac_approx": self.kfac_approx, "count": self.count.clone(),
                 "layers": layers}
        if self.sharded:  # one process's share: readable by the same process of the same number of processes
            state["shard"] = {"rank": self.shard[0], "world_size": self.shard[1]}
        return state

    def _load_state(self, state: Mapping[str, Any]) -> None:
        shard = state.get("shard")
        self._reset()
        if shard is not None:
            rank, world = int(shard["rank"]), int(shard["world_size"])
            here = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                    if torch.distributed.is_available() and torch.distributed.is_initialized() else (0, 1))
            if (rank, world) != here:
                raise ValueError(f"kfac: this curvature state is process {rank}'s share of {world} processes "
                                 f"(shard_factors=True), but this is process {here[0]} of {here[1]}; load it with "
                                 f"the same number of processes, each its own file")
            self.shard = (rank, world)
            self.owned = tuple(name for name, owner in partition_layers(self.layers, world).items() if owner == rank)
        elif self.shard_factors:
            self._partition()  # a full state (any number of processes wrote it), split across these processes
        names = list(self.owned)
        saved = list(state["layers"])
        if (saved != names) if shard is not None else (saved != [layer.name for layer in self.layers]):
            raise ValueError("kfac: saved curvature covers other layers than this model's tracked ones")
        self.fisher_type = state["fisher_type"]
        self.kfac_approx = state["kfac_approx"]
        self.count = torch.as_tensor(state["count"], dtype=torch.float64)
        device = self.layers[0].weight.device
        for layer in self._owned_layers():
            name = layer.name
            entry = state["layers"][name]
            self.factor_counts[name] = float(entry["a_count"])
            self.eigen[name] = tuple(None if t is None else self._store(t.to(device)) for t in entry["eigen"])
            # how G is kept comes from the state (a checkpoint describes itself), not from this instance's options
            u_g = self.eigen[name][2]
            self.g_block[name] = {"dense": layer.out_features, "diagonal": 1}.get(
                g_structure(u_g), u_g.shape[-1] if u_g is not None else 1)
            if self.keep_factors:
                if entry.get("A") is not None and entry.get("G") is not None:
                    self.factors[name] = (self._store(entry["A"].to(device)), self._store(entry["G"].to(device)))
                else:  # saved with keep_factors=False: rebuild A and G from the eigendecomposition
                    self.factors[name] = tuple(self._store(t) for t in self._kept_factors(name))
            if entry.get("corrected") is not None:
                self.corrected[name] = self._store(entry["corrected"].to(device))

    def memory_footprint(self) -> dict[str, int]:
        factors = tensor_bytes(*(t for pair in self.factors.values() for t in pair))
        factors += tensor_bytes(*self.a_sums.values(), *self.g_sums.values())
        eigvecs = tensor_bytes(*(e[i] for e in self.eigen.values() for i in (0, 2)))  # None (diagonal G): 0
        eigvals = tensor_bytes(*(e[i] for e in self.eigen.values() for i in (1, 3)), *self.corrected.values())
        return {"factors": factors, "eigenvectors": eigvecs, "eigenvalues": eigvals,
                "total": factors + eigvecs + eigvals}
