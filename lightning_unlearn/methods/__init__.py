"""Unlearning methods (torch only): Newton removal, Fisher Removal/Forgetting and first-order baselines.

One idea a module: `records` (step records, statuses, the summary), `unlearner` (the run protocol), `target` (the
holdout target, the staged aim, the retain budget), `trust_region`, `step_search`, `newton` (the second-order
methods), `fisher`, `first_order`, `losses`, `inputs` (checks of batches, weights and settings), `holdout` (checks
of the target's holdout) and `registry` (the methods by name). The curvature backends' registry
(`CURVATURE_BACKENDS`, `build_curvature`) lives in `lightning_unlearn.curvature.registry` and is re-exported here.
"""

from ..curvature.registry import BACKEND_ALIASES, CURVATURE_BACKENDS, build_curvature
from .first_order import NPO, FirstOrderUnlearner, GradientAscent, GradientDifference, SimNPO
from .fisher import FisherForgetting, FisherRemoval
from .inputs import check_settings
from .losses import DEFAULT_FORGET_LOSS, FORGET_LOSSES
from .newton import CURVATURE_DATA, Newton, SecondOrderUnlearner
from .records import HoldoutBudgetWarning, NothingAcceptedWarning, StepRecord
from .registry import METHODS, build_unlearner, check_method_settings, is_second_order, register, second_order_methods
from .unlearner import Unlearner

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
    "HoldoutBudgetWarning",
    "NothingAcceptedWarning",
    "SecondOrderUnlearner",
    "SimNPO",
    "StepRecord",
    "Unlearner",
    "build_curvature",
    "build_unlearner",
    "check_method_settings",
    "check_settings",
    "is_second_order",
    "register",
    "second_order_methods",
]
