"""The target of a run and its retain budget (`docs/recipe.md`: the target, the staged aim, the retain budget).

**The target.** Holdout batches are data of the same kind as the forget set that the model never saw
(never-inserted reference canaries, QA pairs of people outside the training set, the data module's `holdout`
split). A model that never saw the forget set cannot tell it from the holdout, so the target is a membership test
against the holdout: the run stops when the forget examples' losses sit, on average, at the median of the holdout
examples' losses under the same weights (the *forget score*, the mean holdout percentile of the forget examples' mean
token NLL, reaches 0.5; 1 - score is the LOSS attack's AUC). Per example, not the mean loss: a mean can be reached by
a few examples pushed far up while the rest stay memorised. Under the same weights (`relative_target=True`), because
privacy is relative (a canary's exposure is its rank among all candidates, an attack compares the two sets under the
model it attacks) and because the original model's holdout level is itself contaminated by what it learned from the
forget set. `relative_target=False` compares with the holdout's losses before unlearning. `forget_target=<nats>`
sets a mean-loss level by hand instead. Without either there is no target: each step then takes the largest step
within the retain budget.

**The retain budget.** A trial is rolled back when the loss of the held retain batch rises more than the budget
above its value when that batch was first seen (by default the start of the run, so the budget bounds the damage of
the whole run, not each step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .records import Batch

#: the holdout's per-example losses are kept as a histogram (sums reduce across processes): bins over [0, max) nats
HOLDOUT_BINS, HOLDOUT_MAX_NATS = 4096, 64.0


def retain_budget_nats(max_retain_increase: float, reference: float | None = None) -> float:
    """The retain budget as a rise of the held retain loss in nats: the larger of `log(1 + max_retain_increase)`
    (the held retain *perplexity*, or answer probability on QA, changes by at most that fraction) and
    `max_retain_increase × reference` (the loss itself rises by at most that fraction). The first keeps the budget
    from vanishing on memorised retain data; the second is the budget on text the model has not memorised."""
    nats = math.log1p(float(max_retain_increase))
    return nats if reference is None else max(nats, float(max_retain_increase) * float(reference))


def over_retain_budget(loss: float, reference: float, max_retain_increase: float | None,
                       fraction: float = 1.0) -> bool:
    """Whether the held retain loss `loss` spends more than `fraction` of the budget above `reference` (its value at
    the start)."""
    return max_retain_increase is not None and loss > reference + fraction * retain_budget_nats(max_retain_increase,
                                                                                                reference)


def held_out_retain(retain: Sequence[Batch]) -> tuple[list[Batch], Batch]:
    """(curvature and step batches, the held batch of the retain budget) from retain batches when no held batch is
    given: the last batch is held out when there are two or more, so that the budget is read on retain data that
    neither the curvature nor the steps have seen (read on curvature data it under-reports the damage); with one
    batch it serves both."""
    retain = list(retain)
    return (retain[:-1], retain[-1]) if len(retain) >= 2 else (retain, retain[0])


def holdout_histogram(losses: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """Counts of examples by mean token NLL (`HOLDOUT_BINS` bins over [0, `HOLDOUT_MAX_NATS`)), reduced across
    processes. A non-finite loss is counted in the top bin."""
    losses = torch.nan_to_num(losses, nan=HOLDOUT_MAX_NATS, posinf=HOLDOUT_MAX_NATS, neginf=0.0)
    x = (losses.clamp(0, HOLDOUT_MAX_NATS) / HOLDOUT_MAX_NATS * HOLDOUT_BINS).long().clamp(max=HOLDOUT_BINS - 1)
    hist = torch.zeros(HOLDOUT_BINS, dtype=torch.float64).index_add_(0, x, torch.ones_like(losses))
    return reduce(hist)


def _holdout_below(losses: Tensor, hist: Tensor) -> tuple[Tensor, Tensor]:
    """(per forget example, the number of holdout examples with a lower loss, linear within a bin; the holdout's
    size) from the histogram `hist`."""
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), hist.cumsum(0)])
    x = (losses.double().clamp(0, HOLDOUT_MAX_NATS) / HOLDOUT_MAX_NATS * HOLDOUT_BINS).clamp(max=HOLDOUT_BINS - 1e-9)
    k = x.floor().long()
    return cum[k] + (x - k) * hist[k], cum[-1]


def forget_score(losses: Tensor, hist: Tensor, reduce: Callable[[Tensor], Tensor]) -> float:
    """The mean percentile of the forget examples' losses `losses` among the holdout's (`hist`, from
    `holdout_histogram`), linear within a bin, over every process's examples: 0 = every forget example below every
    holdout example, 0.5 = indistinguishable."""
    below, size = _holdout_below(losses, hist)
    sums = reduce(torch.tensor([float(below.sum()), float(len(losses))], dtype=torch.float64))
    return float(sums[0] / (sums[1] * size))


def holdout_percentiles(losses: Tensor, hist: Tensor) -> Tensor:
    """Each forget example's percentile among the holdout's losses (`forget_score` is their mean over every
    process's examples): 0 below every holdout example (still recognisable as trained on), 1 above every one."""
    below, size = _holdout_below(losses, hist)
    return below / size


def null_score_sd(n: float, m: float) -> float:
    """The standard deviation of the forget score of `n` forget and `m` holdout examples drawn alike (no model can
    tell them apart): the score is the Mann-Whitney statistic U / (n m), whose null variance without ties is
    (n + m + 1) / (12 n m). inf when either set is empty."""
    if n <= 0 or m <= 0:
        return math.inf
    return math.sqrt((n + m + 1) / (12.0 * n * m))


def staged_aim(target: float, start: float, fraction: float, score: float) -> float:
    """What a staged step aims at: the point `fraction` of the way from the run's first score `start` to `target`,
    or the target itself once `score` has passed that point."""
    aim = start + fraction * (target - start)
    return target if score >= aim else aim


def score_between(a: Sequence[Tensor], b: Sequence[Tensor], t: float, reduce: Callable[[Tensor], Tensor]) -> float:
    """The forget score (relative holdout target) of the per-example losses `(1 - t) a + t b` (forget losses,
    holdout losses: what `Unlearner.forget_score` put in `losses_out` at two weights): the score predicted in
    between when every example's loss moves linearly."""
    forget_losses, holdout_losses = ((1.0 - t) * x + t * y for x, y in zip(a, b))
    return forget_score(forget_losses, holdout_histogram(holdout_losses, reduce), reduce)
