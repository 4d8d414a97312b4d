"""The names that `lightning_unlearn.methods.base` held before the methods were split into one module an idea
(see `lightning_unlearn.methods`); importable from here still. New code imports them from their homes."""

from ..curvature.registry import BACKEND_ALIASES, CURVATURE_BACKENDS, build_curvature
from .newton import (
    CURVATURE_DATA,
    DEFAULT_NEWTON_STEPS,
    DEFAULT_RELATIVE_DAMPING,
    SecondOrderUnlearner,
    clone_curvature,
)
from .records import STATUSES, Batch, NothingAcceptedWarning, StepRecord
from .registry import METHODS, build_unlearner, check_method_settings, is_second_order, register, second_order_methods
from .target import HOLDOUT_BINS, HOLDOUT_MAX_NATS, held_out_retain, over_retain_budget, retain_budget_nats
from .trust_region import DEFAULT_MAX_STEP_NORM, DEFAULT_PREDICTED_TRUST
from .unlearner import Unlearner

__all__ = [
    "BACKEND_ALIASES", "CURVATURE_BACKENDS", "CURVATURE_DATA", "DEFAULT_MAX_STEP_NORM", "DEFAULT_NEWTON_STEPS",
    "DEFAULT_PREDICTED_TRUST", "DEFAULT_RELATIVE_DAMPING", "HOLDOUT_BINS", "HOLDOUT_MAX_NATS", "METHODS", "STATUSES",
    "Batch", "NothingAcceptedWarning", "SecondOrderUnlearner", "StepRecord", "Unlearner", "build_curvature",
    "build_unlearner", "check_method_settings", "clone_curvature", "held_out_retain", "is_second_order",
    "over_retain_budget", "register", "retain_budget_nats", "second_order_methods",
]
