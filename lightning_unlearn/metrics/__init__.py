"""Proof of forgetting as torchmetrics: exposure, membership inference, extraction, forget quality.

Perplexity is torchmetrics' own `torchmetrics.text.Perplexity` (see `evaluate`).
"""

from lightning_unlearn.metrics.evaluate import Evaluation, evaluate
from lightning_unlearn.metrics.exposure import CanarySpec, Exposure, canary_specs
from lightning_unlearn.metrics.extraction import ExactMemorization, ExtractionStrength
from lightning_unlearn.metrics.forget_quality import ForgetQuality
from lightning_unlearn.metrics.membership import MembershipInference, privleak

__all__ = [
    "CanarySpec",
    "Evaluation",
    "ExactMemorization",
    "Exposure",
    "ExtractionStrength",
    "ForgetQuality",
    "MembershipInference",
    "canary_specs",
    "evaluate",
    "privleak",
]
