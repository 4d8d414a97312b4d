"""Forgetting what is still recognisable (`focus_unforgotten=True`, off by default): each forget example's objective
is weighted by how far its loss still sits below the holdout's (`docs/recipe.md` §9).

The target is a membership test against the holdout (`target`): the forget score is the mean of the forget examples'
percentiles among the holdout examples' losses. NLL ascent's gradient grows with the loss it raises (`1 − p` per
token), so the answers already pushed up take most of each step while the memorised ones stay memorised: at the
target on the TOFU-faithful benchmark (forget10, seed 0) 23 of the 100 forget answers were still below the holdout's
10th percentile of loss and 30 above its 90th (the retain model's: 0 and 17). Weighting example i by
`1 − percentile_i`, read at the step's start, moves the answers an attack still recognises and leaves those already
past every holdout example (12 and 21 there). Measured on three architectures it is not a default: forget quality
up on GPT-2 at the same utility, the same or lower on GPT-NeoX and Llama, with less utility on their forget10.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .target import holdout_percentiles


def unforgotten_weights(losses: Tensor, hist: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """`1 − percentile` of each of this process's forget examples (per-example losses `losses`) among the holdout's
    (`hist`, `target.holdout_histogram`): 1 below every holdout example, 0 above every one. All ones when every
    example (over every process) is above every holdout example, where nothing is left to weight by."""
    weights = 1.0 - holdout_percentiles(losses, hist)
    total = reduce(weights.sum().reshape(1).double())
    return weights if float(total) > 0 else torch.ones_like(weights)
