"""Unlearning methods (torch only): Newton removal, Fisher Removal/Forgetting and first-order baselines."""

from .base import (
    CURVATURE_BACKENDS,
    CURVATURE_DATA,
    METHODS,
    SecondOrderUnlearner,
    StepRecord,
    Unlearner,
    build_curvature,
    build_unlearner,
    check_method_settings,
)
from .first_order import NPO, FirstOrderUnlearner, GradientAscent, GradientDifference
from .fisher import FisherForgetting, FisherRemoval
from .inputs import check_settings
from .losses import DEFAULT_FORGET_LOSS, FORGET_LOSSES
from .newton import Newton

__all__ = [
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
    "SecondOrderUnlearner",
    "StepRecord",
    "Unlearner",
    "build_curvature",
    "build_unlearner",
]
