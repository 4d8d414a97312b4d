"""Membership inference: per-example attack scores and the AUROC of forget (members) against holdout.

Convention: every score is oriented so that HIGHER means "more likely a training member", and the AUROC takes
forget examples as the positive class. AUC 1.0 = the forget data are clearly recognised as members (not
forgotten); 0.5 = forget and holdout are indistinguishable (the target of unlearning); below 0.5 = the forget data
look *less* familiar than unseen data (over-unlearning, itself a signal). This equals open-unlearning's
`roc_auc_score` with loss-like scores and holdout as the positive class.

Attacks (per example, over the tokens whose shifted label is not -100):
- `loss`: `-mean NLL` (Yeom et al., 2018).
- `zlib`: `-mean NLL / len(zlib.compress(text))`, the zlib-compressed byte length of the example's scored text
  (the "loss / zlib" variant of Carlini et al., 2021 as implemented by open-unlearning).
- `min_k`: mean of the lowest k fraction of token log-probabilities, `max(1, int(n * k))` tokens (Shi et al., 2024).
- `min_k_pp`: Min-K%++ (Zhang et al., 2024): the same on `(log p(x_t) - mu_t) / sigma_t`, with `mu_t`, `sigma_t^2`
  the mean and variance of `log p` under the model's next-token distribution.
- `reference`: `loss_reference - loss_target`, the reference model's loss minus the target's (Carlini et al., 2022).

`privleak = (AUC - AUC_reference) / AUC_reference * 100` with `AUC_reference` the retrained model's AUC: 0 is ideal,
positive = under-unlearning, negative = over-unlearning. This is NOT the number MUSE and open-unlearning publish
under that name (`privacy_leak.muse_privleak`: `((1 - AUC) - (1 - AUC_ref)) / (1 - AUC_ref) * 100`, negative =
under-unlearning); `metrics.evaluate` reports this one as `mia/<attack>/privleak`, `tofu_evaluation` MUSE's.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence

import torch
from scipy.stats import mannwhitneyu
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_unlearn.metrics.functional import example_loss, lowest_k_mean, token_logprobs

ATTACKS = ("loss", "zlib", "min_k", "min_k_pp", "reference")


def zlib_length(text: str) -> int:
    """Byte length of the zlib-compressed UTF-8 text (the denominator of the zlib attack)."""
    return len(zlib.compress(text.encode("utf-8")))


def min_k_pp_scores(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token Min-K%++ statistics `(log p(x_t) - mu_t) / sigma_t` [B, T-1] and the mask of scored tokens."""
    lp, logp, mask = token_logprobs(logits, labels)
    probs = logp.exp()
    mu = (probs * logp).sum(-1)
    var = (probs * logp.square()).sum(-1) - mu.square()
    return (lp - mu) / var.clamp_min(1e-6).sqrt(), mask


def attack_scores(
    logits: Tensor,
    labels: Tensor,
    *,
    k: float = 0.4,
    texts: Sequence[str] | None = None,
    reference_logits: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-example scores of every attack [B] (float64; NaN where an input is missing), higher = member."""
    loss = example_loss(logits, labels).double()
    lp, _, mask = token_logprobs(logits, labels)
    pp, _ = min_k_pp_scores(logits, labels)
    nan = torch.full_like(loss, float("nan"))
    if texts is not None:
        if len(texts) != loss.numel():
            raise ValueError(f"got {len(texts)} texts for a batch of {loss.numel()} examples")
        zl = -loss / torch.tensor([zlib_length(t) for t in texts], dtype=torch.float64, device=loss.device)
    else:
        zl = nan
    ref = example_loss(reference_logits, labels).double() - loss if reference_logits is not None else nan
    return {"loss": -loss, "zlib": zl, "min_k": lowest_k_mean(lp, mask, k), "min_k_pp": lowest_k_mean(pp, mask, k),
            "reference": ref}


def auroc(scores: Tensor, members: Tensor) -> Tensor:
    """AUROC (float64) of `scores` (higher = member) for the binary `members` labels; ties count half.

    The Mann-Whitney U of the members against the others (scipy.stats.mannwhitneyu), over `n_m n_o` pairs: the
    same number as torchmetrics' `BinaryAUROC` (or sklearn's `roc_auc_score`), but in float64, so that 5/6 is
    0.8333333333333334 and privleak, which divides by a reference AUC, carries no float32 error.
    """
    values = torch.as_tensor(scores).double().reshape(-1)
    labels = torch.as_tensor(members, device=values.device).reshape(-1).bool()
    if labels.numel() != values.numel():
        raise ValueError(f"got {values.numel()} scores for {labels.numel()} member labels")
    if torch.isnan(values).any():
        raise ValueError("AUROC scores contain NaN; drop the examples without a score first")
    n_members = int(labels.sum())
    n_others = labels.numel() - n_members
    if n_members == 0 or n_others == 0:
        raise ValueError("the AUROC needs both member (forget) and non-member (holdout) examples")
    # the Mann-Whitney U of the members against the others is the count of (member, other) pairs the member wins,
    # ties counted half: the AUROC times the number of pairs
    u = mannwhitneyu(values[labels].cpu().numpy(), values[~labels].cpu().numpy(), method="asymptotic").statistic
    return torch.tensor(float(u) / (n_members * n_others), dtype=torch.float64, device=values.device)


def warn_degenerate_reference(reference_auc: float) -> None:
    """Warn when the reference (retain) model's AUC is 0 or 1: privleak divides by it (or by 1 - it) and blows up."""
    if reference_auc in (0.0, 1.0):
        warnings.warn(f"the reference (retain) model's AUC is {reference_auc:g}: forget and holdout examples are told "
                      "apart perfectly even by a model that never saw the forget set, so they differ in kind, not in "
                      "membership, and privleak (divided by that AUC or by 1 minus it) is not meaningful; use forget "
                      "and holdout examples drawn from one distribution", UserWarning, stacklevel=3)


def privleak(auc: float | Tensor, reference_auc: float | Tensor) -> float:
    """`(AUC - AUC_ref) / AUC_ref * 100` (`metrics.evaluate`'s `mia/<attack>/privleak`): 0 = as private as the
    retrained model, positive = under-unlearning. The opposite sign of MUSE's privleak (`privacy_leak.muse_privleak`,
    the `privleak` of `tofu_evaluation`), and another denominator."""
    warn_degenerate_reference(float(reference_auc))
    return float((auc - reference_auc) / (reference_auc + 1e-10) * 100.0)


class MembershipInference(Metric):
    """Collects per-example attack scores of members (forget) and non-members (holdout); `compute()` gives AUROCs.

    `update(logits, labels, member, texts=None, reference_logits=None)`: `member` True for a batch of forget
    examples, False for holdout (or a bool tensor [B]). `compute()` returns `{attack: AUROC}` for every attack
    with scores for all examples (zlib needs texts, reference needs reference logits).
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, k: float = 0.4, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < k <= 1.0:
            raise ValueError(f"k must be a fraction in (0, 1], got {k}; pass 0.4 for Min-40%")
        self.k = k
        self.add_state("member", default=[], dist_reduce_fx="cat")
        for name in ATTACKS:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        logits: Tensor | None,
        labels: Tensor | None,
        member: bool | Tensor,
        texts: Sequence[str] | None = None,
        reference_logits: Tensor | None = None,
        scores: dict[str, Tensor] | None = None,
    ) -> None:
        """Score a batch from its logits, or take precomputed `scores` (`attack_scores` output) with None logits."""
        if scores is None:
            if logits is None or labels is None:
                raise ValueError("MembershipInference.update needs logits and labels, or precomputed scores")
            scores = attack_scores(logits, labels, k=self.k, texts=texts, reference_logits=reference_logits)
        batch = next(iter(scores.values())).numel()
        flags = torch.as_tensor(member, dtype=torch.bool, device=self.device).reshape(-1).expand(batch)
        self.member.append(flags.clone())
        for name in ATTACKS:
            value = scores.get(name)
            value = torch.full((batch,), float("nan"), dtype=torch.float64) if value is None else value.double()
            getattr(self, name).append(value.reshape(-1).to(self.device))

    def scores(self) -> dict[str, Tensor]:
        """All collected scores: `member` [N] and one [N] tensor per attack."""
        return {name: dim_zero_cat(getattr(self, name)) for name in ("member", *ATTACKS)}

    def update_scores(self, scores: dict[str, Tensor], member: bool | Tensor) -> None:
        """Add precomputed per-example scores (missing attacks become NaN)."""
        self.update(None, None, member, scores=scores)

    def compute(self) -> dict[str, Tensor]:
        if not self.member:
            raise ValueError("MembershipInference.compute() called before update()")
        s = self.scores()
        members = s["member"]
        if members.all() or not members.any():
            raise ValueError("membership inference needs both forget (member=True) and holdout (member=False) examples")
        out = {}
        for name in ATTACKS:
            values = s[name]
            if torch.isnan(values).any():
                continue
            out[name] = auroc(values, members)
        return out
