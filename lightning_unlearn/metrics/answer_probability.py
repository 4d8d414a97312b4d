"""Answer probability (TOFU "Prob."; open-unlearning `probability` and `probability_w_options`).

- Plain: `mean_i exp(-loss_i)`, `loss_i` the mean token NLL of item i's answer (a length-normalised probability).
  TOFU reports it on the forget and retain sets.
- Normalised: `mean_i P(correct_i) / (P(correct_i) + sum_j P(wrong_ij) + 1e-10)`, each P = exp(-mean token NLL).
  Real authors and world facts have short factual answers that a general model may find unlikely whatever it knows,
  so their probability is measured against the perturbed (wrong) answers. NaN entries of `wrong_losses` pad rows with
  fewer perturbed answers and are skipped; items with a NaN correct loss are left out (as open-unlearning drops
  items without scored tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

EPS = 1e-10  # open-unlearning's guard against division by zero


def _finite_sum_count(values: Tensor) -> tuple[Tensor, Tensor]:
    keep = ~torch.isnan(values)
    return values[keep].sum(), keep.sum().to(torch.float64)


def _answer_probability_update(losses: Tensor) -> tuple[Tensor, Tensor]:
    probs = torch.exp(-torch.as_tensor(losses, dtype=torch.float64).reshape(-1))
    return _finite_sum_count(probs)


def normalised_probabilities(correct_loss: Tensor, wrong_losses: Tensor) -> Tensor:
    """Per-item `P(correct) / (P(correct) + sum_j P(wrong_j) + 1e-10)` [N] from mean answer NLLs."""
    correct = torch.as_tensor(correct_loss, dtype=torch.float64).reshape(-1)
    wrong = torch.as_tensor(wrong_losses, dtype=torch.float64, device=correct.device)
    if wrong.dim() == 1:
        wrong = wrong.unsqueeze(-1)
    if wrong.dim() != 2 or wrong.shape[0] != correct.numel():
        raise ValueError(f"wrong_losses must be [N] or [N, K] for N={correct.numel()} correct losses, got shape "
                         f"{tuple(wrong.shape)}")
    p_correct = torch.exp(-correct)
    p_wrong = torch.exp(-wrong).nansum(-1)
    out = p_correct / (p_correct + p_wrong + EPS)
    return torch.where(torch.isnan(wrong).all(-1), torch.full_like(out, float("nan")), out)


def _normalised_answer_probability_update(correct_loss: Tensor, wrong_losses: Tensor) -> tuple[Tensor, Tensor]:
    return _finite_sum_count(normalised_probabilities(correct_loss, wrong_losses))


def _answer_probability_compute(total: Tensor, count: Tensor) -> Tensor:
    return total / count if count > 0 else torch.tensor(float("nan"), dtype=torch.float64)


def answer_probability(losses: Tensor) -> Tensor:
    """Mean `exp(-loss)` over items, `losses` [N] the mean token NLLs of the answers."""
    return _answer_probability_compute(*_answer_probability_update(losses))


def normalised_answer_probability(correct_loss: Tensor, wrong_losses: Tensor) -> Tensor:
    """Mean normalised probability of the correct answer against its perturbed answers ([N] and [N, K] NLLs)."""
    return _answer_probability_compute(*_normalised_answer_probability_update(correct_loss, wrong_losses))


class _MeanOfItems(Metric):
    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, total: Tensor, count: Tensor) -> None:
        self.total += total.to(self.total)
        self.count += count.to(self.count)

    def compute(self) -> Tensor:
        return _answer_probability_compute(self.total, self.count)


class AnswerProbability(_MeanOfItems):
    """`update(losses [B])` with mean answer NLLs; `compute()` is the mean of `exp(-loss)`."""

    def update(self, losses: Tensor) -> None:
        self._add(*_answer_probability_update(losses))


class NormalisedAnswerProbability(_MeanOfItems):
    """`update(correct_loss [B], wrong_losses [B, K])`; `compute()` is the mean normalised probability."""

    def update(self, correct_loss: Tensor, wrong_losses: Tensor) -> None:
        self._add(*_normalised_answer_probability_update(correct_loss, wrong_losses))
