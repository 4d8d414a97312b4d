"""Proof of forgetting as torchmetrics: exposure, membership inference, extraction, forget quality.

Perplexity is torchmetrics' own `torchmetrics.text.Perplexity` (see `evaluate`).
TOFU / MUSE numbers as the field computes them: truth ratio, answer probability, ROUGE-L recall, model utility,
MUSE privleak, and `tofu_evaluation` to score a model on TOFU-format rows (`qa_scoring`).
"""

from lightning_unlearn.metrics.answer_probability import (
    AnswerProbability,
    NormalisedAnswerProbability,
    answer_probability,
    normalised_answer_probability,
)
from lightning_unlearn.metrics.answer_scoring import ScoringOptions
from lightning_unlearn.metrics.evaluate import Evaluation, evaluate
from lightning_unlearn.metrics.exposure import CanarySpec, Exposure, canary_specs
from lightning_unlearn.metrics.extraction import ExactMemorization, ExtractionStrength
from lightning_unlearn.metrics.forget_quality import ForgetQuality, forget_quality
from lightning_unlearn.metrics.membership import MembershipInference, privleak
from lightning_unlearn.metrics.model_utility import MODEL_UTILITY_KEYS, ModelUtility, model_utility
from lightning_unlearn.metrics.privacy_leak import PrivLeak, mia_auc, min_k_scores, muse_privleak
from lightning_unlearn.metrics.qa_scoring import (
    TofuEvaluation,
    forget_truth_ratios,
    min_k_auc,
    reference_statistics,
    tofu_evaluation,
)
from lightning_unlearn.metrics.rouge import RougeLRecall, rouge_l_recall
from lightning_unlearn.metrics.truth_ratio import TruthRatio, truth_ratio, truth_ratios
from lightning_unlearn.metrics.utility_interval import model_utility_interval

__all__ = [
    "MODEL_UTILITY_KEYS",
    "AnswerProbability",
    "CanarySpec",
    "Evaluation",
    "ExactMemorization",
    "Exposure",
    "ExtractionStrength",
    "ForgetQuality",
    "MembershipInference",
    "ModelUtility",
    "NormalisedAnswerProbability",
    "PrivLeak",
    "RougeLRecall",
    "ScoringOptions",
    "TofuEvaluation",
    "TruthRatio",
    "answer_probability",
    "canary_specs",
    "evaluate",
    "forget_quality",
    "forget_truth_ratios",
    "mia_auc",
    "min_k_auc",
    "min_k_scores",
    "model_utility",
    "model_utility_interval",
    "muse_privleak",
    "normalised_answer_probability",
    "privleak",
    "reference_statistics",
    "rouge_l_recall",
    "tofu_evaluation",
    "truth_ratio",
    "truth_ratios",
]
