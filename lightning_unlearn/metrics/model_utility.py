"""Model utility (TOFU; open-unlearning `model_utility` = `hm_aggregate`): what the model still knows and can say.

The harmonic mean of nine numbers, three per evaluation set (retain, real authors, world facts):
- probability: retain `answer_probability` of the answer; real authors / world facts `normalised_answer_probability`
  (the answer against its perturbed answers);
- ROUGE-L recall of the greedy answer against the reference answer (`rouge_l_recall`);
- truth ratio aggregated `true_better` (retain: paraphrased answer vs perturbed; real authors / world facts: answer
  vs perturbed).

The harmonic mean is dominated by the weakest component: any component at 0 makes utility 0 (a warning names it).
Components are all in [0, 1]; a missing one, or a NaN, infinite, negative or above 1, is an error that names it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

MODEL_UTILITY_PARTS: tuple[str, ...] = ("retain", "real_authors", "world_facts")
MODEL_UTILITY_KEYS: tuple[str, ...] = tuple(f"{part}_{what}" for part in MODEL_UTILITY_PARTS
                                            for what in ("probability", "rouge", "truth_ratio"))


def _check_components(components: Mapping[str, float | Tensor]) -> dict[str, float]:
    missing = [k for k in MODEL_UTILITY_KEYS if k not in components]
    if missing:
        raise ValueError(f"model utility needs all nine components; missing: {', '.join(missing)}")
    values = {k: float(components[k]) for k in MODEL_UTILITY_KEYS}
    bad = [k for k, v in values.items() if not 0.0 <= v <= 1.0]  # NaN fails both comparisons
    if bad:
        raise ValueError(f"model utility components must be numbers in [0, 1]; NaN, infinite, negative or above 1: "
                         f"{', '.join(f'{k}={values[k]:g}' for k in bad)} (a NaN component means no row of its part "
                         "was scored: every answer was truncated away, raise max_length)")
    return values


def _model_utility_compute(components: Mapping[str, float | Tensor]) -> Tensor:
    values = _check_components(components)
    zero = [k for k, v in values.items() if v == 0]
    if zero:
        warnings.warn(f"model utility is 0 because these components are 0: {', '.join(zero)}", UserWarning,
                      stacklevel=3)
        return torch.tensor(0.0, dtype=torch.float64)
    return torch.tensor(len(values) / sum(1.0 / v for v in values.values()), dtype=torch.float64)


def model_utility(components: Mapping[str, float | Tensor]) -> Tensor:
    """Harmonic mean of the nine components named in `MODEL_UTILITY_KEYS` (other keys are ignored)."""
    return _model_utility_compute(components)


class ModelUtility(Metric):
    """`update(components, counts=None)` with (some of) the nine components, per evaluation set or per batch: means
    with their item counts, or per-item values; each component is averaged over all its items (sums and counts are
    kept) and `compute()` is the harmonic mean of the nine averages."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        n = len(MODEL_UTILITY_KEYS)
        self.add_state("total", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, components: Mapping[str, float | Tensor | Sequence[float]],
               counts: int | Mapping[str, int] | None = None) -> None:
        """Add components: a number is the mean over `counts` items (an int for every key, or one per key; 1 by
        default), a 1-D tensor or list holds per-item values (NaN items, rows without scored tokens, are skipped).
        Sums and item counts are kept, so updating in parts gives the same averages as one update of all items."""
        unknown = sorted(set(components) - set(MODEL_UTILITY_KEYS))
        if unknown:
            raise ValueError(f"unknown model utility components: {', '.join(unknown)}; valid: "
                             f"{', '.join(MODEL_UTILITY_KEYS)}")
        added = []  # (index, sum, item count), all checked before the state changes
        for i, key in enumerate(MODEL_UTILITY_KEYS):
            if key not in components:
                continue
            value = torch.as_tensor(components[key], dtype=torch.float64)
            if value.dim() == 0:
                n = counts if counts is None or isinstance(counts, int) else counts.get(key)
                n = 1 if n is None else n
                if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                    raise ValueError(f"ModelUtility.update: the item count of {key} must be a positive int, got {n!r}")
                added.append((i, float(value) * n, n))
            elif value.dim() == 1:
                if isinstance(counts, Mapping) and key in counts:
                    raise ValueError(f"ModelUtility.update: {key} holds per-item values, which count themselves; "
                                     "pass counts only for components given as means")
                value = value[~torch.isnan(value)]
                added.append((i, float(value.sum()), value.numel()))
            else:
                raise ValueError(f"ModelUtility.update: {key} must be a number (a mean) or a 1-D tensor of per-item "
                                 f"values, got shape {tuple(value.shape)}")
        for i, total, n in added:
            self.total[i] += total
            self.count[i] += n

    def components(self) -> dict[str, float]:
        """The averaged components seen so far (a key is absent until it has been updated)."""
        return {k: float(self.total[i] / self.count[i]) for i, k in enumerate(MODEL_UTILITY_KEYS) if self.count[i] > 0}

    def compute(self) -> Tensor:
        return _model_utility_compute(self.components())
