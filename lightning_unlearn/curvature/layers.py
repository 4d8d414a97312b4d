"""Which modules carry curvature, and how their weights map to the `[out, in]` layout the maths uses.

Tracked: `nn.Linear` and transformers' `Conv1D` (GPT-2; weight stored `[in, out]`), recognised by duck
typing so that the engine needs no transformers import. Skipped by default: embeddings and the LM head
(their vocabulary-sized factors do not fit), found through `get_output_embeddings()` and by weights tied to
an `nn.Embedding`. `include`/`exclude` are regular expressions matched (`re.search`) against module names.
Only modules with trainable weights are tracked, so PEFT/LoRA models get curvature on the adapters alone.
A parameter shared by several tracked modules is listed once (`shared_parameters` names such parameters: K-FAC
refuses them, its factors being per module). Trainable weight tensors outside any tracked module (e.g. the fused 3-D
experts of a mixture-of-experts model) are named in an `UncoveredParametersWarning` (`warn_uncovered`), since their
weights would never move.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UserInputError
from .experts import expert_shape, is_fused_experts, is_router, projections


class UncoveredParametersWarning(UserWarning):
    """Trainable weights that a layer-wise curvature (K-FAC, WoodFisher, CG) does not cover: they will not move."""


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D`: a linear map whose weight is stored transposed, `[in, out]`."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


@dataclass(frozen=True)
class TrackedLayer:
    """A linear-like module that carries curvature, with its parameter names in `model.named_parameters()`.

    `expert` is set for one expert of a fused mixture-of-experts parameter (`curvature/experts.py`): the layer is
    then the slice `[expert]` of the module's 3-D `weight_attr` (and of its 2-D bias), and several layers share one
    parameter, each its own slice."""

    name: str
    module: nn.Module
    weight_name: str
    bias_name: str | None
    in_features: int
    out_features: int
    transposed: bool  # True for Conv1D ([in, out] storage), and for experts stored [experts, in, out]
    expert: int | None = None
    weight_attr: str = "weight"
    router: bool = False  # a mixture-of-experts router (`experts.is_router`): its output is the first of a tuple

    @property
    def has_bias(self) -> bool:
        return self.bias_name is not None

    @property
    def param_names(self) -> tuple[str, ...]:
        return (self.weight_name,) if self.bias_name is None else (self.weight_name, self.bias_name)

    @property
    def module_name(self) -> str:
        """The name of `module` in the model (an expert's: its experts module)."""
        return self.name if self.expert is None else self.name.rsplit(".", 1)[0]

    @property
    def weight(self) -> Tensor:
        """The weight parameter (for an expert: the whole fused parameter)."""
        return getattr(self.module, self.weight_attr)

    @property
    def block_labels(self) -> tuple[str, ...]:
        """The names of what this layer's block covers: its parameters, or for an expert `name[expert]` of each
        (`split_label` reads them back)."""
        if self.expert is None:
            return self.param_names
        return tuple(f"{n}[{self.expert}]" for n in self.param_names)

    def _slice(self, tensor: Tensor) -> Tensor:
        return tensor if self.expert is None else tensor[self.expert]

    def to_matrix(self, vector: dict[str, Tensor]) -> Tensor:
        """Parameter-shaped pieces -> one `[out, in (+1 for bias)]` matrix (bias as the last column)."""
        w = self._slice(vector[self.weight_name])
        w = w.t() if self.transposed else w
        if self.bias_name is None:
            return w
        return torch.cat([w, self._slice(vector[self.bias_name])[:, None]], dim=1)

    def from_matrix(self, matrix: Tensor) -> dict[str, Tensor]:
        """Inverse of `to_matrix` (for an expert: its slices, shaped like `param[expert]`)."""
        w = matrix[:, : self.in_features]
        out = {self.weight_name: (w.t() if self.transposed else w).contiguous()}
        if self.bias_name is not None:
            out[self.bias_name] = matrix[:, self.in_features].contiguous()
        return out

    def write(self, out: dict[str, Tensor], matrix: Tensor, like: Mapping[str, Tensor]) -> None:
        """Put `from_matrix(matrix)` into the parameter-shaped `out` (an expert's into its slice of tensors shaped
        and typed like `like`'s, created as zeros when `out` has none yet)."""
        pieces = self.from_matrix(matrix)
        if self.expert is None:
            out.update(pieces)
            return
        for name, piece in pieces.items():
            if name not in out:
                out[name] = torch.zeros_like(like[name])
            out[name][self.expert] = piece.to(out[name].dtype)


def split_label(label: str) -> tuple[str, int | None]:
    """A block label (`TrackedLayer.block_labels`) -> (parameter name, expert index or None)."""
    if label.endswith("]") and "[" in label:
        name, index = label[:-1].rsplit("[", 1)
        if index.isdigit():
            return name, int(index)
    return label, None


def zero_labels(vector: Mapping[str, Tensor], labels: Iterable[str]) -> dict[str, Tensor]:
    """`vector` with the parameters, or experts' slices, that `labels` name set to zero (the others shared)."""
    out = dict(vector)
    for label in labels:
        name, index = split_label(label)
        if name not in out:
            continue
        if index is None:
            out[name] = torch.zeros_like(out[name])
        else:
            if out[name] is vector[name]:
                out[name] = out[name].clone()
            out[name][index] = 0
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
    experts: bool = True,
) -> list[TrackedLayer]:
    """The linear-like modules of `model` that carry curvature, in module order; with `experts`, also one layer per
    expert of each fused mixture-of-experts projection (`curvature/experts.py`; named `<module>.<weight>[<expert>]`,
    selected by `include`/`exclude` on that name or the module's) and the routers (`experts.is_router`).

    Raises `UserInputError` when the model has no trainable parameter at all, or when nothing is left to track
    (naming the filters that removed everything).
    """
    check_trainable(model)
    inc, exc = _patterns(include), _patterns(exclude)
    skipped = _skipped_weights(model) if skip_embeddings else set()
    param_names = {id(p): n for n, p in model.named_parameters()}
    layers: list[TrackedLayer] = []
    for name, module in model.named_modules():
        if experts and is_fused_experts(module):
            layers += _expert_layers(name, module, param_names, inc, exc)
            continue
        conv1d, router = is_conv1d(module), experts and is_router(module)
        if not (isinstance(module, nn.Linear) or conv1d or router):
            continue
        weight = module.weight
        if not weight.requires_grad or id(weight) in skipped or id(weight) not in param_names:
            continue
        if not _selected(name, inc, exc):
            continue
        bias = getattr(module, "bias", None)
        bias_name = param_names.get(id(bias)) if bias is not None and bias.requires_grad else None
        in_f, out_f = (weight.shape[0], weight.shape[1]) if conv1d else (weight.shape[1], weight.shape[0])
        layers.append(
            TrackedLayer(name=name, module=module, weight_name=param_names[id(weight)], bias_name=bias_name,
                         in_features=int(in_f), out_features=int(out_f), transposed=conv1d, router=router)
        )
    if not layers:
        raise UserInputError(
            "no trackable layer: the model has no trainable nn.Linear or Conv1D outside the embeddings and LM head"
            f" (include={inc or None}, exclude={exc or None}); loosen include/exclude, unfreeze layers,"
            " or use the 'diagonal' backend, which covers every trainable parameter"
        )
    return layers


def _expert_layers(name: str, module: nn.Module, param_names: dict[int, str], inc: list[str],
                   exc: list[str]) -> list[TrackedLayer]:
    """One `TrackedLayer` per expert of each trainable fused projection of the experts module `name`."""
    layers = []
    for weight_attr, bias_attr in projections(module):
        weight = getattr(module, weight_attr)
        if not weight.requires_grad or id(weight) not in param_names:
            continue
        bias = getattr(module, bias_attr, None) if bias_attr else None
        bias_name = param_names.get(id(bias)) if bias is not None and bias.requires_grad else None
        in_f, out_f = expert_shape(module, weight_attr)
        for expert in range(int(weight.shape[0])):
            label = f"{name}.{weight_attr}[{expert}]"
            if not (_selected(label, inc, exc) and _selected(name, [], exc)):
                continue
            layers.append(TrackedLayer(name=label, module=module, weight_name=param_names[id(weight)],
                                       bias_name=bias_name, in_features=in_f, out_features=out_f,
                                       transposed=bool(module.is_transposed), expert=expert,
                                       weight_attr=weight_attr))
    return layers


def _patterns(patterns: str | Iterable[str] | None) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns or [])


def _selected(name: str, inc: list[str], exc: list[str]) -> bool:
    """Whether module `name` passes the include/exclude regular expressions."""
    return (not inc or any(re.search(p, name) for p in inc)) and not any(re.search(p, name) for p in exc)


def check_trainable(model: nn.Module) -> None:
    """Raise `UserInputError` when no parameter of `model` requires grad (nothing could be unlearned)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise UserInputError(
            "the model has no trainable parameter (every parameter has requires_grad=False), so nothing can be "
            "unlearned; unfreeze the parameters to unlearn (e.g. p.requires_grad_(True) for the layers to change)"
        )


def layer_parameter_names(layers: Iterable[TrackedLayer]) -> tuple[str, ...]:
    """The parameter names of `layers`, each once (a weight shared by two layers is one parameter)."""
    return tuple(dict.fromkeys(n for layer in layers for n in layer.param_names))


def shared_parameters(layers: Iterable[TrackedLayer]) -> dict[str, list[str]]:
    """Parameter name -> the tracked layers using it, for parameters that several tracked modules share (the
    experts of one fused parameter are one user: each has its own slice)."""
    users: dict[str, list[str]] = {}
    for layer in layers:
        user = layer.module_name
        for n in layer.param_names:
            if user not in users.setdefault(n, []):
                users[n].append(user)
    return {n: names for n, names in users.items() if len(names) > 1}


def _name_pattern(name: str) -> str:
    """`model.layers.3.mlp.experts.down_proj` -> `model.layers.*.mlp.experts.down_proj` (one line per kind)."""
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name)


def uncovered_parameters(
    model: nn.Module,
    layers: Iterable[TrackedLayer],
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> list[str]:
    """Trainable weight tensors (2-D or more) that no tracked layer covers and that are not left out by design.

    Left out by design: embeddings and the LM head (tied or not), 1-D tensors (norm scales, biases), and parameters
    of modules that `include`/`exclude` filter out. What remains (e.g. a mixture-of-experts model's fused 3-D
    experts, a router's raw weight) would never move under a layer-wise curvature.
    """
    inc, exc = _patterns(include), _patterns(exclude)
    covered = set(layer_parameter_names(layers))
    skipped = _skipped_weights(model)
    seen: set[int] = set()
    out = []
    for module_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{local}" if module_name else local
            if id(p) in seen:
                continue
            seen.add(id(p))
            if (not p.requires_grad or p.dim() < 2 or id(p) in skipped or name in covered
                    or not _selected(module_name, inc, exc)):
                continue
            out.append(name)
    return out


def warn_uncovered(
    model: nn.Module,
    layers: Iterable[TrackedLayer],
    backend: str,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> None:
    """Warn (`UncoveredParametersWarning`) naming the trainable weights a layer-wise `backend` leaves out, with their
    share of the trainable weights: without curvature they get no step, silently."""
    layers = list(layers)
    names = uncovered_parameters(model, layers, include, exclude)
    if not names:
        return
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values() if p.requires_grad)
    left = sum(params[n].numel() for n in names)
    kinds = list(dict.fromkeys(_name_pattern(n) for n in names))
    shown = ", ".join(kinds[:5]) + (f" and {len(kinds) - 5} more" if len(kinds) > 5 else "")
    warnings.warn(
        f"{backend}: the curvature covers nn.Linear/Conv1D layers and fused experts only; {len(names)} trainable "
        f"weight tensor(s) "
        f"outside them ({shown}: {left:,} of the {total:,} trainable weights, {left / max(total, 1):.0%}) get no "
        f"curvature and will not move; use curvature='diagonal', which covers every trainable parameter, or freeze "
        f"them (requires_grad_(False)) to unlearn with the layers alone",
        UncoveredParametersWarning,
        stacklevel=3,
    )


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
        check_trainable(model)
        return tuple(n for n, p in named.items() if p.requires_grad)
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
    """The parameter names a matrix-free backend covers: `params` if given, else the tracked layers' ones (each
    once: a weight shared by two layers is one parameter)."""
    if params is None:
        return layer_parameter_names(find_layers(model, include, exclude))
    return trainable_parameters(model, params)
