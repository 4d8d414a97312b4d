"""Mixture-of-experts layers whose experts are fused 3-D parameters, seen as one linear layer per expert, and their
routers, seen as linear layers.

transformers 5 keeps the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS and others in one module with
`gate_up_proj` (or `up_proj`) [experts, out, in] and `down_proj` [experts, hidden, ffn] parameters (`[experts, in,
out]` where the module says `is_transposed`), and runs them in a loop over the experts the router picked, or in
grouped or batched matrix products. Expert e of such a parameter is a linear map applied to the tokens routed to it,
so its Kronecker factors are those of an `nn.Linear` that only sees those tokens: `A_e` the second moment of their
inputs, `G_e` that of their output gradients (`docs/curvature.md`). No module hook sees those rows, so while K-FAC
gathers statistics the experts module runs `routed_forward` instead of its own forward: the same computation, one
expert at a time, handing each expert's inputs, outputs and token positions to the statistics. It reads the layout
from the attributes transformers' `use_experts_implementation` gives the module (`has_gate`, `has_bias`,
`is_transposed`, `has_post_expert_norm`, `_apply_gate`, `act_fn`); a module without them is not treated as experts
(its weights stay uncovered, with a warning). Its output is compared once with the module's own
(`check_routed_forward`), so a layout it does not reproduce is refused by name instead of giving wrong factors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserInputError

#: the attributes `transformers.integrations.moe.use_experts_implementation` sets on an experts module
LAYOUT_ATTRIBUTES = ("has_gate", "has_bias", "is_transposed", "num_experts")

#: record(expert, projection, inputs, outputs, token rows): what `routed_forward` hands the statistics per expert
Record = Callable[[int, str, Tensor, Tensor, Tensor], None]


def is_fused_experts(module: nn.Module) -> bool:
    """Whether `module` is a transformers experts module with fused 3-D weights of a layout `routed_forward` runs."""
    if not all(hasattr(module, a) for a in LAYOUT_ATTRIBUTES):
        return False
    names = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
    return all(isinstance(getattr(module, n, None), nn.Parameter) and getattr(module, n).dim() == 3 for n in names)


def is_router(module: nn.Module) -> bool:
    """Whether `module` is a transformers mixture-of-experts router: a bare `weight` [experts, hidden] (a bias
    [experts] in GPT-OSS) whose forward returns the router logits `linear(hidden, weight, bias)` first, then the
    routing weights and the chosen experts (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, DeepSeek-V3 in transformers 5).
    K-FAC tracks it as a linear layer whose output is those logits (`check_router_output` on its first call)."""
    weight = getattr(module, "weight", None)
    return (not isinstance(module, nn.Linear) and isinstance(weight, nn.Parameter) and weight.dim() == 2
            and all(hasattr(module, a) for a in ("top_k", "num_experts", "hidden_dim"))
            and tuple(weight.shape) == (module.num_experts, module.hidden_dim))


def router_logits(output: Any) -> Tensor:
    """A tracked layer's output tensor: a router's logits (the first of the tuple it returns), or the output."""
    return output[0] if isinstance(output, tuple) else output


def check_router_output(name: str, module: nn.Module, inputs: Tensor, output: Tensor) -> None:
    """Refuse, naming the router, when its first output is not `linear(inputs, weight, bias)` (a router K-FAC cannot
    read as a linear layer)."""
    with torch.no_grad():
        x = inputs.reshape(-1, inputs.shape[-1]).to(module.weight.dtype)
        expected = nn.functional.linear(x, module.weight, getattr(module, "bias", None))
    got = output.reshape(expected.shape) if output.numel() == expected.numel() else output
    if not _reproduces(expected, got)[0]:
        raise UserInputError(
            f"kfac: the router {name!r} does not return linear(hidden, weight) as its first output (what K-FAC reads "
            f"as its logits); leave it out with exclude=[{name!r}] or use curvature='diagonal'")


def projections(module: nn.Module) -> tuple[tuple[str, str | None], ...]:
    """The experts module's (weight, bias) attribute names, in the order its forward applies them."""
    up = "gate_up_proj" if module.has_gate else "up_proj"
    bias = module.has_bias
    return ((up, f"{up}_bias" if bias else None), ("down_proj", "down_proj_bias" if bias else None))


def expert_shape(module: nn.Module, weight: str) -> tuple[int, int]:
    """(in, out) of one expert of the fused `weight`."""
    w = getattr(module, weight)
    return (int(w.shape[1]), int(w.shape[2])) if module.is_transposed else (int(w.shape[2]), int(w.shape[1]))


def _linear(module: nn.Module, x: Tensor, weight: str, bias: str | None, expert: int) -> Tensor:
    w = getattr(module, weight)[expert]
    y = x @ w if module.is_transposed else nn.functional.linear(x, w)
    return y if bias is None else y + getattr(module, bias)[expert]


def routed_forward(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                   record: Record) -> Tensor:
    """The experts module's forward (`hidden_states` [tokens, hidden], the router's `top_k_index` and
    `top_k_weights` [tokens, k]), one expert at a time, calling `record` with each expert's inputs (detached) and
    outputs (in the graph) of both projections and the token rows they belong to. Expert ids outside
    `[0, num_experts)` (expert parallelism's sentinels) are skipped, as transformers does."""
    up, down = projections(module)
    k = top_k_index.shape[-1]
    ids = top_k_index.reshape(-1)
    tokens = torch.arange(hidden_states.shape[0], device=ids.device).repeat_interleave(k)
    weights = top_k_weights.reshape(-1)
    out = torch.zeros_like(hidden_states)
    for expert in ids.unique().tolist():
        if not 0 <= expert < module.num_experts:
            continue
        chosen = (ids == expert).nonzero().squeeze(1)
        rows = tokens[chosen]
        x = hidden_states[rows]
        h = _linear(module, x, *up, expert)
        record(expert, up[0], x.detach(), h, rows)
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        y = _linear(module, h, *down, expert)
        record(expert, down[0], h.detach(), y, rows)
        if getattr(module, "has_post_expert_norm", False):
            y = module.post_expert_norm(y)
        y = y * weights[chosen, None].to(y.dtype)
        out = out.index_add(0, rows.to(out.device), y.to(out.dtype))
    return out.to(hidden_states.dtype)


def _routing_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = dict(zip(names, args))
    values.update({n: kwargs[n] for n in names if n in kwargs})
    missing = [n for n in names if n not in values]
    if missing:
        raise UserInputError(f"kfac: an experts module was called without {missing}; K-FAC's expert statistics need "
                             "the transformers 5 experts signature (hidden_states, top_k_index, top_k_weights); "
                             "leave the experts out with exclude=['experts'] or use curvature='diagonal'")
    hidden, index, weights = values["hidden_states"], values["top_k_index"], values["top_k_weights"]
    if hidden.dim() != 2 or index.dim() != 2 or index.shape[0] != hidden.shape[0] or weights.shape != index.shape:
        raise UserInputError(
            f"kfac: an experts module was called with hidden states {tuple(hidden.shape)} and routing "
            f"{tuple(index.shape)} / {tuple(weights.shape)}; K-FAC's expert statistics need one row per token "
            "([tokens, hidden] and [tokens, k]), as transformers 5 passes them; leave the experts out with "
            "exclude=['experts'] or use curvature='diagonal'")
    return hidden, index, weights


def experts_recorders(layers: Sequence[Any], keep: Callable[[str, Tensor, Tensor, Tensor], None]
                      ) -> tuple[list[tuple[str, nn.Module]], Callable[[str], Record]]:
    """For the tracked experts among `layers` (`TrackedLayer`s with `expert` set): their experts modules (name,
    module), each once, and the recorder `routed` asks for per module, which hands a tracked expert's layer name,
    inputs, outputs and token rows to `keep` (experts that `include`/`exclude` left out are skipped)."""
    names = {(layer.module_name, layer.expert, layer.weight_attr): layer.name for layer in layers
             if layer.expert is not None}
    modules = list({layer.module_name: layer.module for layer in layers
                    if layer.expert is not None}.items())

    def recorder(module_name: str) -> Record:
        def record(expert: int, weight: str, x: Tensor, out: Tensor, rows: Tensor) -> None:
            name = names.get((module_name, expert, weight))
            if name is not None:
                keep(name, x, out, rows)
        return record

    return modules, recorder


@contextlib.contextmanager
def routed(modules: Sequence[tuple[str, nn.Module]], record: Callable[[str], Record],
           checked: set[str]) -> Iterator[None]:
    """Run each of the experts `modules` (name, module) through `routed_forward` while the block is open, `record`
    giving each module's recorder. The first call of a module whose name is not in `checked` is compared with the
    module's own forward (`check_routed_forward`) and its name added."""
    # a forward set on the instance before (accelerate's dispatch hooks do this) is put back afterwards
    previous = [module.__dict__.get("forward") for _, module in modules]
    for name, module in modules:
        def forward(*args: Any, _name: str = name, _module: nn.Module = module, **kwargs: Any) -> Tensor:
            hidden, index, weights = _routing_args(args, kwargs)
            out = routed_forward(_module, hidden, index, weights, record(_name))
            if _name not in checked:
                with torch.no_grad():
                    own = type(_module).forward(_module, *args, **kwargs)
                check_routed_forward(_name, own, out)
                checked.add(_name)
            return out

        module.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's forward
    try:
        yield
    finally:
        for (_, module), before in zip(modules, previous):
            module.__dict__.pop("forward", None)
            if before is not None:
                module.forward = before


def _reproduces(expected: Tensor, got: Tensor) -> tuple[bool, float, float]:
    """(whether `got` equals `expected` in shape and to 1e-4 of its scale, 3e-2 in half precision; the largest
    difference; the scale): the test `check_routed_forward` and `check_router_output` apply."""
    tolerance = 1e-4 if got.dtype in (torch.float32, torch.float64) else 3e-2
    expected, got = expected.detach().float(), got.detach().float()
    if expected.shape != got.shape:
        return False, float("inf"), 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    gap = float((expected - got).abs().max()) if expected.numel() else 0.0
    return gap <= tolerance * max(scale, 1.0), gap, scale


def check_routed_forward(name: str, own: Tensor, routed_out: Tensor) -> None:
    """Refuse, naming the module, when `routed_forward` does not reproduce the experts module's own output."""
    ok, gap, scale = _reproduces(router_logits(own), routed_out)
    if not ok:
        raise UserInputError(
            f"kfac: the experts module {name!r} computes something K-FAC's per-expert statistics do not reproduce "
            f"(largest difference {gap:.3g} at output scale {scale:.3g}); leave its experts out with "
            f"exclude=[{name!r}] or use curvature='diagonal' (every parameter) or 'woodfisher'")
