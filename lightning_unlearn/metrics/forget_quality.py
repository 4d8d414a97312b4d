"""Forget quality: the two-sample Kolmogorov-Smirnov test p-value (TOFU; open-unlearning `forget_quality`).

Per-example statistics of the forget set (by default the mean token loss) under the unlearned model are compared
with the same statistics under the reference model retrained without the forget set. A high p-value means the
two distributions cannot be told apart: higher is better (1 = indistinguishable from retraining).

TOFU's forget quality takes the per-question truth ratios of the forget set (`truth_ratio.truth_ratios`) under both
models (open-unlearning `ks_test` on `forget_truth_ratio`); `forget_quality(values, reference_values)` is the
functional twin of `ForgetQuality`. NaN values (items without scored tokens) are left out.
"""

from __future__ import annotations

import torch
from scipy import stats
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def _forget_quality_compute(values: Tensor, reference_values: Tensor) -> Tensor:
    a = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(reference_values, dtype=torch.float64).reshape(-1)
    a, b = a[~torch.isnan(a)].cpu().numpy(), b[~torch.isnan(b)].cpu().numpy()
    if a.size == 0 or b.size == 0:
        raise ValueError("forget quality needs at least one finite value from each model")
    return torch.tensor(float(stats.ks_2samp(a, b).pvalue), dtype=torch.float64)


def forget_quality(values: Tensor, reference_values: Tensor) -> Tensor:
    """`ks_2samp(values, reference_values).pvalue`: per-item statistics of the unlearned and the retain model."""
    return _forget_quality_compute(values, reference_values)


class ForgetQuality(Metric):
    """`update(values, reference_values)` with per-example statistics; `compute()` is `ks_2samp(...).pvalue`."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("reference_values", default=[], dist_reduce_fx="cat")

    def update(self, values: Tensor | None = None, reference_values: Tensor | None = None) -> None:
        if values is not None:
            self.values.append(torch.as_tensor(values, dtype=torch.float64, device=self.device).reshape(-1))
        if reference_values is not None:
            self.reference_values.append(
                torch.as_tensor(reference_values, dtype=torch.float64, device=self.device).reshape(-1))

    def compute(self) -> Tensor:
        if not self.values or not self.reference_values:
            raise ValueError("ForgetQuality needs statistics of both the unlearned model (values) and the reference "
                             "model (reference_values)")
        return _forget_quality_compute(dim_zero_cat(self.values), dim_zero_cat(self.reference_values))
