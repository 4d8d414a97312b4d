"""Extraction: how much of an example's scored span the model reproduces by greedy decoding.

Both metrics use one teacher-forced forward: greedy decoding from a prefix reproduces the rest exactly iff the
argmax prediction is right at every remaining position, so no generation loop is needed.

- `ExactMemorization` (Tirumala et al., 2022; open-unlearning `exact_memorization`): the fraction of scored tokens
  whose argmax prediction equals the label. Lower is better after unlearning.
- `ExtractionStrength` (Carlini et al., 2021; open-unlearning `extraction_strength`):
  `ES = 1 - k / L`, `L` the number of scored tokens and `k` the smallest prefix length of the span from which the
  remaining `L - k` tokens are generated exactly; `k = L` (ES = 0) when not even the last token is. (open-unlearning's
  loop leaves `k = L - 1` in that case, i.e. `1/L`; the definition gives 0.) Lower is better after unlearning.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_unlearn.metrics.functional import shift


def greedy_hits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(argmax prediction == label [B, T-1], mask of scored tokens)."""
    shifted, targets, mask = shift(logits, labels)
    return (shifted.argmax(-1) == targets) & mask, mask


def exact_memorization(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example fraction of scored tokens predicted exactly by argmax [B] (NaN without scored tokens)."""
    hits, mask = greedy_hits(logits, labels)
    n = mask.sum(-1)
    return torch.where(n > 0, hits.sum(-1).double() / n.clamp_min(1), float("nan"))


def extraction_strength(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example `1 - k/L` [B]: the length of the exactly predicted suffix of the scored span over `L`."""
    hits, mask = greedy_hits(logits, labels)
    n = mask.sum(-1)
    # a scored position breaks the suffix when it is missed; unscored positions are transparent
    miss = mask & ~hits
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last_miss = torch.where(miss, positions, -1).max(-1).values
    suffix = (mask & (positions > last_miss.unsqueeze(-1))).sum(-1)
    return torch.where(n > 0, suffix.double() / n.clamp_min(1), float("nan"))


class _PerExampleMean(Metric):
    """Mean of a per-example statistic; the per-example values are kept (`values()`) for reports."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("per_example", default=[], dist_reduce_fx="cat")

    @staticmethod
    def statistic(logits: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, logits: Tensor, labels: Tensor) -> None:
        self.per_example.append(self.statistic(logits, labels).to(self.device))

    def values(self) -> Tensor:
        """Per-example values [N] collected so far (empty before any update)."""
        if isinstance(self.per_example, list) and not self.per_example:
            return torch.empty(0, dtype=torch.float64, device=self.device)
        return dim_zero_cat(self.per_example)

    def compute(self) -> Tensor:
        """Mean over examples with scored tokens; NaN when there is none (no update yet), as the other metrics."""
        values = self.values().double()
        values = values[~torch.isnan(values)]
        return values.mean() if values.numel() else torch.tensor(float("nan"), dtype=torch.float64,
                                                                   device=self.device)


class ExactMemorization(_PerExampleMean):
    """Mean exact memorization (fraction of span tokens reproduced by argmax); lower is better after unlearning."""

    statistic = staticmethod(exact_memorization)


class ExtractionStrength(_PerExampleMean):
    """Mean extraction strength `1 - k/L`; lower is better after unlearning."""

    statistic = staticmethod(extraction_strength)
