"""How much of a model-utility number is the choice of questions: a paired bootstrap over the evaluation's rows.

Model utility is the harmonic mean of nine means over a few hundred questions (`model_utility`), and its weakest
component (the ROUGE-L recall of greedy answers about real authors, about 0.15 on the benchmark's tiny models) moves
by a hundredth when a handful of greedy answers change. A ratio such as "the unlearned model keeps 0.94 × the retain
model's utility" therefore carries the sampling error of the questions, which a reader needs beside it.

`model_utility_interval(items, reference_items)` resamples the rows of each evaluation set with replacement (the same
draw for the three components of a set, and for both models: a paired bootstrap, since both answered the same
questions), recomputes each component as the mean of its resampled per-row values (rows left out, NaN, stay out) and
the harmonic mean, and returns the point value with the percentile interval of the utility, or of its ratio to the
reference's. The per-row values are `TofuEvaluation.per_item[<component>]` (`tofu_evaluation` fills them for the
nine components, in the rows' order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_unlearn.metrics.model_utility import MODEL_UTILITY_KEYS, MODEL_UTILITY_PARTS, model_utility

#: bootstrap resamples by default
RESAMPLES = 2000


def _per_row(items: Mapping[str, Sequence[float] | Tensor], name: str) -> dict[str, Tensor]:
    missing = [k for k in MODEL_UTILITY_KEYS if k not in items]
    if missing:
        raise ValueError(f"model_utility_interval: {name} lacks the per-row values of {', '.join(missing)} (pass "
                         "TofuEvaluation.per_item of a tofu_evaluation with the retain, real_authors and world_facts "
                         "parts)")
    rows = {k: torch.as_tensor(items[k], dtype=torch.float64).reshape(-1) for k in MODEL_UTILITY_KEYS}
    for part in MODEL_UTILITY_PARTS:
        sizes = {rows[k].numel() for k in MODEL_UTILITY_KEYS if k.startswith(f"{part}_")}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"model_utility_interval: the {part} components of {name} must hold one value per row, "
                             f"the same non-zero number each; got {sorted(sizes)}")
    return rows


def _resampled_utility(rows: Mapping[str, Tensor], draws: Mapping[str, Tensor]) -> Tensor:
    """The utility of each resample [B]: per component the mean of its drawn rows (NaN rows left out)."""
    inverse = torch.zeros(next(iter(draws.values())).shape[0], dtype=torch.float64)
    for key in MODEL_UTILITY_KEYS:
        part = next(p for p in MODEL_UTILITY_PARTS if key.startswith(f"{p}_"))
        means = rows[key][draws[part]].nanmean(dim=1)  # [B]; NaN where every drawn row was left out
        inverse += 1.0 / means
    return len(MODEL_UTILITY_KEYS) / inverse  # a 0 mean gives utility 0, as `model_utility`


def model_utility_interval(items: Mapping[str, Sequence[float] | Tensor],
                           reference_items: Mapping[str, Sequence[float] | Tensor] | None = None, *,
                           level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0) -> dict[str, float]:
    """`{"value", "low", "high"}`: the model utility of `items` (per-row values of the nine components, see the
    module docstring) and its `level` percentile bootstrap interval; with `reference_items` (the same rows scored on
    another model, e.g. the retain model) the ratio utility / reference utility, resampled in pairs (NaN where the
    reference's utility is 0: a component at 0). Deterministic for a given `seed`."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if int(resamples) < 2:
        raise ValueError(f"resamples must be >= 2, got {resamples}")
    rows = _per_row(items, "items")
    reference = None if reference_items is None else _per_row(reference_items, "reference_items")
    if reference is not None:
        different = [k for k in MODEL_UTILITY_KEYS if rows[k].numel() != reference[k].numel()]
        if different:
            raise ValueError(f"model_utility_interval: items and reference_items must score the same rows; "
                             f"{different[0]} has {rows[different[0]].numel()} and {reference[different[0]].numel()}")
    means = {k: float(v[~torch.isnan(v)].mean()) for k, v in rows.items()}
    value = float(model_utility(means))
    if reference is not None:
        reference_value = float(model_utility({k: float(v[~torch.isnan(v)].mean()) for k, v in reference.items()}))
        if reference_value == 0.0:  # a component of the reference at 0: no ratio to speak of
            return {"value": math.nan, "low": math.nan, "high": math.nan}
        value /= reference_value
    generator = torch.Generator().manual_seed(int(seed))
    draws = {}
    for part in MODEL_UTILITY_PARTS:
        n = rows[f"{part}_probability"].numel()
        draws[part] = torch.randint(n, (int(resamples), n), generator=generator)
    sampled = _resampled_utility(rows, draws)
    if reference is not None:
        sampled = sampled / _resampled_utility(reference, draws)
    sampled = sampled[torch.isfinite(sampled)]  # a resample whose reference utility is 0 has no ratio
    if sampled.numel() == 0:
        return {"value": value, "low": math.nan, "high": math.nan}
    tail = (1.0 - level) / 2
    low, high = torch.quantile(sampled, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return {"value": value, "low": low, "high": high}
