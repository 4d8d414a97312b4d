"""Model utility (TOFU; open-unlearning `model_utility` = `hm_aggregate`): what the model still knows and can say.

The harmonic mean of nine numbers, three per evaluation set (retain, real authors, world facts):
- probability: retain `answer_probability` of the answer; real authors / world facts `normalised_answer_probability`
  (the answer against its perturbed answers);
- ROUGE-L recall of the greedy answer against the reference answer (`rouge_l_recall`);
- truth ratio aggregated `true_better` (retain: paraphrased answer vs perturbed; real authors / world facts: answer
  vs perturbed).

The harmonic mean is dominated by the weakest component: any component at 0 makes utility 0 (a warning names it).
Components are all in [0, 1]; a missing, NaN or negative one is an error that names it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

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
    bad = [k for k, v in values.items() if math.isnan(v) or v < 0]
    if bad:
        raise ValueError(f"model utility components must be non-negative numbers; NaN or negative: {', '.join(bad)}")
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
    """`update(components)` with (some of) the nine components, e.g. per evaluation set or per batch; each component
    is averaged over its updates and `compute()` is the harmonic mean of the nine averages."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        n = len(MODEL_UTILITY_KEYS)
        self.add_state("total", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, components: Mapping[str, float | Tensor]) -> None:
        unknown = sorted(set(components) - set(MODEL_UTILITY_KEYS))
        if unknown:
            raise ValueError(f"unknown model utility components: {', '.join(unknown)}; valid: "
                             f"{', '.join(MODEL_UTILITY_KEYS)}")
        for i, key in enumerate(MODEL_UTILITY_KEYS):
            if key in components:
                self.total[i] += float(components[key])
                self.count[i] += 1

    def components(self) -> dict[str, float]:
        """The averaged components seen so far (a key is absent until it has been updated)."""
        return {k: float(self.total[i] / self.count[i]) for i, k in enumerate(MODEL_UTILITY_KEYS) if self.count[i] > 0}

    def compute(self) -> Tensor:
        return _model_utility_compute(self.components())
