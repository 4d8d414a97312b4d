"""ROUGE-L recall of generated answers against reference answers (TOFU "ROUGE"; open-unlearning `rouge`).

`recall = LCS(generated, reference) / len(reference)` over tokens, the tokenisation of Google's `rouge-score`
package that TOFU and open-unlearning call (`RougeScorer(["rougeL"], use_stemmer=True).score(reference, generated)`):
lower-case, every run of characters other than `a-z0-9` is a separator, Porter-stem words longer than 3 characters.
torchmetrics' `rouge_score(..., use_stemmer=True)` implements exactly that (same normaliser, nltk's Porter stemmer,
same LCS), so it is used here; the stemmer needs `nltk`. Recall, not F1: a model that answers with extra words is
not penalised, one that leaves out the reference's words is. An empty reference scores 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.text import rouge_score


def _as_list(texts: str | Sequence[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def rouge_l_recall_scores(preds: str | Sequence[str], target: str | Sequence[str]) -> Tensor:
    """Per-item ROUGE-L recall [N] (float64) of each generated text `preds[i]` against its reference `target[i]`."""
    preds, target = _as_list(preds), _as_list(target)
    if len(preds) != len(target):
        raise ValueError(f"got {len(preds)} generated texts for {len(target)} references")
    try:
        scores = [float(rouge_score(p, t, rouge_keys="rougeL", use_stemmer=True)["rougeL_recall"])
                  for p, t in zip(preds, target)]
    except ModuleNotFoundError as err:  # torchmetrics' stemmer needs nltk
        raise ModuleNotFoundError("ROUGE with the Porter stemmer (as TOFU computes it) needs nltk: pip install "
                                  "nltk") from err
    return torch.tensor(scores, dtype=torch.float64)


def _rouge_l_recall_update(preds: str | Sequence[str], target: str | Sequence[str]) -> tuple[Tensor, Tensor]:
    scores = rouge_l_recall_scores(preds, target)
    return scores.sum(), torch.tensor(float(scores.numel()), dtype=torch.float64)


def _rouge_l_recall_compute(total: Tensor, count: Tensor) -> Tensor:
    return total / count if count > 0 else torch.tensor(float("nan"), dtype=torch.float64)


def rouge_l_recall(preds: str | Sequence[str], target: str | Sequence[str]) -> Tensor:
    """Mean ROUGE-L recall of generated texts against their references."""
    return _rouge_l_recall_compute(*_rouge_l_recall_update(preds, target))


class RougeLRecall(Metric):
    """`update(preds, target)` with generated and reference texts; `compute()` is the mean ROUGE-L recall.

    Only two numbers are kept as state (no text)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: str | Sequence[str], target: str | Sequence[str]) -> None:
        total, count = _rouge_l_recall_update(preds, target)
        self.total += total.to(self.total)
        self.count += count.to(self.count)

    def compute(self) -> Tensor:
        return _rouge_l_recall_compute(self.total, self.count)
