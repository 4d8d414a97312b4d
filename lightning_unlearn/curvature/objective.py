"""The loss in output space that curvature is measured for: where the positions are, the per-position
loss, label sampling (for the true Fisher) and the output-space Hessian (for GGN products and type-2 K-FAC).

Two objectives: `CrossEntropyObjective` (causal LM with the Hugging Face shift, or plain classification)
and `MSEObjective` (regression; K-FAC is exact for one linear layer under it, which the tests use).
The batch loss is always the *mean* of the per-position losses over valid positions; curvature backends
keep unnormalised sums plus the number of positions so that sums from several processes or batches add up.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def model_logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Run `model` on a batch and return its logits, whatever the model returns.

    Hugging Face models get `input_ids`/`attention_mask` as keywords; any other module gets the inputs
    positionally (`batch["input_ids"]`, or `batch["inputs"]` for non-token models). Outputs with a `.logits`
    attribute, tuples (first element) and plain tensors are accepted.
    """
    if "input_ids" in batch:
        inputs = batch["input_ids"]
    elif "inputs" in batch:
        inputs = batch["inputs"]
    else:
        raise KeyError("batch has neither 'input_ids' nor 'inputs'; give the model's inputs under one of these keys")
    if hasattr(model, "config") and "attention_mask" in batch:
        out = model(input_ids=inputs, attention_mask=batch["attention_mask"])
    elif hasattr(model, "config"):
        out = model(input_ids=inputs)
    else:
        out = model(inputs)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"model returned {type(out).__name__}; expected logits, a tuple or an object with .logits")
    return out


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
    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Targets drawn from the model's predictive distribution (for the Monte-Carlo / true Fisher)."""

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
    For non-sequence classifiers use `shift=False` with logits [B, C] and labels [B]."""

    name = "cross_entropy"

    def __init__(self, shift: bool = True) -> None:
        self.shift = shift

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
        return F.cross_entropy(outputs, targets, reduction="none")

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        probs = torch.softmax(outputs.detach().float(), dim=-1)
        if generator is not None and generator.device != probs.device:  # a CPU generator with a GPU model
            return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(outputs.device)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def hessian_vector(self, outputs: Tensor, vector: Tensor) -> Tensor:
        p = torch.softmax(outputs, dim=-1)
        return p * vector - p * (p * vector).sum(-1, keepdim=True)

    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        p = torch.softmax(outputs, dim=-1)
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

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # y ~ N(s, (C/2) I) makes E[g g^T] equal the output Hessian (2/C) I.
        c = outputs.shape[-1]
        device = generator.device if generator is not None else outputs.device  # a CPU generator with a GPU model
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype, device=device).to(outputs.device)
        return outputs.detach() + noise * (c / 2) ** 0.5

    def hessian_vector(self, outputs: Tensor, vector: Tensor) -> Tensor:
        return vector * (2.0 / outputs.shape[-1])

    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        n, c = outputs.shape
        eye = torch.eye(c, dtype=outputs.dtype, device=outputs.device) * (2.0 / c) ** 0.5
        return eye.expand(n, c, c)
