"""`newton`: damped Newton removal `θ += η (C + λI)^-1 (-∇U_forget)` with any curvature backend.

One-shot (`steps=1`) or iterative (the forget gradient re-estimated every step, the curvature every
`refresh_every` steps), under the Levenberg-Marquardt safety check of `Unlearner.step`.
"""

from __future__ import annotations

from .base import SecondOrderUnlearner, register


@register("newton")
class Newton(SecondOrderUnlearner):
    """Damped Newton removal (see `SecondOrderUnlearner`); `curvature_backend` defaults to "kfac"."""
