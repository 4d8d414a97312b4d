"""The curvature engine: pure torch. Each backend turns batches into `(C + λI)^p v`."""

from .base import Curvature, Reduce, Vector, gradient, identity
from .conjugate_gradients import NegativeCurvatureError
from .diagonal import DiagonalFisher
from .hessian_free import HessianFree
from .kfac import KFAC
from .layers import TrackedLayer, UncoveredParametersWarning, find_layers
from .objective import IGNORE_INDEX, CrossEntropyObjective, MSEObjective, Objective, check_causal_lm, model_logits
from .registry import BACKEND_ALIASES, CURVATURE_BACKENDS, build_curvature, curvature_class
from .woodfisher import WoodFisher

__all__ = [
    "BACKEND_ALIASES",
    "CURVATURE_BACKENDS",
    "IGNORE_INDEX",
    "KFAC",
    "CrossEntropyObjective",
    "Curvature",
    "DiagonalFisher",
    "HessianFree",
    "MSEObjective",
    "NegativeCurvatureError",
    "Objective",
    "Reduce",
    "TrackedLayer",
    "UncoveredParametersWarning",
    "Vector",
    "WoodFisher",
    "build_curvature",
    "check_causal_lm",
    "curvature_class",
    "find_layers",
    "gradient",
    "identity",
    "model_logits",
]
