"""Diagonal Fisher: `C = diag(E[g ⊙ g])`, the cheap baseline that covers every trainable parameter.

An *example* is one row of the batch (a sequence); its gradient is that of the sum of its token losses,
and the sum of squares is divided by the number of valid positions. With `fisher_type="mc"` (labels sampled
from the model, the default) the cross-token terms vanish in expectation, so this estimates the per-token
true Fisher diagonal, the same scale as K-FAC's. `empirical` uses the data labels instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .base import Curvature, Vector, check_finite, checked_grad, tensor_bytes, whole
from .layers import trainable_parameters
from .objective import Objective

FISHER_TYPES = ("mc", "empirical")


class DiagonalFisher(Curvature):
    """Diagonal Fisher over the named trainable parameters (all of them by default)."""

    name = "diagonal"

    def __init__(
        self,
        model: nn.Module,
        *,
        fisher_type: str = "mc",
        params: Iterable[str] | None = None,
        objective: Objective | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, objective=objective, **kwargs)
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
        self.fisher_type = fisher_type
        self.param_names = trainable_parameters(self.model, params)
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = torch.zeros((), dtype=torch.float64)
        self.diagonal: dict[str, Tensor] = {}

    def _accumulate(self, batch: Mapping[str, Tensor]) -> None:
        params = dict(self.model.named_parameters())
        plist = [params[n] for n in self.param_names]
        pos = self.objective.positions(self.logits(batch), batch)
        if pos.count == 0:
            return
        targets = pos.targets if self.fisher_type == "empirical" else self.sample_targets(pos, batch)
        losses = self.objective.per_position_loss(pos.outputs, targets.to(pos.outputs.device))
        example = pos.example_index
        per_example = torch.zeros(int(example.max()) + 1, dtype=losses.dtype, device=losses.device)
        per_example = per_example.index_add(0, example, losses)
        rows = example.unique()
        for i, b in enumerate(rows.tolist()):
            grads = checked_grad(self.name, per_example[b], plist, retain_graph=i < len(rows) - 1, allow_unused=True)
            for n, g in zip(self.param_names, grads):
                if g is None:
                    continue
                sq = g.detach().float().pow(2)
                self.sums[n] = sq if n not in self.sums else self.sums[n] + sq
        self.count += pos.count

    def _finalize(self) -> None:
        params = dict(self.model.named_parameters())
        count = float(self.reduce(self.count.clone()))
        if count <= 0:
            raise RuntimeError("diagonal: no valid position was seen; accumulate batches with labels != -100 first")
        for n in self.param_names:
            s = self.sums.get(n, torch.zeros_like(params[n], dtype=torch.float32))
            s = self.reduce(s.clone()) / count
            check_finite(f"parameter {n!r}", s)
            self.diagonal[n] = s
        self.count = torch.tensor(count, dtype=torch.float64)
        self.sums = {}

    def _apply(self, vector: Vector, damping, power: float) -> Vector:
        out = {}
        for n in self.param_names:
            v = vector[n]
            out[n] = ((self.diagonal[n].to(v.device) + damping(n)) ** power).to(v.dtype) * v
        return out

    def _damping_scales(self) -> dict[str, float]:
        """Per parameter tensor: the mean of its diagonal."""
        return {n: float(whole(self.diagonal[n].double().mean())) for n in self.param_names}

    def _block_parameters(self) -> dict[str, tuple[str, ...]]:
        """Per parameter tensor (the blocks of `_damping_scales`)."""
        return {n: (n,) for n in self.param_names}

    def _quadratic(self, vector: Vector) -> float:
        return float(sum(whole((self.diagonal[n].double().to(vector[n].device) * vector[n].double().pow(2)).sum())
                         for n in self.param_names))

    def _subtract(self, other: Curvature) -> None:
        n, n_o = float(self.count), float(other.count)
        if n_o >= n:
            raise ValueError(f"cannot remove {n_o:.0f} positions from a curvature of {n:.0f}; is the full curvature"
                             " really accumulated over a superset of the forget data?")
        for k in self.param_names:
            self.diagonal[k] = ((n * self.diagonal[k] - n_o * other.diagonal[k]) / (n - n_o)).clamp_min(0)
        self.count = torch.tensor(n - n_o, dtype=torch.float64)

    def _state(self) -> dict[str, Any]:
        return {"fisher_type": self.fisher_type, "count": self.count, "diagonal": dict(self.diagonal)}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.fisher_type = state["fisher_type"]
        self.count = torch.as_tensor(state["count"], dtype=torch.float64)
        self.diagonal = {n: t.float() for n, t in state["diagonal"].items()}

    def memory_footprint(self) -> dict[str, int]:
        diag = tensor_bytes(*self.diagonal.values()) + tensor_bytes(*self.sums.values())
        return {"diagonal": diag, "total": diag}
