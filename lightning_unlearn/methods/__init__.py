"""Unlearning methods (torch only): Newton removal, Fisher Removal/Forgetting and first-order baselines.

The method registry (`METHODS`, `is_second_order`) lives here; the curvature backends' (`CURVATURE_BACKENDS`,
`build_curvature`) lives in `lightning_unlearn.curvature.registry` and is re-exported for compatibility."""

from .base import (
    BACKEND_ALIASES,
    CURVATURE_BACKENDS,
    CURVATURE_DATA,
    METHODS,
    SecondOrderUnlearner,
    StepRecord,
    Unlearner,
    build_curvature,
    build_unlearner,
    check_method_settings,
    is_second_order,
    second_order_methods,
)
from .first_order import NPO, FirstOrderUnlearner, GradientAscent, GradientDifference
from .fisher import FisherForgetting, FisherRemoval
from .inputs import check_settings
from .losses import DEFAULT_FORGET_LOSS, FORGET_LOSSES
from .newton import Newton

__all__ = [
    "BACKEND_ALIASES",
    "CURVATURE_BACKENDS",
    "CURVATURE_DATA",
    "DEFAULT_FORGET_LOSS",
    "FORGET_LOSSES",
    "METHODS",
    "NPO",
    "FirstOrderUnlearner",
    "FisherForgetting",
    "FisherRemoval",
    "GradientAscent",
    "GradientDifference",
    "Newton",
    "check_method_settings",
    "check_settings",
    "is_second_order",
    "second_order_methods",
    "SecondOrderUnlearner",
    "StepRecord",
    "Unlearner",
    "build_curvature",
    "build_unlearner",
]
