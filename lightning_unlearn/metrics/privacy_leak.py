"""PrivLeak (MUSE, Shi et al., 2024; open-unlearning `privleak`): does the forget set still look like training data?

1. Min-K% Prob score per example (Shi et al., 2024): the mean of the lowest `max(1, int(n * k))` log-probabilities of
   its `n` scored tokens, `k = 0.4` in MUSE and open-unlearning. Higher = more likely a training member.
2. AUC of that score with forget examples as members and holdout examples (never trained on) as non-members. 1: the
   forget set is recognised as training data; 0.5: indistinguishable from unseen data. (open-unlearning's
   `roc_auc_score` with holdout as positive class on loss-like scores gives this same number.)
3. `privleak = ((1 - AUC) - (1 - AUC_retain)) / (1 - AUC_retain) * 100`, `AUC_retain` the AUC of the model retrained
   without the forget set (open-unlearning uses 0.5 when no retain model's AUC is given). MUSE's own code calls
   `1 - AUC` "the AUC" (it labels holdout as members), hence the `1 -`. 0 is ideal; negative = under-unlearning
   (the original model is near -100); positive = over-unlearning (the forget set looks less familiar than
   unseen text).

Note: `lightning_unlearn.metrics.membership.privleak` is `(AUC - AUC_ref) / AUC_ref * 100` with the AUC as above: the
opposite sign and another denominator (equal magnitude only when `AUC_ref = 0.5`); use `muse_privleak` to compare
with published MUSE / open-unlearning numbers. (This module is not called `privleak` so that it does not shadow that
function in `lightning_unlearn.metrics`.)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_unlearn.metrics.functional import lowest_k_mean, token_logprobs
from lightning_unlearn.metrics.membership import auroc, warn_degenerate_reference

EPS = 1e-10  # open-unlearning's guard against division by zero
DEFAULT_REFERENCE_AUC = 0.5  # open-unlearning's `ref_value` when no retain model's AUC is given


def min_k_scores(logprobs: Tensor, mask: Tensor | None = None, k: float = 0.4) -> Tensor:
    """Min-K% Prob per row [B] (float64) of token log-probabilities [B, T]; `mask` [B, T] marks the scored tokens
    (all when None). NaN for a row without scored tokens."""
    lp = torch.as_tensor(logprobs, dtype=torch.float64)
    if lp.dim() == 1:
        lp = lp.unsqueeze(0)
    m = torch.ones_like(lp, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool).reshape(
        lp.shape)
    return lowest_k_mean(lp, m, k)


def min_k_scores_from_logits(logits: Tensor, labels: Tensor, k: float = 0.4) -> Tensor:
    """Min-K% Prob per example [B] over the tokens whose (HF-shifted) label is not -100."""
    lp, _, mask = token_logprobs(logits, labels)
    return lowest_k_mean(lp, mask, k)


def mia_auc(member_scores: Tensor, nonmember_scores: Tensor) -> Tensor:
    """AUROC of scores (higher = member) with `member_scores` (forget) as the positive class; ties count half."""
    members = torch.as_tensor(member_scores, dtype=torch.float64).reshape(-1)
    others = torch.as_tensor(nonmember_scores, dtype=torch.float64, device=members.device).reshape(-1)
    members, others = members[~torch.isnan(members)], others[~torch.isnan(others)]
    if members.numel() == 0 or others.numel() == 0:
        raise ValueError("the membership AUC needs scores of both forget (member) and holdout (non-member) examples; "
                         "one side has none (an example has no score when truncation at max_length leaves it no "
                         "scored token: raise max_length)")
    scores = torch.cat([members, others])
    labels = torch.cat([torch.ones_like(members), torch.zeros_like(others)])
    return auroc(scores, labels).double()


def muse_privleak(auc: float | Tensor, reference_auc: float | Tensor = DEFAULT_REFERENCE_AUC) -> Tensor:
    """`((1 - auc) - (1 - reference_auc)) / (1 - reference_auc + 1e-10) * 100` (MUSE / open-unlearning); warns when
    the reference AUC is 0 or 1 (the retain model separates forget from holdout perfectly)."""
    warn_degenerate_reference(float(reference_auc))
    score, ref = 1.0 - torch.as_tensor(auc, dtype=torch.float64), 1.0 - torch.as_tensor(reference_auc,
                                                                                          dtype=torch.float64)
    return (score - ref) / (ref + EPS) * 100.0


def _privleak_compute(member_scores: Tensor, nonmember_scores: Tensor,
                      reference_auc: float | Tensor) -> dict[str, Tensor]:
    auc = mia_auc(member_scores, nonmember_scores)
    return {"auc": auc, "privleak": muse_privleak(auc, reference_auc)}


class PrivLeak(Metric):
    """`update(logits, labels, member)` (member True for a forget batch, False for holdout) or
    `update_scores(scores, member)`; `compute()` returns `{"auc", "privleak"}` against `reference_auc`."""

    full_state_update = False
    higher_is_better = None  # 0 is ideal

    def __init__(self, k: float = 0.4, reference_auc: float = DEFAULT_REFERENCE_AUC, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < k <= 1.0:
            raise ValueError(f"k must be a fraction in (0, 1], got {k}; pass 0.4 for Min-40%")
        self.k, self.reference_auc = k, float(reference_auc)
        self.add_state("member_scores", default=[], dist_reduce_fx="cat")
        self.add_state("nonmember_scores", default=[], dist_reduce_fx="cat")

    def update(self, logits: Tensor | None, labels: Tensor | None, member: bool | Tensor,
               scores: Tensor | None = None) -> None:
        """Score a batch from its logits and labels, or take precomputed Min-K% `scores` (with None logits).
        `member`: True for a forget batch, False for holdout, or a bool tensor [B] per example (as
        `MembershipInference`)."""
        if scores is None:
            if logits is None or labels is None:
                raise ValueError("PrivLeak.update needs logits and labels, or precomputed scores")
            scores = min_k_scores_from_logits(logits, labels, self.k)
        values = torch.as_tensor(scores, dtype=torch.float64).reshape(-1).to(self.device)
        flags = torch.as_tensor(member, dtype=torch.bool, device=self.device).reshape(-1)
        if flags.numel() == 1:
            flags = flags.expand(values.numel())
        elif flags.numel() != values.numel():
            raise ValueError(f"member has {flags.numel()} flags for a batch of {values.numel()} examples; pass one "
                             "bool for the whole batch or one per example")
        self.member_scores.append(values[flags])
        self.nonmember_scores.append(values[~flags])

    def update_scores(self, scores: Tensor, member: bool | Tensor) -> None:
        """Add precomputed per-example Min-K% scores of forget (member) or holdout examples."""
        self.update(None, None, member, scores=scores)

    def compute(self) -> dict[str, Tensor]:
        def cat(state) -> Tensor:
            if isinstance(state, list) and not state:
                return torch.empty(0, dtype=torch.float64)
            return dim_zero_cat(state)

        return _privleak_compute(cat(self.member_scores), cat(self.nonmember_scores), self.reference_auc)
