"""The loss in output space that curvature is measured for: where the positions are, the per-position
loss, label sampling (for the true Fisher) and the output-space Hessian (for GGN products and type-2 K-FAC).

Two objectives: `CrossEntropyObjective` (causal LM with the Hugging Face shift, or plain classification)
and `MSEObjective` (regression; K-FAC is exact for one linear layer under it, which the tests use).
The batch loss is always the *mean* of the per-position losses over valid positions; curvature backends
keep unnormalised sums plus the number of positions so that sums from several processes or batches add up.

Sampled labels (the Monte-Carlo Fisher) are a function of `(seed, example, position in the example, draw)` only:
`position_keys` hashes each valid position to a 32-bit counter from the example's own tokens (padding excluded)
and its `example_id` when the batch carries one, and `sample_targets(outputs, keys=...)` turns counters into
labels by inverse-CDF sampling. So 1, 2 or N processes, any batch size and any order draw the same labels for
the same example, and the curvature does not depend on how the data was split.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserInputError
from .layers import unwrap_model

IGNORE_INDEX = -100
#: batch keys holding one stable id per example (the data module's collate writes `example_id`; < 0 = none)
EXAMPLE_ID_KEYS = ("example_id", "ids")
_M32 = 0xFFFFFFFF
#: rows × classes per chunk of the float64 inverse-CDF (bounds its temporary memory to 32 MiB)
_CDF_CHUNK = 1 << 22


# ---------------------------------------------------------------------------------------------- counter hashing
def _mul32(x: Tensor, c: int) -> Tensor:
    """`(x * c) mod 2^32` for int64 `x` in [0, 2^32), without int64 overflow (split in 16-bit halves)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * (c & 0xFFFF)) & 0xFFFF) << 16)) & _M32


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of each element of an int64 tensor (taken mod 2^32).

    Pure integer arithmetic: the same result on every device, process and batch layout."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _combine(h: Tensor, v: Tensor | int) -> Tensor:
    """Hash of the pair (h, v), order-sensitive."""
    return mix32(h ^ mix32(v + 0x9E3779B9 if isinstance(v, int) else (v & _M32) + 0x9E3779B9))


def _as_int64(x: Tensor) -> Tensor:
    """Integer tokens as they are; floating inputs by their float32 bit pattern (stable hashing of any input)."""
    if x.is_floating_point() or x.is_complex():
        return x.detach().float().contiguous().view(torch.int32).to(torch.int64) & _M32
    return x.detach().to(torch.int64)


def example_keys(batch: Mapping[str, Tensor]) -> Tensor:
    """One 32-bit key per example (batch row), the same whichever process, batch or order sees the example.

    The key hashes the example's tokens at attended positions (`attention_mask`, so the padding width and side of
    the batch do not matter), each with its index among them, and the example's `example_id` when the batch has
    one (>= 0; packed blocks carry -1). Ids alone could collide across sources (a retain file numbered from 0 next
    to a forget file numbered from 0); tokens alone cannot tell apart two copies of a text with different ids.
    """
    inputs = batch["input_ids"] if "input_ids" in batch else batch["inputs"]
    b = inputs.shape[0]
    tokens = _as_int64(inputs).reshape(b, -1)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    mask = batch.get("attention_mask")
    if isinstance(mask, Tensor) and mask.shape[0] == b and tokens.shape[1] % max(mask[0].numel(), 1) == 0:
        per = tokens.shape[1] // max(mask[0].numel(), 1)  # features per attended position
        valid = mask.reshape(b, -1).bool().repeat_interleave(per, dim=1)
    index = valid.long().cumsum(1) - 1
    h = _combine(mix32(tokens), index)
    h = torch.where(valid, h, torch.zeros_like(h)).sum(1) & _M32  # < 2^63: at most 2^31 terms of < 2^32
    key = _combine(h, valid.sum(1))
    for name in EXAMPLE_ID_KEYS:
        ids = batch.get(name)
        if isinstance(ids, Tensor) and ids.dim() == 1 and ids.shape[0] == b and not ids.is_floating_point():
            ids = ids.to(device=key.device, dtype=torch.int64)
            with_id = _combine(_combine(key, ids & _M32), (ids >> 32) & _M32)
            key = torch.where(ids >= 0, with_id, key)
            break
    return key


def position_in_example(batch: Mapping[str, Tensor], mask: Tensor) -> Tensor:
    """For `mask` over `logits.shape[:-1]` (dim 0 = example), each entry's index within its example, counted over
    attended positions when `attention_mask` matches the mask's layout (so left or right padding does not shift it)."""
    if mask.dim() == 1:
        return torch.zeros_like(mask, dtype=torch.int64)
    b = mask.shape[0]
    att = batch.get("attention_mask")
    if isinstance(att, Tensor) and att.numel() == mask.numel():
        index = att.reshape(b, -1).to(device=mask.device, dtype=torch.int64).cumsum(1) - 1
    else:
        index = torch.arange(mask[0].numel(), device=mask.device).expand(b, -1)
    return index.reshape(mask.shape)


def position_keys(batch: Mapping[str, Tensor], mask: Tensor, seed: int, draw: int = 0) -> Tensor:
    """[N] 32-bit counters, one per valid position of `mask` (in `logits[mask]` order): a function of `seed`, the
    example (`example_keys`), the position within it and the draw `draw` only. Feed them to
    `Objective.sample_targets(outputs, keys=...)`."""
    seed = int(seed)
    keys = example_keys(batch).to(mask.device)
    rows = mask.nonzero()[:, 0]
    pos = position_in_example(batch, mask)[mask]
    h = _combine(mix32(torch.full_like(pos, seed & _M32)), (seed >> 32) & _M32)
    h = _combine(_combine(h, int(draw) & _M32), keys[rows])
    return _combine(h, pos)


def uniforms(keys: Tensor, stream: int = 0) -> Tensor:
    """A float64 uniform in (0, 1) per counter (48 random bits), for stream `stream` of the counter."""
    h1 = _combine(_combine(keys, 2 * stream + 1), 0x5BD1E995)
    h2 = _combine(_combine(keys, 2 * stream + 2), 0x1B873593)
    bits = (h1 >> 8) * (1 << 24) + (h2 >> 8)
    return (bits.double() + 0.5) / float(1 << 48)


class LogitsFormError(UserInputError, TypeError):
    """The model's output holds no logits in a form `model_logits` reads (also a `TypeError`, what this was before,
    for callers that catch it to add their own advice)."""


#: how a module's forward takes the batch, by forward function and input key (see `_call_plan`)
_CALL_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _CallPlan:
    """How `model_logits` calls a module without `.config`: the inputs by keyword (a keyword-only parameter of the
    batch key's name) or positionally, and whether its forward takes `attention_mask` ("no", "optional",
    "required")."""

    by_keyword: bool = False
    mask: str = "no"


def _call_plan(model: Any, key: str) -> _CallPlan:
    """Read the forward's signature once per forward function (cached): a module that takes `attention_mask` gets it,
    a keyword-only `input_ids` is passed by keyword. Wrappers (DDP, `torch.compile`, the functional call of CG) are
    looked through to the module whose forward runs."""
    owner = model if isinstance(model, nn.Module) else getattr(model, "module", model)
    owner = unwrap_model(owner) if isinstance(owner, nn.Module) else owner
    forward = getattr(owner, "forward", None)
    func = getattr(forward, "__func__", forward)
    try:
        cached = _CALL_PLANS.get(func, {})
    except TypeError:  # not weak-referenceable: read it each time
        cached = {}
    if key in cached:
        return cached[key]
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # no readable signature: the plain call
        return _CallPlan()
    given = params.get(key)
    mask = params.get("attention_mask")
    if mask is None or mask.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY,
                                     inspect.Parameter.VAR_KEYWORD):
        takes_mask = "no"
    else:
        takes_mask = "required" if mask.default is inspect.Parameter.empty else "optional"
    plan = _CallPlan(by_keyword=given is not None and given.kind is inspect.Parameter.KEYWORD_ONLY, mask=takes_mask)
    with contextlib.suppress(TypeError):
        _CALL_PLANS.setdefault(func, {})[key] = plan
    return plan


#: Hugging Face head classes that are no causal LM: a masked LM sees the token it predicts (its next-token loss means
#: nothing), the others give no logits over the vocabulary per position
NOT_CAUSAL_HEADS = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                    "ForMultipleChoice")


def check_causal_lm(model: Any) -> None:
    """Raise `UserInputError` for a Hugging Face encoder-decoder model (`config.is_encoder_decoder`, e.g. T5, BART):
    its logits need decoder inputs and do not predict the next token of `input_ids`, so unlearning it as a causal LM
    would be meaningless; and for a model whose class is a masked-LM or task head (`NOT_CAUSAL_HEADS`: a BERT masked
    LM was unlearned to "target_reached" after 0 steps). Other modules pass (anything mapping `input_ids` to next-token
    logits is fine)."""
    config = getattr(model, "config", None)
    owner = getattr(model, "module", model)
    head = next((h for h in NOT_CAUSAL_HEADS if type(owner).__name__.endswith(h)), None)
    if config is not None and head is not None:
        raise UserInputError(
            f"{type(owner).__name__} is not a causal language model (a {head[3:]} head): lightning_unlearn unlearns "
            "causal language models, whose logits at position t predict token t+1 of input_ids; load the model with "
            "AutoModelForCausalLM (GPT-2, Llama, Qwen2, ...)")
    if config is not None and getattr(config, "is_encoder_decoder", False) is True:
        raise UserInputError(
            f"{type(owner).__name__} is an encoder-decoder model (config.is_encoder_decoder=True, like T5 or BART); "
            "lightning_unlearn unlearns causal language models, whose logits at position t predict token t+1 of "
            "input_ids: load a decoder-only model with AutoModelForCausalLM (GPT-2, Llama, Qwen2, ...)"
        )


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _logits_of(out: Any, key: str) -> Tensor:
    """The logits in whatever the model returned: a tensor, an object with `.logits` (Hugging Face), a mapping with
    "logits", or a tuple/list with the logits first."""
    expected = "logits [batch, time, vocab]" if key == "input_ids" else "outputs [..., classes]"
    forms = ("return the logits as a tensor, a tuple with the logits first, a dict with 'logits' or an object with "
             ".logits")
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, Mapping):
        if "logits" not in out:
            raise LogitsFormError(f"the model returned a {type(out).__name__} without a 'logits' entry (keys "
                                 f"{list(out)[:5]}); expected {expected}: {forms}")
        out = out["logits"]
    elif isinstance(out, (tuple, list)):
        first = out[0] if len(out) else None
        if not isinstance(first, Tensor) or first.dim() < (2 if key == "input_ids" else 1):
            shapes = ", ".join(_describe(v) for v in list(out)[:3])
            raise LogitsFormError(
                f"the model returned a {type(out).__name__} whose first element is {_describe(first)} ({shapes}); "
                f"expected {expected} first, the order of a Hugging Face model called without labels (logits, "
                "past_key_values, ...); (loss, logits, ...) is its order with labels: return the logits first, or a "
                "dict with 'logits' / an object with .logits"
            )
        out = first
    if not isinstance(out, Tensor):
        raise LogitsFormError(f"the model returned {_describe(out)}; expected {expected}: {forms}")
    if out.dim() == 0:
        raise LogitsFormError(f"the model returned a scalar (a loss?) where {expected} were expected: {forms}")
    return out


def model_logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Run `model` on a batch and return its logits, whatever the model returns.

    Hugging Face models (with `.config`) get `input_ids`/`attention_mask` as keywords (an encoder-decoder one is
    refused: `check_causal_lm`); any other module gets the inputs (`batch["input_ids"]`, or `batch["inputs"]` for
    non-token models) positionally, or by keyword when its forward takes them keyword-only, and `attention_mask` when
    its forward has such a parameter (all ones when the batch has none and the forward requires it). Outputs: a
    tensor, an object with `.logits`, a mapping with "logits", or a tuple/list with the logits first.
    """
    if "input_ids" in batch:
        key = "input_ids"
    elif "inputs" in batch:
        key = "inputs"
    else:
        raise KeyError("batch has neither 'input_ids' nor 'inputs'; give the model's inputs under one of these keys")
    inputs = batch[key]
    if hasattr(model, "config"):
        check_causal_lm(model)
        if "attention_mask" in batch:
            out = model(input_ids=inputs, attention_mask=batch["attention_mask"])
        else:
            out = model(input_ids=inputs)
        return _logits_of(out, key)
    plan = _call_plan(model, key)
    kwargs: dict[str, Tensor] = {}
    if plan.mask != "no":
        mask = batch.get("attention_mask")
        if mask is None and plan.mask == "required":
            mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)  # no padding: all real
        if mask is not None:
            kwargs["attention_mask"] = mask
    out = model(**{key: inputs}, **kwargs) if plan.by_keyword else model(inputs, **kwargs)
    return _logits_of(out, key)


@dataclass
class Positions:
    """The valid positions of a batch, flattened: `outputs` [N, C] (still attached to the graph),
    `targets` [N] (class ids) or [N, C] (regression), and `mask` over `logits.shape[:-1]` (True = counted)."""

    outputs: Tensor
    targets: Tensor
    mask: Tensor

    @property
    def count(self) -> int:
        return int(self.outputs.shape[0])

    @property
    def example_index(self) -> Tensor:
        """For each valid position, the index of its example (the batch row it came from)."""
        return self.mask.nonzero()[:, 0]


class Objective(ABC):
    """A loss `L = mean_n l(s_n, y_n)` over the valid positions n of a batch, s_n the model outputs."""

    name: str = "objective"

    @abstractmethod
    def positions(self, logits: Tensor, batch: Mapping[str, Tensor]) -> Positions:
        """Select and flatten the valid positions of `logits` and their targets."""

    @abstractmethod
    def per_position_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """l(s_n, y_n) for each row of `outputs` [N, C]; returns [N]."""

    @abstractmethod
    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None, *,
                       keys: Tensor | None = None) -> Tensor:
        """Targets drawn from the model's predictive distribution (for the Monte-Carlo / true Fisher).

        With `keys` (one counter per row, see `position_keys`) the draw is a function of the counters and the
        outputs only (deterministic whatever the batching); otherwise it uses `generator`."""

    @abstractmethod
    def hessian_vector(self, outputs: Tensor, vector: Tensor) -> Tensor:
        """Per-position output Hessian d^2 l / ds^2 times `vector` [N, C] -> [N, C]."""

    @abstractmethod
    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        """S [N, C, K] with S S^T = d^2 l / ds^2 per position (type-2 Fisher; only for small C)."""

    def loss(self, logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """The mean loss over valid positions (0 when none is valid)."""
        pos = self.positions(logits, batch)
        if pos.count == 0:
            return logits.sum() * 0.0
        return self.per_position_loss(pos.outputs, pos.targets).mean()


class CrossEntropyObjective(Objective):
    """Token cross-entropy. With `shift=True` (causal LM, Hugging Face convention) logits at t predict
    `labels[t + 1]`; labels equal to -100 (padding, text outside a forget span) are not counted.
    For non-sequence classifiers use `shift=False` with logits [B, C] and labels [B].

    `temperature=T > 1` measures the curvature of the *softened* predictions `q = softmax(z / T)` (the per-position
    loss is `T · CE(z / T, y)`, labels are sampled from `q`, and the output Hessian and the Fisher are both
    `diag(q) - q qᵀ`): the second-order term of a KL constraint between softened outputs, as in distillation.
    Why: on memorised data `p → one-hot` and `diag(p) - p pᵀ → 0`, so the plain Fisher/GGN does not see the
    directions that memorised retain knowledge depends on until the loss has already jumped; softened predictions
    keep them visible. `T = 1` is the plain cross-entropy."""

    name = "cross_entropy"

    def __init__(self, shift: bool = True, temperature: float = 1.0) -> None:
        if not (math.isfinite(float(temperature)) and float(temperature) > 0):
            raise ValueError(f"temperature must be a finite number > 0 (1: the plain cross-entropy), got {temperature}")
        self.shift = shift
        self.temperature = float(temperature)

    def valid_mask(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(mask over logits.shape[:-1], aligned targets of the same shape)."""
        if self.shift:
            if labels.shape != logits.shape[:-1]:
                raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape[:-1])}")
            targets = torch.full_like(labels, IGNORE_INDEX)
            targets[..., :-1] = labels[..., 1:]
        else:
            targets = labels
        return targets != IGNORE_INDEX, targets

    def positions(self, logits: Tensor, batch: Mapping[str, Tensor]) -> Positions:
        if "labels" not in batch:
            raise KeyError("batch has no 'labels'; causal LM batches need labels (use -100 where no loss is wanted)")
        mask, targets = self.valid_mask(logits, batch["labels"])
        return Positions(outputs=logits[mask], targets=targets[mask], mask=mask)

    def per_position_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        t = self.temperature
        if t == 1.0:
            return F.cross_entropy(outputs, targets, reduction="none")
        return t * F.cross_entropy(outputs / t, targets, reduction="none")

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None, *,
                       keys: Tensor | None = None) -> Tensor:
        probs = torch.softmax(outputs.detach().float() / self.temperature, dim=-1)
        if keys is not None:
            return inverse_cdf(probs, uniforms(keys.to(probs.device)))
        if generator is not None and generator.device != probs.device:  # a CPU generator with a GPU model
            return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(outputs.device)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def hessian_vector(self, outputs: Tensor, vector: Tensor) -> Tensor:
        """`(diag(q) - q qᵀ) v`, q the (softened) predictions: the output Hessian of `T · CE(z / T, y)` times T,
        so that it equals the Fisher of the sampled labels (the two agree at T = 1)."""
        p = torch.softmax(outputs / self.temperature, dim=-1)
        return p * vector - p * (p * vector).sum(-1, keepdim=True)

    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        p = torch.softmax(outputs / self.temperature, dim=-1)
        sq = p.sqrt()
        # (diag(p) - p p^T) = (diag(sqrt p) - p sqrt(p)^T)(diag(sqrt p) - p sqrt(p)^T)^T since sum(p) = 1
        return torch.diag_embed(sq) - p.unsqueeze(-1) * sq.unsqueeze(-2)


class MSEObjective(Objective):
    """Mean squared error `l_n = (1/C) ||s_n - y_n||^2` (so the batch loss equals `F.mse_loss(..., "mean")`).
    Batches hold `labels` [..., C]; every position counts."""

    name = "mse"

    def positions(self, logits: Tensor, batch: Mapping[str, Tensor]) -> Positions:
        if "labels" not in batch:
            raise KeyError("batch has no 'labels'; MSE needs regression targets of the logits' shape")
        targets = batch["labels"]
        if targets.shape != logits.shape:
            raise ValueError(f"labels {tuple(targets.shape)} do not match outputs {tuple(logits.shape)}")
        mask = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
        c = logits.shape[-1]
        return Positions(outputs=logits.reshape(-1, c), targets=targets.reshape(-1, c), mask=mask)

    def per_position_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return (outputs - targets).pow(2).mean(-1)

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None, *,
                       keys: Tensor | None = None) -> Tensor:
        # y ~ N(s, (C/2) I) makes E[g g^T] equal the output Hessian (2/C) I.
        c = outputs.shape[-1]
        if keys is not None:  # Box-Muller on two counter streams per class
            k = keys.to(outputs.device)[:, None] * c + torch.arange(c, device=outputs.device)  # < 2^63
            k = mix32(k) ^ mix32(k >> 32)
            z = torch.sqrt(-2 * torch.log(uniforms(k, 0))) * torch.cos(2 * math.pi * uniforms(k, 1))
            return outputs.detach() + z.to(outputs.dtype) * (c / 2) ** 0.5
        device = generator.device if generator is not None else outputs.device  # a CPU generator with a GPU model
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype, device=device).to(outputs.device)
        return outputs.detach() + noise * (c / 2) ** 0.5

    def hessian_vector(self, outputs: Tensor, vector: Tensor) -> Tensor:
        return vector * (2.0 / outputs.shape[-1])

    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        n, c = outputs.shape
        eye = torch.eye(c, dtype=outputs.dtype, device=outputs.device) * (2.0 / c) ** 0.5
        return eye.expand(n, c, c)


def inverse_cdf(probs: Tensor, u: Tensor, block: int = 256) -> Tensor:
    """Class index per row of `probs` [N, C] (unnormalised is fine) with `u` [N] in (0, 1): the first class whose
    cumulative probability reaches `u` × the row's total.

    Two levels, so that the cost stays near one pass over `probs` (a float64 cumulative sum over a 50k vocabulary
    costs several softmaxes): float64 sums of blocks of `block` classes pick the block, then a float64 cumulative
    sum inside that block picks the class. Rows are processed in chunks to bound temporary memory.
    """
    n, c = probs.shape
    out = torch.empty(n, dtype=torch.int64, device=probs.device)
    full = (c // block) * block
    offsets = torch.arange(block, device=probs.device)
    step = max(1, _CDF_CHUNK // max(c, 1))
    for i in range(0, n, step):
        p = probs[i:i + step]
        sums = [p[:, :full].view(p.shape[0], -1, block).sum(-1, dtype=torch.float64)] if full else []
        if full < c:
            sums.append(p[:, full:].sum(-1, keepdim=True, dtype=torch.float64))
        block_sums = torch.cat(sums, dim=1)  # [m, blocks]
        block_cdf = block_sums.cumsum(-1)
        target = u[i:i + step, None].to(device=p.device, dtype=torch.float64) * block_cdf[:, -1:]
        b = torch.searchsorted(block_cdf, target).clamp_max(block_cdf.shape[1] - 1)  # [m, 1]
        rest = target - (block_cdf.gather(1, b) - block_sums.gather(1, b))
        cols = b * block + offsets  # [m, block]
        inside = p.gather(1, cols.clamp_max(c - 1)).double().masked_fill(cols >= c, 0.0).cumsum(-1)
        j = torch.searchsorted(inside, rest).clamp_max(block - 1)
        out[i:i + step] = (b * block + j).squeeze(-1).clamp_max(c - 1)
    return out
