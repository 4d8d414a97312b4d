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

from lightning_unlearn.metrics.answer_probability import (
    answer_probability,
    normalised_answer_probability,
    normalised_probabilities,
)
from lightning_unlearn.metrics.answer_scoring import (
    AnswerScores,
    Row,
    ScoringOptions,
    generate_answers,
    length_limit,
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
    """Per-row numbers of one part (no text). `dropped` [N] marks the rows left without a scored answer, paraphrase
    or perturbed answer (truncated away at max_length, or empty): every statistic of such a row is NaN, so that
    every number of the part averages the same rows."""

    answer: AnswerScores
    paraphrased_loss: Tensor | None = None
    perturbed_loss: Tensor | None = None
    rouge: Tensor | None = None
    dropped: Tensor | None = None


def score_part(model: nn.Module, tokenizer: Any, rows: Sequence[Row], *, paraphrased: bool = True,
               perturbed: bool = True, generate: bool = True, options: ScoringOptions | None = None,
               **overrides: Any) -> PartScores:
    """Score the answers (and optionally the paraphrased answers, the perturbed answers and ROUGE-L recall of greedy
    answers) of TOFU rows; rows without a scored answer (see `PartScores.dropped`) are NaN everywhere."""
    opts = scoring_options(options, overrides)
    questions, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
    scores = PartScores(score_answers(model, tokenizer, questions, answers, opts))
    dropped = torch.isnan(scores.answer.loss)
    if paraphrased:
        scores.paraphrased_loss = score_answers(model, tokenizer, questions,
                                                [r["paraphrased_answer"] for r in rows], opts).loss
        dropped |= torch.isnan(scores.paraphrased_loss)
    if perturbed:
        scores.perturbed_loss = perturbed_losses(model, tokenizer, rows, opts)
        dropped |= torch.isnan(scores.perturbed_loss).all(-1)
    if generate:  # only the kept rows are answered: a dropped row has no answer to compare with
        kept = [i for i in range(len(rows)) if not dropped[i]]
        scores.rouge = torch.full((len(rows),), float("nan"), dtype=torch.float64)
        if kept:
            generated = generate_answers(model, tokenizer, [questions[i] for i in kept], [answers[i] for i in kept],
                                         opts)
            scores.rouge[kept] = rouge_l_recall_scores(generated, [answers[i] for i in kept])
            del generated
    for values in (scores.answer.loss, scores.answer.min_k, scores.answer.extraction_strength,
                   scores.paraphrased_loss, scores.perturbed_loss):
        if values is not None:
            values[dropped] = float("nan")
    scores.dropped = dropped
    return scores


def _check_not_all_dropped(part: str, dropped: Tensor, model: nn.Module, opts: ScoringOptions) -> None:
    """Refuse a part whose every row lost its scored answer: its numbers would all be NaN."""
    if dropped.numel() and bool(dropped.all()):
        limit = length_limit(model, opts)
        fix = "raise max_length (ScoringOptions.max_length, `--max-length` of `lightning-unlearn evaluate`)"
        if limit < opts.max_length:
            fix = (f"max_length={opts.max_length} is already capped at the model's {limit} positions: these rows do "
                   "not fit this model (shorten the questions, or use a model with more positions)")
        raise ValueError(f"every one of the {dropped.numel()} {part} rows was dropped: none has an answer token within "
                         f"max_length={limit} tokens (or every answer is empty), so the {part} numbers cannot be "
                         f"computed; {fix}")


def _warn_dropped(part: str, dropped: Tensor, model: nn.Module, opts: ScoringOptions) -> None:
    n = int(dropped.sum())
    if n:
        warnings.warn(f"{n} of {dropped.numel()} {part} rows were dropped from every {part} number: no answer token "
                      f"within max_length={length_limit(model, opts)} tokens (or an empty answer); raise max_length "
                      "(ScoringOptions.max_length, `--max-length`)", UserWarning, stacklevel=4)


def _row_kind(rows: Sequence[Row | str]) -> str:
    """"texts" (MUSE strings) or "QA rows" (dicts); refuses a mixture."""
    if all(isinstance(r, str) for r in rows):
        return "texts"
    if any(isinstance(r, str) for r in rows):
        raise ValueError("rows must be all QA dicts or all texts, not a mixture")
    return "QA rows"


def _rows_scores(model: nn.Module, tokenizer: Any, rows: Sequence[Row | str], opts: ScoringOptions) -> AnswerScores:
    """QA rows score their answer; plain strings (MUSE texts) score the whole text."""
    if _row_kind(rows) == "texts":
        return score_texts(model, tokenizer, list(rows), opts)
    return score_answers(model, tokenizer, [r["question"] for r in rows], [r["answer"] for r in rows], opts)


def forget_truth_ratios(model: nn.Module, tokenizer: Any, forget_rows: Sequence[Row],
                        options: ScoringOptions | None = None, **overrides: Any) -> Tensor:
    """Per-question truth ratios [N] of the forget rows (paraphrased vs perturbed answers): compute them once for
    the retain model and pass them to `tofu_evaluation(..., retain_model_truth_ratios=...)`."""
    check_rows("forget", forget_rows, ("question", "paraphrased_answer", "perturbed_answer"))
    opts = scoring_options(options, overrides)
    questions = [r["question"] for r in forget_rows]
    para = score_answers(model, tokenizer, questions, [r["paraphrased_answer"] for r in forget_rows], opts).loss
    ratios = truth_ratios(para, perturbed_losses(model, tokenizer, forget_rows, opts))
    _check_not_all_dropped("forget", torch.isnan(ratios), model, opts)
    return ratios


def min_k_auc(model: nn.Module, tokenizer: Any, forget_rows: Sequence[Row | str], holdout_rows: Sequence[Row | str],
              options: ScoringOptions | None = None, **overrides: Any) -> float:
    """AUC of the Min-K% Prob attack, forget (members) against holdout: the retain model's value is privleak's
    reference. Rows are TOFU QA dicts (the answer is scored) or MUSE texts (the whole text is scored), both sides of
    one kind: an answer's score and a whole text's are unlike things."""
    opts = scoring_options(options, overrides)
    forget_kind, holdout_kind = _row_kind(forget_rows), _row_kind(holdout_rows)
    if forget_kind != holdout_kind:
        raise ValueError(f"the forget rows are {forget_kind} but the holdout rows are {holdout_kind}: the Min-K% AUC "
                         "would compare an answer's score with a whole text's; give both sides of one kind (TOFU: "
                         "QA rows of forgetNN_perturbed.json and holdoutNN.json; MUSE: privleak/forget.json and "
                         "holdout.json texts)")
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
    (pass the retain model's as `retain_model_truth_ratios`), `forget_min_k`, `holdout_min_k`, ...; `rows_dropped`
    the number of rows of each scored part left out of its numbers (no answer token within max_length)."""

    def __init__(self, *args: Any, per_item: Mapping[str, list[float]] | None = None,
                 rows_dropped: Mapping[str, int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.per_item: dict[str, list[float]] = dict(per_item or {})
        self.rows_dropped: dict[str, int] = dict(rows_dropped or {})


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
    open-unlearning) when holdout rows are given (`holdout_rows` or `parts["holdout"]`, QA dicts like the forget
    rows). Scoring options (`ScoringOptions` fields) may be passed as keywords.

    A row left without a scored answer (truncated away at max_length, or empty) is dropped from every number of its
    part (a warning says how many; `rows_dropped` counts them); a part that loses every row is an error naming
    max_length.
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
    if holdout is not None:
        if _row_kind(holdout) == "texts":
            raise ValueError("the holdout rows are texts (MUSE) but the forget rows are TOFU QA rows: the Min-K% AUC "
                             "would compare a whole text's score with an answer's; pass QA holdout rows (TOFU's "
                             "holdoutNN.json), and compute MUSE's privleak with min_k_auc on MUSE's forget and "
                             "holdout texts")
        check_rows("holdout", holdout)

    result = TofuEvaluation()

    def scored(part: str, scores: PartScores) -> PartScores:
        _check_not_all_dropped(part, scores.dropped, model, opts)
        _warn_dropped(part, scores.dropped, model, opts)
        result.rows_dropped[part] = int(scores.dropped.sum())
        return scores

    forget = scored("forget", score_part(model, tokenizer, parts["forget"], options=opts))
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
        scores = scored(part, score_part(model, tokenizer, rows, paraphrased=part == "retain", options=opts))
        if part == "retain":  # TOFU: plain probability; truth ratio of the paraphrased answer
            result[f"{part}_probability"] = float(answer_probability(scores.answer.loss))
            probabilities = torch.exp(-scores.answer.loss.to(torch.float64))
            correct = scores.paraphrased_loss
        else:  # the answer against its perturbed answers, for both
            result[f"{part}_probability"] = float(normalised_answer_probability(scores.answer.loss,
                                                                                scores.perturbed_loss))
            probabilities = normalised_probabilities(scores.answer.loss, scores.perturbed_loss)
            correct = scores.answer.loss
        ratios_part = truth_ratios(correct, scores.perturbed_loss)
        result[f"{part}_rouge"] = _mean(scores.rouge)
        result[f"{part}_truth_ratio"] = float(aggregate_truth_ratios(ratios_part, "true_better"))
        # each component is the mean of these per-row values (NaN: a row left out), in the rows' order: what
        # `model_utility_interval` resamples
        result.per_item[f"{part}_probability"] = probabilities.tolist()
        result.per_item[f"{part}_rouge"] = scores.rouge.to(torch.float64).tolist()
        result.per_item[f"{part}_truth_ratio"] = torch.clamp(1.0 - ratios_part, min=0.0).tolist()
    missing = [k for k in MODEL_UTILITY_KEYS if k not in result]
    if not missing:
        result["model_utility"] = float(model_utility(result))
    elif len(missing) < len(MODEL_UTILITY_KEYS):
        absent = [p for p in MODEL_UTILITY_PARTS if p not in parts]
        warnings.warn(f"model utility not computed: it needs the {', '.join(absent)} part(s) too", UserWarning,
                      stacklevel=2)

    if holdout is not None:
        holdout_scores = _rows_scores(model, tokenizer, holdout, opts)
        scored("holdout", PartScores(holdout_scores, dropped=torch.isnan(holdout_scores.min_k)))
        auc = mia_auc(forget.answer.min_k, holdout_scores.min_k)
        reference_auc = DEFAULT_REFERENCE_AUC if retain_model_privleak_auc is None else float(retain_model_privleak_auc)
        result["mia_auc_min_k"] = float(auc)
        result["privleak_reference_auc"] = reference_auc
        result["privleak"] = float(muse_privleak(auc, reference_auc))
        result.per_item["holdout_min_k"] = holdout_scores.min_k.tolist()
    return result
