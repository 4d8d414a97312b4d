"""Truth ratio (TOFU, Maini et al., 2024; open-unlearning `truth_ratio`): is a wrong answer as likely as a right one?

Per question, with `P(a) = exp(-mean token NLL of answer a)` (a length-normalised probability):

    r = P(wrong) / P(correct),    P(wrong) = exp(-mean_j loss_j)  (the geometric mean over the perturbed answers)

computed as open-unlearning does, `exp(-mean_j loss_j) / (exp(-loss_correct) + 1e-10)`. The "correct" answer is the
paraphrased answer on the forget and retain sets and the answer itself on real authors and world facts.

Aggregations over questions (items with a NaN ratio, i.e. an answer without scored tokens, are left out):
- `closer_to_1_better`: `mean(min(r, 1 / (r + 1e-10)))`. Forget set: after unlearning the model should find right
  and wrong answers alike (1 = indistinguishable). This is TOFU's "Truth Ratio" of the forget set.
- `true_better`: `mean(max(0, 1 - r))`. Retain, real authors, world facts: the right answer should win (higher is
  better); one of the nine components of model utility.

The per-item ratios `r` of the forget set are what forget quality compares (`forget_quality`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

Aggregation = Literal["closer_to_1_better", "true_better"]
AGGREGATIONS: tuple[str, ...] = ("closer_to_1_better", "true_better")
EPS = 1e-10  # open-unlearning's guard against division by zero


def _as_losses(correct_loss: Tensor, wrong_losses: Tensor) -> tuple[Tensor, Tensor]:
    correct = torch.as_tensor(correct_loss, dtype=torch.float64).reshape(-1)
    wrong = torch.as_tensor(wrong_losses, dtype=torch.float64, device=correct.device)
    if wrong.dim() == 1:
        wrong = wrong.unsqueeze(-1)
    if wrong.dim() != 2 or wrong.shape[0] != correct.numel():
        raise ValueError(f"wrong_losses must be [N] or [N, K] for N={correct.numel()} correct losses, got shape "
                         f"{tuple(wrong.shape)}")
    return correct, wrong


def truth_ratios(correct_loss: Tensor, wrong_losses: Tensor) -> Tensor:
    """Per-item truth ratios [N] (float64) from mean answer NLLs: `correct_loss` [N], `wrong_losses` [N, K].

    NaN entries of `wrong_losses` pad rows with fewer perturbed answers and are skipped; an item whose correct loss
    (or every wrong loss) is NaN gets a NaN ratio.
    """
    correct, wrong = _as_losses(correct_loss, wrong_losses)
    wrong_mean = wrong.nanmean(dim=-1)  # mean of the avg losses = log of the geometric mean of probabilities
    return torch.exp(-wrong_mean) / (torch.exp(-correct) + EPS)


def aggregate_truth_ratios(ratios: Tensor, aggregation: Aggregation = "closer_to_1_better") -> Tensor:
    """Aggregate per-item ratios: `closer_to_1_better` (forget) or `true_better` (retain, real authors, world facts)."""
    r = torch.as_tensor(ratios, dtype=torch.float64).reshape(-1)
    r = r[~torch.isnan(r)]
    if aggregation == "closer_to_1_better":
        values = torch.minimum(r, 1.0 / (r + EPS))
    elif aggregation == "true_better":
        values = torch.clamp(1.0 - r, min=0.0)
    else:
        raise ValueError(f"unknown truth ratio aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    return values.mean() if values.numel() else torch.tensor(float("nan"), dtype=torch.float64)


def _truth_ratio_update(correct_loss: Tensor, wrong_losses: Tensor) -> Tensor:
    return truth_ratios(correct_loss, wrong_losses)


def _truth_ratio_compute(ratios: Tensor, aggregation: Aggregation) -> Tensor:
    return aggregate_truth_ratios(ratios, aggregation)


def truth_ratio(correct_loss: Tensor, wrong_losses: Tensor,
                aggregation: Aggregation = "closer_to_1_better") -> Tensor:
    """The aggregated truth ratio of a set of questions (see the module docstring)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown truth ratio aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    return _truth_ratio_compute(_truth_ratio_update(correct_loss, wrong_losses), aggregation)


class TruthRatio(Metric):
    """`update(correct_loss [B], wrong_losses [B, K])` with mean answer NLLs; `compute()` aggregates; `values()` gives
    the per-item ratios (the input of forget quality)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, aggregation: Aggregation = "closer_to_1_better", **kwargs) -> None:
        super().__init__(**kwargs)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown truth ratio aggregation {aggregation!r}; choose one of "
                             f"{', '.join(AGGREGATIONS)}")
        self.aggregation = aggregation
        self.add_state("ratios", default=[], dist_reduce_fx="cat")

    def update(self, correct_loss: Tensor, wrong_losses: Tensor) -> None:
        self.ratios.append(_truth_ratio_update(correct_loss, wrong_losses).to(self.device))

    def values(self) -> Tensor:
        """Per-item truth ratios [N] collected so far (NaN kept)."""
        if isinstance(self.ratios, list) and not self.ratios:
            return torch.empty(0, dtype=torch.float64, device=self.device)
        return dim_zero_cat(self.ratios)

    def compute(self) -> Tensor:
        return _truth_ratio_compute(self.values(), self.aggregation)
