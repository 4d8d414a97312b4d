"""Score a causal LM on TOFU-format rows and compute the field's TOFU numbers (`tofu_evaluation`).

The scoring of rows (one forward pass per batch: answer NLL, Min-K% Prob, extraction strength) and the greedy
answers for ROUGE are in `answer_scoring`; its options (`ScoringOptions`) apply here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_unlearn.metrics.answer_probability import answer_probability, normalised_answer_probability
from lightning_unlearn.metrics.answer_scoring import (
    AnswerScores,
    Row,
    ScoringOptions,
    generate_answers,
    score_answers,
    score_texts,
    scoring_options,
)
from lightning_unlearn.metrics.forget_quality import forget_quality
from lightning_unlearn.metrics.model_utility import MODEL_UTILITY_KEYS, MODEL_UTILITY_PARTS, model_utility
from lightning_unlearn.metrics.privacy_leak import DEFAULT_REFERENCE_AUC, mia_auc, muse_privleak
from lightning_unlearn.metrics.rouge import rouge_l_recall_scores
from lightning_unlearn.metrics.truth_ratio import aggregate_truth_ratios, truth_ratios

__all__ = ["REQUIRED_FIELDS", "TOFU_PARTS", "PartScores", "TofuEvaluation", "check_rows", "forget_truth_ratios",
           "min_k_auc", "perturbed_losses", "reference_statistics", "score_part", "tofu_evaluation"]

TOFU_PARTS = ("forget", "retain", "real_authors", "world_facts", "holdout")
#: the fields each part's rows need (TOFU's `*_perturbed.json` files; holdout `holdoutNN.json`)
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "forget": ("question", "answer", "paraphrased_answer", "perturbed_answer"),
    "retain": ("question", "answer", "paraphrased_answer", "perturbed_answer"),
    "real_authors": ("question", "answer", "perturbed_answer"),
    "world_facts": ("question", "answer", "perturbed_answer"),
    "holdout": ("question", "answer"),
}


# ---------------------------------------------------------------------------------------------- TOFU evaluation
def check_rows(part: str, rows: Sequence[Any], required: Sequence[str] | None = None) -> None:
    """Raise naming the part, the row number and the field when a row lacks a field or has the wrong type (never
    the row's text)."""
    required = REQUIRED_FIELDS.get(part, ("question", "answer")) if required is None else required
    if not rows:
        raise ValueError(f"the {part} part has no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{part} row {i} is a {type(row).__name__}, not a dict with fields {', '.join(required)}")
        for name in required:
            if name not in row or row[name] is None:
                raise ValueError(f"{part} row {i} has no {name!r} field (it has: {', '.join(sorted(map(str, row)))});"
                                 f" the {part} part needs {', '.join(required)}")
            value = row[name]
            if name == "perturbed_answer":
                ok = isinstance(value, str) or (isinstance(value, Sequence) and len(value) > 0
                                                and all(isinstance(v, str) for v in value))
            else:
                ok = isinstance(value, str)
            if not ok:
                kind = "a non-empty list of strings" if name == "perturbed_answer" else "a string"
                raise ValueError(f"{part} row {i}: field {name!r} must be {kind}, got {type(value).__name__}")


def _perturbed(row: Row) -> list[str]:
    value = row["perturbed_answer"]
    return [value] if isinstance(value, str) else list(value)


def perturbed_losses(model: nn.Module, tokenizer: Any, rows: Sequence[Row], options: ScoringOptions | None = None,
                     **overrides: Any) -> Tensor:
    """Mean NLL of every perturbed answer [N, K] (NaN where a row has fewer than K perturbed answers)."""
    opts = scoring_options(options, overrides)
    lists = [_perturbed(r) for r in rows]
    width = max((len(x) for x in lists), default=0)
    flat_q = [r["question"] for r, answers in zip(rows, lists) for _ in answers]
    flat_a = [a for answers in lists for a in answers]
    losses = score_answers(model, tokenizer, flat_q, flat_a, opts).loss
    out = torch.full((len(rows), width), float("nan"), dtype=torch.float64)
    pos = 0
    for i, answers in enumerate(lists):
        out[i, :len(answers)] = losses[pos:pos + len(answers)]
        pos += len(answers)
    return out


@dataclass
class PartScores:
    """Per-row numbers of one part (no text)."""

    answer: AnswerScores
    paraphrased_loss: Tensor | None = None
    perturbed_loss: Tensor | None = None
    rouge: Tensor | None = None


def score_part(model: nn.Module, tokenizer: Any, rows: Sequence[Row], *, paraphrased: bool = True,
               perturbed: bool = True, generate: bool = True, options: ScoringOptions | None = None,
               **overrides: Any) -> PartScores:
    """Score the answers (and optionally the paraphrased answers, the perturbed answers and ROUGE-L recall of greedy
    answers) of TOFU rows."""
    opts = scoring_options(options, overrides)
    questions, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
    scores = PartScores(score_answers(model, tokenizer, questions, answers, opts))
    if paraphrased:
        scores.paraphrased_loss = score_answers(model, tokenizer, questions,
                                                [r["paraphrased_answer"] for r in rows], opts).loss
    if perturbed:
        scores.perturbed_loss = perturbed_losses(model, tokenizer, rows, opts)
    if generate:
        generated = generate_answers(model, tokenizer, questions, answers, opts)
        scores.rouge = rouge_l_recall_scores(generated, answers)
        del generated
    return scores


def _rows_scores(model: nn.Module, tokenizer: Any, rows: Sequence[Row | str], opts: ScoringOptions) -> AnswerScores:
    """QA rows score their answer; plain strings (MUSE texts) score the whole text."""
    if all(isinstance(r, str) for r in rows):
        return score_texts(model, tokenizer, list(rows), opts)
    if any(isinstance(r, str) for r in rows):
        raise ValueError("rows must be all QA dicts or all texts, not a mixture")
    return score_answers(model, tokenizer, [r["question"] for r in rows], [r["answer"] for r in rows], opts)


def forget_truth_ratios(model: nn.Module, tokenizer: Any, forget_rows: Sequence[Row],
                        options: ScoringOptions | None = None, **overrides: Any) -> Tensor:
    """Per-question truth ratios [N] of the forget rows (paraphrased vs perturbed answers): compute them once for
    the retain model and pass them to `tofu_evaluation(..., retain_model_truth_ratios=...)`."""
    check_rows("forget", forget_rows, ("question", "paraphrased_answer", "perturbed_answer"))
    opts = scoring_options(options, overrides)
    questions = [r["question"] for r in forget_rows]
    para = score_answers(model, tokenizer, questions, [r["paraphrased_answer"] for r in forget_rows], opts).loss
    return truth_ratios(para, perturbed_losses(model, tokenizer, forget_rows, opts))


def min_k_auc(model: nn.Module, tokenizer: Any, forget_rows: Sequence[Row | str], holdout_rows: Sequence[Row | str],
              options: ScoringOptions | None = None, **overrides: Any) -> float:
    """AUC of the Min-K% Prob attack, forget (members) against holdout: the retain model's value is privleak's
    reference. Rows are TOFU QA dicts (the answer is scored) or MUSE texts (the whole text is scored)."""
    opts = scoring_options(options, overrides)
    return float(mia_auc(_rows_scores(model, tokenizer, forget_rows, opts).min_k,
                         _rows_scores(model, tokenizer, holdout_rows, opts).min_k))


def reference_statistics(retain_model: nn.Module, tokenizer: Any, parts: Mapping[str, Sequence[Row]], *,
                         holdout_rows: Sequence[Row | str] | None = None, options: ScoringOptions | None = None,
                         **overrides: Any) -> dict[str, Any]:
    """What `tofu_evaluation` needs of the retain model: `forget_truth_ratios` (Tensor) and `privleak_auc` (float,
    None without holdout rows)."""
    opts = scoring_options(options, overrides)
    holdout = holdout_rows if holdout_rows is not None else parts.get("holdout")
    out: dict[str, Any] = {"forget_truth_ratios": forget_truth_ratios(retain_model, tokenizer, parts["forget"], opts),
                           "privleak_auc": None}
    if holdout is not None:
        out["privleak_auc"] = min_k_auc(retain_model, tokenizer, parts["forget"], holdout, opts)
    return out


class TofuEvaluation(dict):
    """A flat `{name: float}` dict of metrics; `per_item` holds per-row numbers (never texts): `forget_truth_ratio`
    (pass the retain model's as `retain_model_truth_ratios`), `forget_min_k`, `holdout_min_k`, ..."""

    def __init__(self, *args: Any, per_item: Mapping[str, list[float]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.per_item: dict[str, list[float]] = dict(per_item or {})


def _mean(values: Tensor) -> float:
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else math.nan


def tofu_evaluation(
    model: nn.Module,
    tokenizer: Any,
    parts: Mapping[str, Sequence[Row]],
    *,
    retain_model_truth_ratios: Tensor | Sequence[float] | None = None,
    retain_model_privleak_auc: float | None = None,
    holdout_rows: Sequence[Row | str] | None = None,
    options: ScoringOptions | None = None,
    **overrides: Any,
) -> TofuEvaluation:
    """TOFU's numbers for `model` on `parts` ("forget" required; "retain", "real_authors", "world_facts",
    "holdout" optional), as TOFU / open-unlearning compute them.

    Keys: `forget_truth_ratio` (closer_to_1_better), `forget_probability`, `forget_rouge`, `extraction_strength`
    (forget); `forget_quality` when `retain_model_truth_ratios` (the retain model's per-item forget truth ratios,
    `forget_truth_ratios`) is given; `<part>_probability`, `<part>_rouge`, `<part>_truth_ratio` (true_better) for
    retain, real_authors and world_facts, and `model_utility` when all three are there; `mia_auc_min_k`,
    `privleak` and `privleak_reference_auc` (the retain model's Min-K% AUC, `min_k_auc`; 0.5 when not given, as
    open-unlearning) when holdout rows are given (`holdout_rows` or `parts["holdout"]`, QA dicts or MUSE texts).
    Scoring options (`ScoringOptions` fields) may be passed as keywords.
    """
    opts = scoring_options(options, overrides)
    unknown = sorted(set(parts) - set(TOFU_PARTS))
    if unknown:
        raise ValueError(f"unknown TOFU part(s) {', '.join(unknown)}; valid parts: {', '.join(TOFU_PARTS)}")
    if "forget" not in parts:
        raise ValueError("tofu_evaluation needs the forget part (rows of TOFU's forgetNN_perturbed.json)")
    holdout = holdout_rows if holdout_rows is not None else parts.get("holdout")
    for part, rows in parts.items():
        if part != "holdout":
            check_rows(part, rows)
    if holdout is not None and not all(isinstance(r, str) for r in holdout):
        check_rows("holdout", holdout)

    result = TofuEvaluation()
    forget = score_part(model, tokenizer, parts["forget"], options=opts)
    ratios = truth_ratios(forget.paraphrased_loss, forget.perturbed_loss)
    result["forget_truth_ratio"] = float(aggregate_truth_ratios(ratios, "closer_to_1_better"))
    result["forget_probability"] = float(answer_probability(forget.answer.loss))
    result["forget_rouge"] = _mean(forget.rouge)
    result["extraction_strength"] = _mean(forget.answer.extraction_strength)
    result.per_item["forget_truth_ratio"] = ratios.tolist()
    result.per_item["forget_min_k"] = forget.answer.min_k.tolist()
    if retain_model_truth_ratios is not None:
        reference = torch.as_tensor(retain_model_truth_ratios, dtype=torch.float64).reshape(-1)
        result["forget_quality"] = float(forget_quality(ratios, reference))

    for part in ("retain", "real_authors", "world_facts"):
        if part not in parts:
            continue
        rows = parts[part]
        scores = score_part(model, tokenizer, rows, paraphrased=part == "retain", options=opts)
        if part == "retain":  # TOFU: plain probability; truth ratio of the paraphrased answer
            result[f"{part}_probability"] = float(answer_probability(scores.answer.loss))
            correct = scores.paraphrased_loss
        else:  # the answer against its perturbed answers, for both
            result[f"{part}_probability"] = float(normalised_answer_probability(scores.answer.loss,
                                                                                scores.perturbed_loss))
            correct = scores.answer.loss
        result[f"{part}_rouge"] = _mean(scores.rouge)
        result[f"{part}_truth_ratio"] = float(aggregate_truth_ratios(truth_ratios(correct, scores.perturbed_loss),
                                                                     "true_better"))
    missing = [k for k in MODEL_UTILITY_KEYS if k not in result]
    if not missing:
        result["model_utility"] = float(model_utility(result))
    elif len(missing) < len(MODEL_UTILITY_KEYS):
        absent = [p for p in MODEL_UTILITY_PARTS if p not in parts]
        warnings.warn(f"model utility not computed: it needs the {', '.join(absent)} part(s) too", UserWarning,
                      stacklevel=2)

    if holdout is not None:
        holdout_scores = _rows_scores(model, tokenizer, holdout, opts)
        auc = mia_auc(forget.answer.min_k, holdout_scores.min_k)
        reference_auc = DEFAULT_REFERENCE_AUC if retain_model_privleak_auc is None else float(retain_model_privleak_auc)
        result["mia_auc_min_k"] = float(auc)
        result["privleak_reference_auc"] = reference_auc
        result["privleak"] = float(muse_privleak(auc, reference_auc))
        result.per_item["holdout_min_k"] = holdout_scores.min_k.tolist()
    return result
