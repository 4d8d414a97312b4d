"""Per-token and per-example quantities shared by the metrics (HF shift: logits at t predict labels at t+1)."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100


def model_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
    """Logits [B, T, V] of an HF causal LM (output with `.logits`) or of a plain module returning a tensor.

    Keyword arguments (the attention mask, a KV cache) are passed only when the module's forward accepts them.
    """
    return forward_output(model, input_ids, attention_mask=attention_mask, **kwargs)[0]


def forward_output(model: nn.Module, input_ids: Tensor, **kwargs) -> tuple[Tensor, object]:
    """(logits [B, T, V], the raw output) with only the keyword arguments the forward accepts (None ones dropped)."""
    params = inspect.signature(model.forward).parameters
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kw = {k: v for k, v in kwargs.items() if v is not None and (open_kwargs or k in params)}
    out = model(input_ids, **kw)
    logits = out if isinstance(out, Tensor) else out.logits
    if logits.dim() != 3:
        raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}; expected [batch, time, vocab]")
    return logits, out


def shift(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Align logits with next-token labels: (logits [B, T-1, V], targets [B, T-1], mask [B, T-1] of scored tokens)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [batch, time]")
    shifted_logits = logits[:, :-1]
    targets = labels[:, 1:]
    return shifted_logits, targets, targets != IGNORE_INDEX


def token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probabilities of each shifted label (0 where ignored), the log-softmax, the mask of scored tokens."""
    shifted, targets, mask = shift(logits, labels)
    logp = torch.log_softmax(shifted.float(), dim=-1)
    lp = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return lp.masked_fill(~mask, 0.0), logp, mask


def example_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean token negative log-likelihood per example [B] (NaN for an example with no scored token)."""
    lp, _, mask = token_logprobs(logits, labels)
    count = mask.sum(-1)
    return -lp.sum(-1) / count.clamp_min(1) + torch.where(count > 0, 0.0, float("nan"))


def lowest_k_mean(values: Tensor, mask: Tensor, k: float) -> Tensor:
    """Mean of the lowest `max(1, int(n * k))` masked values per row, n the row's number of valid values (MIN-K%)."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be a fraction in (0, 1], got {k}; pass 0.4 for Min-40%")
    n = mask.sum(-1)
    num_k = torch.clamp((n.double() * k).floor().long(), min=1)
    ordered = values.double().masked_fill(~mask, float("inf")).sort(dim=-1).values
    take = torch.arange(values.shape[-1], device=values.device).unsqueeze(0) < num_k.unsqueeze(-1)
    mean = ordered.masked_fill(~take, 0.0).sum(-1) / num_k
    return torch.where(n > 0, mean, torch.full_like(mean, float("nan")))
