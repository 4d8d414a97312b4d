"""The gradients of the mean token NLL of k groups of examples from one forward and backward pass per batch
(`SecondOrderUnlearner.group_gradients`, the protection constraints of `docs/recipe.md` §2 and §9).

The protection needs one gradient per group: 8 groups of holdout examples, and in the knowledge regime 8 groups of a
retain batch's examples. Computed group by group, that is 8 forward and backward passes over 2-3 examples each, where
a pass costs little more over the whole batch. For the weights of linear layers the groups separate exactly after
one pass: examples do not interact in a causal LM, so the gradient of the sum of the groups' mean losses with
respect to a layer's output at a position of group j's example is that of group j's loss alone, and group j's weight
gradient is `Σ_p g_p a_pᵀ` over its examples' positions (`a` the layer's input, `g` the output gradient): the
per-example gradient trick, summed per group. It covers the tracked layers of Kronecker-factored curvature
(`curvature.layers.TrackedLayer`), which are exactly the parameters K-FAC's Newton step moves; other parameter sets
use the per-group passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..curvature.base import Vector, identity
from ..curvature.carried import FactoredGradient
from ..curvature.experts import experts_recorders, routed, router_logits
from ..curvature.kronecker import factors_are_cheaper
from ..curvature.layers import TrackedLayer
from ..curvature.objective import IGNORE_INDEX, model_logits
from .losses import token_nll
from .protection import example_group_ids
from .records import Batch


def group_sizes(batches: Sequence[Batch], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """([k] examples, [k] valid (shifted) label positions, [k] tokens: attention-mask positions, or every position)
    per group on this process: which groups exist, the denominators of their mean NLL, and the rows their factors
    can have at most."""
    examples, positions, tokens = (torch.zeros(k, dtype=torch.float64) for _ in range(3))
    for b in batches:
        ids = example_group_ids(b, k)
        examples.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
        positions.index_add_(0, ids, (b["labels"][:, 1:] != IGNORE_INDEX).sum(1).double().cpu())
        mask = b.get("attention_mask")
        tokens.index_add_(0, ids, (mask.sum(1) if mask is not None else torch.full(
            (len(ids),), b["input_ids"].shape[1])).double().cpu())
    return examples, positions, tokens


def _capture(store: list[tuple[Tensor, Tensor]]) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
    """A forward hook that keeps a layer's input (detached) and output (in the graph)."""
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        store.append((inputs[0].detach(), router_logits(output)))
    return hook


def _flattened(layer: TrackedLayer, a: Tensor, out: Tensor, rows: int) -> bool:
    """Whether a router saw the batch flattened to `rows` = examples × length rows (in order), as routers do."""
    return layer.router and a.dim() == 2 and a.shape[0] == out.shape[0] == rows


def grouped_nll_gradients(model: nn.Module, layers: Sequence[TrackedLayer], batches: Sequence[Batch], k: int,
                          reduce: Callable[[Tensor], Tensor], dtypes: Mapping[str, torch.dtype]
                          ) -> list[Vector] | None:
    """`∇` of the mean token NLL of each non-empty group of `batches`' examples (`protection.example_group_ids`),
    over the parameters of `layers`, each reduced across processes by `reduce`: what one forward and backward per
    group gives, from one forward and backward per batch (see the module docstring). Groups with examples on no
    process are left out, as `protection.example_groups` leaves them. None when a layer sees rows that are not the
    batch's examples (its input's first dimension is not the batch size) or an output the loss's graph does not reach
    (e.g. recomputed by activation checkpointing): the caller then runs one pass per group. The experts of fused
    mixture-of-experts parameters get theirs from the routed forward (`curvature/experts.py`): a group's rows are the
    tokens of its examples routed to the expert.
    In one process (`reduce` the identity: the factors are this process's positions) each gradient is a
    `FactoredGradient` that also keeps, for the layers where factors of the largest group's size can cost less than
    the matrix, the positions' output gradients and inputs whose product it is (positions whose output gradient is
    zero left out), so that K-FAC rotates them instead of the matrix where that is cheaper (`curvature/carried.py`).
    Raises ValueError when a group has examples but no label position."""
    examples, positions, tokens = group_sizes(batches, k)
    present, counts = reduce(examples), reduce(positions)
    # the layers whose factors can pay (`factors_are_cheaper` for the largest group's tokens, G dense): one process
    # only, as the factors are this process's positions
    longest = float(tokens.max()) if k else 0.0
    factored = {layer.name for layer in layers if reduce is identity and layer.expert is None and factors_are_cheaper(
        int(longest), layer.out_features, layer.in_features + int(layer.has_bias), layer.out_features)}
    kept = [j for j in range(k) if float(present[j]) > 0]
    if any(float(counts[j]) <= 0 for j in kept):
        raise ValueError("a protection group's examples have no position with labels != -100; nothing to measure "
                         "its loss on")
    sums = {layer.name: torch.zeros(len(kept), layer.out_features, layer.in_features + int(layer.has_bias),
                                    dtype=torch.float32, device=layer.weight.device) for layer in layers}
    slot = {j: i for i, j in enumerate(kept)}
    like = dict(model.named_parameters())  # the shapes an expert's slices are written into
    # the curvature's statistics compared these modules' routed forward with their own already
    checked = {layer.module_name for layer in layers if layer.expert is not None}
    rows: dict[str, list[list[tuple[Tensor, Tensor]]]] = {layer.name: [[] for _ in kept] for layer in layers}
    for batch in batches:
        # the examples reordered group by group, so that each group's rows are one contiguous slice
        order = torch.sort(example_group_ids(batch, k), stable=True).indices
        size = int(batch["input_ids"].shape[0])
        b = {key: (v[order.to(v.device)] if isinstance(v, Tensor) and v.shape[:1] == (size,) else v)
             for key, v in batch.items()}
        ids = example_group_ids(batch, k)[order]
        bounds = torch.searchsorted(ids, torch.arange(k + 1)).tolist()
        captured: dict[str, list[tuple[Tensor, Tensor]]] = {layer.name: [] for layer in layers}
        # an expert's rows are the tokens routed to it, of the batch flattened to [examples × length]
        token_rows: dict[str, list[Tensor]] = {layer.name: [] for layer in layers}

        def keep(name: str, x: Tensor, out: Tensor, rows: Tensor, captured=captured, token_rows=token_rows) -> None:
            captured[name].append((x, out))
            token_rows[name].append(rows)

        experts, recorder = experts_recorders(layers, keep)
        handles = [layer.module.register_forward_hook(_capture(captured[layer.name])) for layer in layers
                   if layer.expert is None]
        try:
            with torch.enable_grad(), routed(experts, recorder, checked):
                nll, example = token_nll(model_logits(model, b), b)
        finally:
            for h in handles:
                h.remove()
        length = int(b["input_ids"].shape[1])
        if any((a.shape[0] != size or out.shape[0] != size) and not _flattened(layer, a, out, size * length)
               for layer in layers if layer.expert is None for a, out in captured[layer.name]):
            return None
        if any(int(t.max()) >= size * length for r in token_rows.values() for t in r):
            return None
        weights = (1.0 / counts.to(device=nll.device, dtype=nll.dtype))[ids.to(nll.device)[example]]
        outputs = [out for layer in layers for _, out in captured[layer.name]]
        if not outputs or nll.numel() == 0:
            continue
        with torch.enable_grad():  # the weighted sum is part of the graph too (a caller under torch.no_grad())
            total = (nll * weights).sum()
        grads = torch.autograd.grad(total, outputs, allow_unused=True)
        if any(g is None for g in grads):  # an output outside the graph (e.g. recomputed by checkpointing)
            return None
        remaining = iter(grads)
        for layer in layers:
            for call, (a, _) in enumerate(captured[layer.name]):
                a, g = a.float(), next(remaining).float()  # [B, ..., in], [B, ..., out]; an expert's [n, in], [n, out]
                if layer.expert is None and _flattened(layer, a, g, size * length):
                    a, g = a.reshape(size, length, -1), g.reshape(size, length, -1)
                if layer.has_bias:
                    a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
                if layer.expert is not None:
                    example_of_row = token_rows[layer.name][call].to(a.device) // length
                    for j in range(k):
                        chosen = (example_of_row >= bounds[j]) & (example_of_row < bounds[j + 1])
                        if bool(chosen.any()):
                            sums[layer.name][slot[j]] += g[chosen].T @ a[chosen]
                    continue
                for j in range(k):
                    start, end = bounds[j], bounds[j + 1]
                    if end > start:
                        ga, gg = a[start:end].reshape(-1, a.shape[-1]), g[start:end].reshape(-1, g.shape[-1])
                        sums[layer.name][slot[j]] += gg.T @ ga
                        if layer.name in factored:
                            nonzero = gg.ne(0).any(dim=1)
                            rows[layer.name][slot[j]].append((gg[nonzero], ga[nonzero]))
    out: list[Vector] = []
    for i in range(len(kept)):
        vector: Vector = {}
        for layer in layers:
            layer.write(vector, reduce(sums[layer.name][i].contiguous()), like)
        vector = {name: t.to(dtypes[name]) for name, t in vector.items()}
        if factored:
            vector = FactoredGradient(vector, {name: (torch.cat([g for g, _ in rows[name][i]]),
                                                      torch.cat([a for _, a in rows[name][i]]))
                                               for name in factored if rows[name][i]})
        out.append(vector)
    return out
