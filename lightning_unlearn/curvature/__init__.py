"""The curvature engine: pure torch. Each backend turns batches into `(C + λI)^p v`."""

from .base import Curvature, Reduce, Vector, gradient, identity
from .diagonal import DiagonalFisher
from .layers import TrackedLayer, find_layers
from .objective import IGNORE_INDEX, CrossEntropyObjective, MSEObjective, Objective, model_logits

__all__ = [
    "IGNORE_INDEX",
    "CrossEntropyObjective",
    "Curvature",
    "DiagonalFisher",
    "MSEObjective",
    "Objective",
    "Reduce",
    "TrackedLayer",
    "Vector",
    "find_layers",
    "gradient",
    "identity",
    "model_logits",
]
