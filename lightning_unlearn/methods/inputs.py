"""Checks of what a deletion request starts from: the batches and the model's weights.

Bad input found here would otherwise fail deep inside a forward pass ("index out of range in self" for a tokenizer
larger than the embedding) or produce silent rollbacks (NaN weights); each check raises `UserInputError` naming the
batch or parameter and the fix. Messages never contain token ids or text: forget data may be secret.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature.base import whole
from ..curvature.objective import IGNORE_INDEX
from ..errors import UserInputError
from .holdout import example_keys

#: integer dtypes accepted for token ids (an embedding lookup takes int32 and int64; narrower ones overflow the
#: vocabulary of any real tokenizer and usually mean the ids were packed for storage)
TOKEN_ID_DTYPES = (torch.int32, torch.int64)


def vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (Hugging Face `get_input_embeddings`, else the first nn.Embedding)."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = None
    if callable(getter):
        try:
            embedding = getter()
        except (NotImplementedError, AttributeError):
            embedding = None
    if embedding is None:
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    weight = getattr(embedding, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, Tensor) and weight.dim() == 2 else None


def learned_positions(model: nn.Module) -> int | None:
    """The number of positions of a model with learned absolute position embeddings (GPT-2, OPT, GPT-Neo: a longer
    sequence fails with an IndexError); None for rotary or relative positions, which have no hard limit."""
    inner = getattr(model, "model", model)
    config = getattr(inner, "config", None)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    for name, module in inner.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) and (last == "wpe" or "position" in last):
            return limit
    return None


def check_batches(model: nn.Module, batches: Sequence[Mapping[str, Tensor]], what: str) -> None:
    """Every batch has `input_ids` with at least one row, token ids inside the model's vocabulary, no more positions
    than the model's learned position embeddings, and integer `labels` of the same shape; `what` names the data in
    the message ("forget", "retain", "holdout")."""
    vocab = vocabulary_size(model)
    positions = learned_positions(model)
    for i, batch in enumerate(batches):
        where = f"{what} batch {i}"
        if not isinstance(batch, Mapping):
            raise UserInputError(f"{where} is a {type(batch).__name__}, not a dict of tensors; batches are dicts of "
                                 "input_ids, attention_mask and labels (use the data module or tokenize the texts)")
        if "input_ids" not in batch:  # a custom objective's inputs (e.g. "inputs"): only check it has rows
            first = next((v for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0), None)
            if first is not None and first.shape[0] == 0:
                raise UserInputError(f"{where} is empty (no rows); drop empty batches")
            continue
        ids = batch["input_ids"]
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise UserInputError(f"{where}: input_ids must be a 2-d tensor [batch, time], got "
                                 f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise UserInputError(f"{where} is empty (shape {tuple(ids.shape)}); drop empty batches (an empty file or "
                                 "split, or a filter that removed every example)")
        if ids.dtype not in TOKEN_ID_DTYPES:
            raise UserInputError(f"{where}: input_ids are {str(ids.dtype).replace('torch.', '')}; token ids are "
                                 "integers (torch.long): convert them with input_ids.long()")
        mask = batch.get("attention_mask")
        if isinstance(mask, Tensor) and mask.shape != ids.shape:
            raise UserInputError(f"{where}: attention_mask has shape {tuple(mask.shape)}, input_ids "
                                 f"{tuple(ids.shape)}; the mask marks each token of input_ids (1 real, 0 padding)")
        labels = batch.get("labels")
        if labels is None:
            raise UserInputError(f"{where} has input_ids but no labels: the losses are taken where labels != -100; "
                                 "set labels = input_ids with -100 at the padding and wherever no loss is wanted "
                                 "(the data module does this)")
        if isinstance(labels, Tensor) and labels.shape != ids.shape:
            raise UserInputError(f"{where}: labels have shape {tuple(labels.shape)}, input_ids {tuple(ids.shape)}; "
                                 "labels must align with input_ids (-100 where no loss is taken)")
        if isinstance(labels, Tensor) and labels.dtype != torch.long:
            raise UserInputError(f"{where}: labels are {str(labels.dtype).replace('torch.', '')}, the loss needs "
                                 "torch.long token ids (-100 where no loss is taken); convert them with "
                                 "labels.long()")
        if isinstance(labels, Tensor) and isinstance(mask, Tensor) and labels.shape == mask.shape:
            padded = int(((mask == 0) & (labels != IGNORE_INDEX)).sum())
            if padded:
                raise UserInputError(
                    f"{where} has {padded} labelled position(s) where attention_mask is 0: losses would be taken on "
                    "padding (and a row that is all padding would count as data); set labels[attention_mask == 0] "
                    "= -100")
        if positions is not None and ids.shape[1] > positions:
            raise UserInputError(
                f"{where} has sequences of {ids.shape[1]} tokens, but the model's position embeddings hold "
                f"{positions}; truncate the data to at most {positions} tokens (the data module's max_length)")
        if vocab is not None and ids.numel():
            top, bottom = int(ids.max()), int(ids.min())
            if bottom < 0:
                raise UserInputError(
                    f"{where} holds negative token ids (down to {bottom}): -100 marks positions without a loss in "
                    "labels, not in input_ids; pad input_ids with the tokenizer's pad (or eos) token id and mask the "
                    "padding with attention_mask")
            if top >= vocab:
                raise UserInputError(
                    f"{where} holds token ids outside the model's embedding (ids in [{bottom}, {top}], the embedding "
                    f"has {vocab} rows): the data was tokenised with another (larger) tokenizer than the model's; "
                    "use the model's own tokenizer (data.tokenizer = the model folder)")


def check_sets(model: nn.Module, sets: Mapping[str, Sequence[Mapping[str, Tensor]]],
               reduce: Callable[[Tensor], Tensor] | None = None) -> None:
    """`check_batches` on every named set of batches, then `check_labelled` and `check_forget_apart` on them all:
    what a run checks of its data before any pass over it."""
    for what, batches in sets.items():
        check_batches(model, batches, what)
    check_labelled(sets, reduce)
    check_forget_apart(sets, reduce)


def check_forget_apart(sets: Mapping[str, Sequence[Mapping[str, Tensor]]],
                       reduce: Callable[[Tensor], Tensor] | None = None) -> None:
    """Refuse retain data (the "retain" and "held retain" sets) that holds forget examples (the same token ids over
    the attended positions): the request would descend on what it ascends, and a budget read on forget examples
    stops it for forgetting. Counted over processes by `reduce`; the message gives counts, never the examples."""
    forget = set(example_keys(sets.get("forget", [])))
    names = [what for what in ("retain", "held retain") if what in sets]
    counts = []
    for what in names:
        keys = example_keys(sets[what])
        counts += [float(sum(k in forget for k in keys)), float(len(keys))]
    if not counts:
        return
    total = torch.tensor(counts, dtype=torch.float64)
    if reduce is not None:
        total = reduce(total)
    for i, what in enumerate(names):
        shared, size = int(total[2 * i]), int(total[2 * i + 1])
        if shared:
            raise UserInputError(
                f"{shared} of the {size} {what} examples are forget examples (the same token ids): a request would "
                "pull the model back towards what it is asked to forget; remove the forget examples from the retain "
                "data (the data module does this when it is given forget=...)")


class UnlabelledForgetRowsWarning(UserWarning):
    """Some forget rows have no label the loss reads: those examples are not unlearned."""


def scored_labels(batch: Mapping[str, Tensor]) -> Tensor:
    """The labels a causal LM's loss reads: a token batch's first position is never predicted (there is no token
    before it), so its labels are dropped; a custom objective's labels (no input_ids) are all read."""
    labels = batch["labels"]
    if isinstance(batch.get("input_ids"), Tensor) and labels.dim() == 2:
        return labels[:, 1:]
    return labels


def check_labelled(sets: Mapping[str, Sequence[Mapping[str, Tensor]]],
                   reduce: Callable[[Tensor], Tensor] | None = None) -> None:
    """Refuse a set of batches (forget, retain, holdout, ...) that has batches with `labels` but not one position
    with a label != -100 across them (summed over processes by `reduce`): nothing to forget, fit or measure there.
    Sets without `labels` (a custom objective's inputs) are not checked."""
    names, counts = [], []
    for what, batches in sets.items():
        labels = [scored_labels(b) for b in batches if isinstance(b, Mapping) and isinstance(b.get("labels"), Tensor)]
        names.append(what)
        counts += [float(sum(int((x != IGNORE_INDEX).sum()) for x in labels)), float(len(labels))]
    total = torch.tensor(counts, dtype=torch.float64)
    if reduce is not None:
        total = reduce(total)
    for i, what in enumerate(names):
        labelled, batches = float(total[2 * i]), float(total[2 * i + 1])
        if batches and not labelled:
            raise UserInputError(
                f"the {what} batches have no position with a label the loss reads (every label is -100, or only "
                "the first token of a row is labelled, which no position predicts): there is nothing to "
                f"{'forget' if what == 'forget' else 'measure'} on them; label the tokens that carry the data (the "
                "data module's span option labels a span, the default labels every token)")
    forget_labels = [scored_labels(b) for b in sets.get("forget", [])
                     if isinstance(b, Mapping) and isinstance(b.get("labels"), Tensor) and b["labels"].dim() == 2]
    unlabelled = sum(int((x == IGNORE_INDEX).all(dim=1).sum()) for x in forget_labels)
    if unlabelled:
        rows = sum(int(x.shape[0]) for x in forget_labels)
        warnings.warn(
            f"{unlabelled} of the {rows} forget rows have no label the loss reads (all -100, or only their first "
            "token): they are not unlearned; label their sensitive tokens (a span on a row's first token needs a "
            "token before it, e.g. the tokenizer's BOS)", UnlabelledForgetRowsWarning, stacklevel=3)


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every value of every tensor is finite (the check of a trial's weights and of a direction; a sharded
    tensor's on every process's shard, so that every process decides alike)."""
    return all(bool(whole(torch.isfinite(t).all())) for t in tensors)


def check_gradients_allowed(who: str) -> None:
    """Refuse a call under `torch.inference_mode()`: unlearning takes gradients, which inference mode forbids
    (`torch.no_grad()` is fine: the engine enables gradients where it takes them)."""
    if torch.is_inference_mode_enabled():
        raise UserInputError(f"{who} was called under torch.inference_mode(), where no gradient can be taken, and "
                             "unlearning needs gradients; call it outside the inference_mode block")


def check_materialised(model: nn.Module) -> None:
    """Refuse a model with parameters on the meta device (built under `init_empty_weights`, or a `device_map` that
    left them unloaded): they hold no values to unlearn, and every check after this one would fail inside torch."""
    empty = [name for name, param in model.named_parameters() if param.is_meta]
    if empty:
        raise UserInputError(
            f"{len(empty)} of the model's parameters are on the meta device (no values, e.g. {empty[0]!r}): the "
            "weights were never loaded (init_empty_weights, or a device_map that offloaded them); load the model "
            "with its weights on a real device (from_pretrained without device_map='meta', or load_state_dict)")


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model whose weights are not loaded (`check_materialised`) or hold NaN or inf, naming the first such
    parameter."""
    check_materialised(model)
    for name, param in model.named_parameters():
        if not bool(whole(torch.isfinite(param.detach()).all())):
            raise UserInputError(f"the model's weights are not finite (NaN or inf in {name!r}): unlearning cannot "
                                 "start from a broken model; load the checkpoint the model was trained to")


def check_keywords(cls: type, kwargs: Mapping[str, Any], what: str) -> None:
    """Refuse keyword arguments that no `__init__` in `cls`'s hierarchy accepts (a typo in `method_kwargs`), naming
    the unknown key and the valid ones."""
    valid: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        valid.update(n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break  # this __init__ passes nothing further up
    valid -= {"self", "model"}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise UserInputError(f"{what}: unknown setting {unknown[0]!r}; valid settings: {', '.join(sorted(valid))}")


def check_positive(name: str, value: float | None, *, allow_zero: bool = False) -> None:
    """A finite number > 0 (or >= 0), named in the message; None passes (not set)."""
    if value is None:
        return
    ok = _finite(value) and (float(value) >= 0 if allow_zero else float(value) > 0)
    if not ok:
        raise UserInputError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value}")


def check_share(name: str, value: float | None, hint: str = "") -> None:
    """A finite number in (0, 1], named in the message (with `hint`, what a value means); None passes (not set)."""
    if value is not None and not (_finite(value) and 0.0 < float(value) <= 1.0):
        raise UserInputError(f"{name} must lie in (0, 1]{hint}, got {value}")


def check_count(name: str, value: Any, *, minimum: int, none: str | None = None) -> None:
    """A whole number >= `minimum`; None passes when `none` says what it means."""
    if value is None and none is not None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        also = f" or None ({none})" if none is not None else ""
        raise UserInputError(f"{name} must be a whole number >= {minimum}{also}, got {value!r}")


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _check_forget_loss(value: str) -> None:
    from .losses import check_forget_loss

    try:
        check_forget_loss(value)
    except ValueError as err:
        raise UserInputError(str(err)) from None


def _check_forget_target(value: float) -> None:
    if not _finite(value):
        raise UserInputError(f"forget_target must be a finite number of nats or None, got {value}")


def _check_target_score(value: float) -> None:
    check_share("target_score", value, " (0.5: the forget set sits at the holdout's median)")


def _check_damping_growth(value: float) -> None:
    if not (_finite(value) and float(value) > 1):
        raise UserInputError(f"damping_growth must be > 1 (λ's factor after a rollback), got {value}")


#: the one check of each knob that a request, a driver or a method takes (None: not set, passes)
KNOB_CHECKS: dict[str, Callable[[Any], None]] = {
    "damping": lambda v: check_positive("damping", v),
    "scale": lambda v: check_positive("scale", v),
    "max_retain_increase": lambda v: check_positive("max_retain_increase", v, allow_zero=True),
    "max_step_norm": lambda v: check_positive("max_step_norm (the trust region: ‖Δθ‖ ≤ max_step_norm · ‖θ‖)", v),
    "predicted_trust": lambda v: check_positive("predicted_trust", v),
    "steps": lambda v: check_count("steps", v, minimum=1, none="the method's default"),
    "max_retries": lambda v: check_count("max_retries", v, minimum=0),
    "search_iters": lambda v: check_count("search_iters", v, minimum=0),
    "stall_ratio": lambda v: check_positive("stall_ratio", v),
    "final_budget_share": lambda v: check_share("final_budget_share", v),
    "final_repeats": lambda v: check_count("final_repeats", v, minimum=0),
    "refresh_every": lambda v: check_count("refresh_every", v, minimum=1, none="never"),
    "curvature_batches": lambda v: check_count("curvature_batches", v, minimum=1, none="all batches"),
    "holdout_batches": lambda v: check_count("holdout_batches", v, minimum=0,
                                             none="all batches; 0: no holdout target"),
    "damping_growth": _check_damping_growth,
    "target_score": _check_target_score,
    "forget_target": _check_forget_target,
    "forget_loss": _check_forget_loss,
}


def check_settings(**knobs: Any) -> None:
    """Check each knob given (None: not set) with its one check (`KNOB_CHECKS`), raising `UserInputError` naming
    it: the settings of a request, a driver's and a method's constructor all call this, so a value is refused the
    same way everywhere, before any work."""
    for name, value in knobs.items():
        if value is not None:
            KNOB_CHECKS[name](value)


def check_curvature_model(curvature: Any, model: nn.Module, what: str) -> None:
    """Refuse a `Curvature` bound to another model object (e.g. fitted before a `copy.deepcopy` of the model): its
    gradients and steps would go to that object's parameters, and this model would never move."""
    if curvature is not None and not any(curvature.model is m for m in model.modules()):
        raise UserInputError(
            f"{what} is a Curvature of another model object (e.g. fitted before a copy.deepcopy of the model); pass "
            "its state_dict() or a curvature file to a request, which loads them onto this model, or fit the curvature "
            "on this model")
