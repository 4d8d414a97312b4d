"""WoodFisher: the empirical Fisher of per-example gradients, applied through the Woodbury identity.

    wf = WoodFisher(model)                   # fisher_type="empirical" (data labels, the paper's method)
    for batch in curvature_batches:
        wf.accumulate(batch)                 # one gradient row per batch row
    wf.finalize()                            # rows concatenated across processes via `gather`
    x = wf.inverse(grad, damping=1e-3)       # (F + λI)^-1 v, dual form
    z = wf.apply(noise, damping=1e-3, power=-0.25)

An *example* is one batch row; its gradient `g_i` is that of the *sum* of its token losses. With `N` the
number of valid token positions (labels != -100) and `m` the number of examples,

    F = (1/N) Σ_i g_i g_iᵀ = (1/N) G Gᵀ,    G = [g_1 … g_m]  (d × m).

Scale: dividing by the token count `N` (not by `m`) makes `F` comparable to the per-token Fisher of the mean
token loss that K-FAC, CG and the diagonal backend use (its diagonal equals the `diagonal` backend's
empirical Fisher); it is `(1/m) G̃ G̃ᵀ` with rows rescaled by `sqrt(m/N)`, so the design's formulas hold with
`m λ` read as `N λ`. For one position per example (classifiers, `shift=False`) `N = m`.

`apply` never forms a d × d matrix:
- `p = -1`: `F⁻¹ v = (1/λ)[v − G (Nλ I + GᵀG)⁻¹ Gᵀ v]` (an m × m solve per call);
- any real `p`: through the thin SVD `G = U S Vᵀ` (from the eigendecomposition of the m × m Gram matrix
  `GᵀG = V S² Vᵀ`, `U = G V S⁻¹`): `F^p v = λ^p v + U((s²/N + λ)^p − λ^p) Uᵀ v`.

`blocks`: `"full"` (one Gram matrix coupling all covered parameters), `"layer"` (block-diagonal: one Gram
matrix per tracked layer, or per parameter when `params=` is given; each block has rank up to m, and the
cross-layer couplings are dropped), `"auto"` (the default: `"full"` while `d · m <= max_full_elements`,
else `"layer"`). The rows themselves take `m · d` numbers either way; they are kept per parameter.

`subtract` (full_minus_forget) is a Woodbury downdate: the other's rows are appended with sign −1, so that
`F = (G D Gᵀ) / (N − N_o)` with `D = diag(±1)` is exactly `(N F_full − N_o F_o)/(N − N_o)`. It is applied
through the eigendecomposition of the signed Gram form (`S Vᵀ D V S = W Λ Wᵀ`, basis `U = G V S⁻¹ W`),
with `Λ` clamped at 0 (PSD). When the forget rows are among the full rows this is exactly the Fisher of the
remaining rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .base import Curvature, Vector, check_finite, checked_grad, tensor_bytes
from .layers import covered_parameters, find_layers, layer_parameter_names, unwrap_model, warn_uncovered
from .objective import Objective

FISHER_TYPES = ("empirical", "mc")
BLOCKS = ("auto", "full", "layer")


class WoodFisher(Curvature):
    """Empirical (or Monte-Carlo) Fisher of per-example gradients, `(F + λI)^p` by Woodbury / thin SVD."""

    name = "woodfisher"

    def __init__(
        self,
        model: nn.Module,
        *,
        fisher_type: str = "empirical",
        blocks: str = "auto",
        max_full_elements: int = 2**27,
        params: Iterable[str] | None = None,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        objective: Objective | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(unwrap_model(model), objective=objective, **kwargs)
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
        if blocks not in BLOCKS:
            raise ValueError(f"blocks must be one of {BLOCKS}, got {blocks!r}")
        self.fisher_type = fisher_type
        self.blocks = blocks
        self.max_full_elements = int(max_full_elements)
        if params is None:
            layers = find_layers(self.model, include, exclude)
            warn_uncovered(self.model, layers, self.name, include, exclude)
            self.param_names = layer_parameter_names(layers)
            # one block per layer; a weight shared by two layers belongs to the first one's block only
            self._layer_groups, seen = [], set()
            for layer in layers:
                group = tuple(n for n in layer.param_names if n not in seen)
                seen.update(group)
                if group:
                    self._layer_groups.append(group)
        else:
            self.param_names = covered_parameters(self.model, params, include, exclude)
            self._layer_groups = [(n,) for n in self.param_names]
        self._reset()

    # ------------------------------------------------------------------ statistics
    def _reset(self) -> None:
        self._rows: dict[str, list[Tensor]] = {n: [] for n in self.param_names}
        self.rows: dict[str, Tensor] = {}  # name -> [k, numel] gradient rows (after finalize)
        self.signs = torch.zeros(0, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)  # N: valid positions
        self.examples = 0  # m: examples (rows with sign +1 minus rows with sign -1)
        self._local_count = 0
        self.groups: list[tuple[str, ...]] = []
        self._decomp: list[dict[str, Tensor]] = []

    def _store_dtype(self, p: Tensor) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _accumulate(self, batch: Mapping[str, Tensor]) -> None:
        params = dict(self.model.named_parameters())
        plist = [params[n] for n in self.param_names]
        with torch.enable_grad():
            pos = self.objective.positions(self.logits(batch), batch)
            if pos.count == 0:
                return
            if self.fisher_type == "empirical":
                targets = pos.targets
            else:
                targets = self.sample_targets(pos, batch)
            losses = self.objective.per_position_loss(pos.outputs, targets)
            example = pos.example_index
            per_example = torch.zeros(int(example.max()) + 1, dtype=losses.dtype, device=losses.device)
            per_example = per_example.index_add(0, example, losses)
            rows = example.unique().tolist()
            for i, b in enumerate(rows):
                grads = checked_grad(self.name, per_example[b], plist, retain_graph=i < len(rows) - 1,
                                     allow_unused=True)
                for n, p, g in zip(self.param_names, plist, grads):
                    # None: the loss does not depend on p (a layer never called, or whose output is detached), so its
                    # gradient is exactly 0; a layer run without gradients (reentrant checkpointing) was refused by
                    # `logits`, so a None here is never a gradient autograd could not reach
                    g = torch.zeros_like(p) if g is None else g.detach()
                    self._rows[n].append(g.reshape(1, -1).to(self._store_dtype(p)))
        self._local_count += pos.count

    def _finalize(self) -> None:
        params = dict(self.model.named_parameters())
        device = params[self.param_names[0]].device
        count = float(self.reduce(torch.tensor(float(self._local_count), dtype=torch.float64, device=device)))
        rows = {}
        for n in self.param_names:
            p = params[n]
            local = (torch.cat(self._rows[n]) if self._rows[n]
                     else torch.zeros(0, p.numel(), dtype=self._store_dtype(p), device=p.device))
            rows[n] = self.gather(local)
            check_finite(f"parameter {n!r} (per-example gradients)", rows[n])
        m = int(rows[self.param_names[0]].shape[0])
        if count <= 0 or m == 0:
            raise RuntimeError("woodfisher: no valid position was seen; accumulate batches with labels != -100 first")
        self._rows = {n: [] for n in self.param_names}
        self.rows = rows
        self.signs = torch.ones(m, dtype=torch.float64)
        self.count = torch.tensor(count, dtype=torch.float64)
        self.examples = m
        self._decompose()

    # ------------------------------------------------------------------ decompositions
    def resolved_blocks(self) -> str:
        """The block layout in use: `full` or `layer` (what `auto` chose from d · m)."""
        if self.blocks != "auto":
            return self.blocks
        params = dict(self.model.named_parameters())
        d = sum(params[n].numel() for n in self.param_names)
        k = int(self.signs.numel())
        return "full" if d * k <= self.max_full_elements else "layer"

    def _decompose(self) -> None:
        self.groups = [tuple(self.param_names)] if self.resolved_blocks() == "full" else list(self._layer_groups)
        self._decomp = []
        signs = self.signs
        for group in self.groups:
            gram = sum(self.rows[n].double() @ self.rows[n].double().T for n in group)  # [k, k] = GᵀG
            s2, v = torch.linalg.eigh(gram.cpu())
            tol = s2.abs().max().clamp_min(1e-300) * s2.shape[0] * torch.finfo(self.rows[group[0]].dtype).eps
            keep = s2 > tol
            s2, v = s2[keep], v[:, keep]
            s = s2.sqrt()
            coef = v / s  # U = G V S⁻¹ = rowsᵀ coef
            entry: dict[str, Tensor] = {"gram": gram.cpu()}
            if bool((signs < 0).any()):
                form = (s[:, None] * v.T) @ (signs[:, None] * v) * s[None, :]  # S Vᵀ D V S
                lam, w = torch.linalg.eigh((form + form.T) / 2)
                coef, eig = coef @ w, lam.clamp_min(0.0)
            else:
                eig = s2
            entry["coef"] = coef
            entry["eig"] = eig / float(self.count)  # eigenvalues of F on span(U)
            self._decomp.append(entry)

    # ------------------------------------------------------------------ apply
    def _gt(self, group: tuple[str, ...], vector: Vector) -> Tensor:
        """Gᵀ v for one block: [k] in float64."""
        out = None
        for n in group:
            r = self.rows[n]
            part = (r @ vector[n].reshape(-1).to(device=r.device, dtype=r.dtype)).double().cpu()
            out = part if out is None else out + part
        return out

    def _g(self, group: tuple[str, ...], coeffs: Tensor) -> Vector:
        """G c for one block, per parameter (flat, row dtype)."""
        return {n: self.rows[n].T @ coeffs.to(device=self.rows[n].device, dtype=self.rows[n].dtype) for n in group}

    @staticmethod
    def _block_key(group: tuple[str, ...]) -> str:
        return group[0]

    def _damping_scales(self) -> dict[str, float]:
        """Per block: the mean of its non-zero eigenvalues (the Fisher's rank is at most the number of examples,
        so the mean over all d eigenvalues would be ~0)."""
        out = {}
        for group, entry in zip(self.groups, self._decomp):
            eig = entry["eig"]
            eig = eig[eig > 0]
            out[self._block_key(group)] = float(eig.mean()) if eig.numel() else 0.0
        return out

    def _block_parameters(self) -> dict[str, tuple[str, ...]]:
        """Per block of parameters (the blocks of `_damping_scales`)."""
        return {self._block_key(group): tuple(group) for group in self.groups}

    def _quadratic(self, vector: Vector) -> float:
        total = 0.0
        for group, entry in zip(self.groups, self._decomp):
            utv = entry["coef"].T @ self._gt(group, vector)
            total += float((entry["eig"] * utv.pow(2)).sum())
        return total

    def _apply(self, vector: Vector, damping_of, power: float) -> Vector:
        params = dict(self.model.named_parameters())
        out: Vector = {}
        signed = bool((self.signs < 0).any())
        for group, entry in zip(self.groups, self._decomp):
            damping = damping_of(self._block_key(group))
            gtv = self._gt(group, vector)
            if power == -1.0 and not signed:
                # dual form: (1/λ)[v − G (Nλ I + GᵀG)⁻¹ Gᵀ v]
                k = entry["gram"].shape[0]
                system = entry["gram"] + float(self.count) * damping * torch.eye(k, dtype=torch.float64)
                correction = self._g(group, torch.linalg.solve(system, gtv))
                for n in group:
                    v = vector[n]
                    res = (v.reshape(-1).to(correction[n].dtype) - correction[n]) / damping
                    out[n] = res.reshape(params[n].shape).to(dtype=v.dtype, device=v.device)
            else:
                # thin SVD: λ^p v + U((e + λ)^p − λ^p) Uᵀ v
                coef, eig = entry["coef"], entry["eig"]
                utv = coef.T @ gtv
                scale = (eig + damping) ** power - damping**power
                correction = self._g(group, coef @ (scale * utv))
                for n in group:
                    v = vector[n]
                    res = damping**power * v.reshape(-1).to(correction[n].dtype) + correction[n]
                    out[n] = res.reshape(params[n].shape).to(dtype=v.dtype, device=v.device)
        return out

    def dense(self) -> Tensor:
        """The d × d Fisher over `param_names` (flattened in that order), for tests on tiny models only."""
        index, offset = {}, 0
        for n in self.param_names:
            index[n] = (offset, offset + self.rows[n].shape[1])
            offset += self.rows[n].shape[1]
        out = torch.zeros(offset, offset, dtype=torch.float64)
        for group, entry in zip(self.groups, self._decomp):
            g = torch.cat([self.rows[n].double().cpu() for n in group], dim=1)  # [k, d_b]
            u = g.T @ entry["coef"]
            block = u @ torch.diag(entry["eig"]) @ u.T
            sl = torch.cat([torch.arange(*index[n]) for n in group])
            out[sl[:, None], sl[None, :]] = block
        return out

    # ------------------------------------------------------------------ subtract, state, memory
    def _subtract(self, other: Curvature) -> None:
        assert isinstance(other, WoodFisher)
        n, n_o = float(self.count), float(other.count)
        if n_o >= n:
            raise ValueError(f"cannot remove {n_o:.0f} positions from a curvature of {n:.0f}; is the full curvature"
                             " really accumulated over a superset of the forget data?")
        self.rows = {k: torch.cat([self.rows[k], other.rows[k].to(self.rows[k])]) for k in self.param_names}
        self.signs = torch.cat([self.signs, -other.signs])
        self.count = torch.tensor(n - n_o, dtype=torch.float64)
        self.examples = self.examples - other.examples
        self._decompose()

    def _state(self) -> dict[str, Any]:
        return {"fisher_type": self.fisher_type, "blocks": self.blocks, "max_full_elements": self.max_full_elements,
                "count": self.count.clone(), "examples": self.examples, "signs": self.signs.clone(),
                "rows": dict(self.rows)}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self._reset()
        self.fisher_type = state["fisher_type"]
        self.blocks = state["blocks"]
        self.max_full_elements = int(state["max_full_elements"])
        self.count = torch.as_tensor(state["count"], dtype=torch.float64)
        self.examples = int(state["examples"])
        self.signs = torch.as_tensor(state["signs"], dtype=torch.float64)
        params = dict(self.model.named_parameters())
        self.rows = {n: state["rows"][n].to(params[n].device) for n in self.param_names}
        self._decompose()

    def memory_footprint(self) -> dict[str, int]:
        """Per-example gradient rows (m · d numbers) plus the per-block m × m decompositions."""
        rows = tensor_bytes(*self.rows.values()) + sum(tensor_bytes(*r) for r in self._rows.values())
        decomp = sum(tensor_bytes(*e.values()) for e in self._decomp)
        return {"gradients": rows, "decomposition": decomp, "total": rows + decomp}
