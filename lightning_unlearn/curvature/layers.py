"""Which modules carry curvature, and how their weights map to the `[out, in]` layout the maths uses.

Tracked: `nn.Linear` and transformers' `Conv1D` (GPT-2; weight stored `[in, out]`), recognised by duck
typing so that the engine needs no transformers import. Skipped by default: embeddings and the LM head
(their vocabulary-sized factors do not fit), found through `get_output_embeddings()` and by weights tied to
an `nn.Embedding`. `include`/`exclude` are regular expressions matched (`re.search`) against module names.
Only modules with trainable weights are tracked, so PEFT/LoRA models get curvature on the adapters alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D`: a linear map whose weight is stored transposed, `[in, out]`."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


@dataclass(frozen=True)
class TrackedLayer:
    """A linear-like module that carries curvature, with its parameter names in `model.named_parameters()`."""

    name: str
    module: nn.Module
    weight_name: str
    bias_name: str | None
    in_features: int
    out_features: int
    transposed: bool  # True for Conv1D ([in, out] storage)

    @property
    def has_bias(self) -> bool:
        return self.bias_name is not None

    @property
    def param_names(self) -> tuple[str, ...]:
        return (self.weight_name,) if self.bias_name is None else (self.weight_name, self.bias_name)

    def to_matrix(self, vector: dict[str, Tensor]) -> Tensor:
        """Parameter-shaped pieces -> one `[out, in (+1 for bias)]` matrix (bias as the last column)."""
        w = vector[self.weight_name]
        w = w.t() if self.transposed else w
        if self.bias_name is None:
            return w
        return torch.cat([w, vector[self.bias_name][:, None]], dim=1)

    def from_matrix(self, matrix: Tensor) -> dict[str, Tensor]:
        """Inverse of `to_matrix`."""
        w = matrix[:, : self.in_features]
        out = {self.weight_name: (w.t() if self.transposed else w).contiguous()}
        if self.bias_name is not None:
            out[self.bias_name] = matrix[:, self.in_features].contiguous()
        return out


def _skipped_weights(model: nn.Module) -> set[int]:
    """ids of weights that belong to embeddings or the LM head (tied or not)."""
    skipped: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            skipped.add(id(module.weight))
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None and getattr(head, "weight", None) is not None:
            skipped.add(id(head.weight))
    return skipped


def find_layers(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    skip_embeddings: bool = True,
) -> list[TrackedLayer]:
    """The linear-like modules of `model` that carry curvature, in module order.

    Raises `ValueError` when nothing is left to track, naming the filters that removed everything.
    """
    inc = [include] if isinstance(include, str) else list(include or [])
    exc = [exclude] if isinstance(exclude, str) else list(exclude or [])
    skipped = _skipped_weights(model) if skip_embeddings else set()
    param_names = {id(p): n for n, p in model.named_parameters()}
    layers: list[TrackedLayer] = []
    for name, module in model.named_modules():
        conv1d = is_conv1d(module)
        if not (isinstance(module, nn.Linear) or conv1d):
            continue
        weight = module.weight
        if not weight.requires_grad or id(weight) in skipped or id(weight) not in param_names:
            continue
        if inc and not any(re.search(p, name) for p in inc):
            continue
        if any(re.search(p, name) for p in exc):
            continue
        bias = getattr(module, "bias", None)
        bias_name = param_names.get(id(bias)) if bias is not None and bias.requires_grad else None
        in_f, out_f = (weight.shape[0], weight.shape[1]) if conv1d else (weight.shape[1], weight.shape[0])
        layers.append(
            TrackedLayer(name=name, module=module, weight_name=param_names[id(weight)], bias_name=bias_name,
                         in_features=int(in_f), out_features=int(out_f), transposed=conv1d)
        )
    if not layers:
        raise ValueError(
            "no trackable layer: the model has no trainable nn.Linear or Conv1D outside the embeddings and LM head"
            f" (include={inc or None}, exclude={exc or None}); loosen include/exclude, unfreeze layers,"
            " or use the 'diagonal' backend, which covers every trainable parameter"
        )
    return layers


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the parameters: strips DDP/FSDP-style `.module` wrappers and `torch.compile`."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
        else:
            return model


def trainable_parameters(model: nn.Module, params: Iterable[str] | None = None) -> tuple[str, ...]:
    """`params` checked against `model` (each a known, trainable parameter, named once), or every trainable
    parameter when None. Raises `ValueError` naming the offending names."""
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
        if not names:
            raise ValueError("the model has no trainable parameter; unfreeze some parameters (requires_grad=True)")
        return tuple(names)
    names = list(params)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(f"unknown parameter names {unknown[:3]}; use names from model.named_parameters()")
    frozen = [n for n in names if not named[n].requires_grad]
    if frozen:
        raise ValueError(f"parameters {frozen[:3]} do not require grad; unfreeze them or leave them out of params")
    if not names:
        raise ValueError("params is empty; name at least one trainable parameter (or pass params=None)")
    if len(set(names)) != len(names):
        raise ValueError("params names a parameter twice; give each name once")
    return tuple(names)


def covered_parameters(
    model: nn.Module,
    params: Iterable[str] | None,
    include: str | Iterable[str] | None,
    exclude: str | Iterable[str] | None,
) -> tuple[str, ...]:
    """The parameter names a matrix-free backend covers: `params` if given, else the tracked layers' ones."""
    if params is None:
        return tuple(n for layer in find_layers(model, include, exclude) for n in layer.param_names)
    return trainable_parameters(model, params)
