"""`lightning-unlearn evaluate`: TOFU (and MUSE privleak) numbers of a saved model, as the field computes them.

    lightning-unlearn evaluate --model runs/unlearned --tofu data/tofu --split forget10 --retain-model runs/retain90
    lightning-unlearn evaluate --model runs/retain90 --tofu data/tofu --save-reference ref.json   # once
    lightning-unlearn evaluate --model runs/unlearned --tofu data/tofu --reference ref.json --output metrics.json

`--tofu` is a folder of TOFU's hub files (`forget10_perturbed.json`, `retain_perturbed.json`,
`real_authors_perturbed.json`, `world_facts_perturbed.json`, optionally `holdout10.json`; `data.adapters.
load_tofu_eval`); `--muse` a MUSE folder with `privleak/forget.json` and `privleak/holdout.json`
(`load_muse_privleak`). The retain model (retrained without the forget set) gives forget quality its reference truth
ratios and privleak its reference AUC: load it with `--retain-model`, or reuse its numbers saved by an earlier
`evaluate --model <retain model> --save-reference FILE` with `--reference FILE`. Without either, forget quality is
left out and privleak uses open-unlearning's default reference AUC of 0.5 (`privleak_reference_auc` says which).

The metrics are printed as one JSON object (numbers only, never a text of the data; NaN becomes null) and written to
`--output FILE` when given. Keys: see `metrics.qa_scoring.tofu_evaluation`; MUSE's are `muse_mia_auc_min_k`,
`muse_privleak`, `muse_privleak_reference_auc`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import UserInputError

HELP = "TOFU / MUSE metrics of a saved model (forget quality, model utility, privleak, ...) as JSON"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are a `UserInputError` (one line from `cli.main`, exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise UserInputError(f"{self.prog}: {message} (see --help)")


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {value}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lightning-unlearn evaluate", description=HELP)
    p.add_argument("--model", required=True, help="saved model folder (save_pretrained) or hub id")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's folder)")
    p.add_argument("--tofu", default=None, help="folder of TOFU's evaluation files")
    p.add_argument("--split", default="forget10", help="TOFU forget split: forget01, forget05 or forget10")
    p.add_argument("--muse", default=None, help="MUSE folder with privleak/forget.json and privleak/holdout.json")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--retain-model", default=None, help="the model retrained without the forget set (reference)")
    ref.add_argument("--reference", default=None, help="reference numbers saved with --save-reference")
    p.add_argument("--save-reference", default=None,
                   help="write this model's forget truth ratios and Min-K%% AUCs (run it on the retain model)")
    p.add_argument("--output", default=None, help="also write the metrics JSON to this file")
    p.add_argument("--batch-size", type=_positive(int), default=16)
    p.add_argument("--max-length", type=_positive(int), default=512, help="tokens per QA text / MUSE text")
    p.add_argument("--max-new-tokens", type=_positive(int), default=None,
                   help="greedy tokens per answer (default: the answer's length + --generation-margin; "
                        "open-unlearning uses 200)")
    p.add_argument("--generation-margin", type=int, default=32)
    p.add_argument("--k", type=_positive(float), default=0.4, help="Min-K%% fraction (default 0.4)")
    p.add_argument("--score-eos", action="store_true",
                   help="score the eos token with every answer (TOFU's finetuning convention)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default=None, help="load the models in this dtype (e.g. bfloat16)")
    return p


def _clean(value: Any) -> Any:
    """JSON-safe numbers: NaN / inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _write_json(path: str, data: dict[str, Any]) -> None:
    target = Path(path).expanduser()
    if target.is_dir():
        raise UserInputError(f"{path!r} is a folder; give a file name for the JSON")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")
    tmp.replace(target)


def check_written_files(ns: argparse.Namespace) -> None:
    """Refuse, before any work, an `--output` or `--save-reference` file inside a folder the command reads (the model,
    the tokenizer, the retain model, the TOFU or MUSE folder) or equal to a file it reads (`--reference`): the JSON
    would replace the model's `config.json`, its weights or the evaluation data."""
    inputs = {"--model": ns.model, "--tokenizer": ns.tokenizer, "--retain-model": ns.retain_model, "--tofu": ns.tofu,
              "--muse": ns.muse, "--reference": ns.reference}
    for key, target in (("--output", ns.output), ("--save-reference", ns.save_reference)):
        if not target:
            continue
        written = Path(target).expanduser().resolve()
        for name, value in inputs.items():
            if not value or not Path(value).expanduser().exists():
                continue  # a hub id, or not given
            read = Path(value).expanduser().resolve()
            if written == read or read in written.parents:
                raise UserInputError(f"{key} {target!r} is {'inside ' if written != read else ''}what {name} reads "
                                     f"({value!r}); writing the JSON there would replace an input: choose a file "
                                     "outside the model and data folders")


def _read_reference(path: str) -> dict[str, Any]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--reference: file {path!r} does not exist; write it with `lightning-unlearn "
                                "evaluate --model <retain model> ... --save-reference FILE`")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UserInputError(f"--reference: {path!r} is not JSON ({err.msg})") from None
    if not isinstance(data, dict) or not any(k in data for k in ("forget_truth_ratios", "privleak_auc",
                                                                  "muse_privleak_auc")):
        raise UserInputError(f"--reference: {path!r} holds none of forget_truth_ratios, privleak_auc, "
                             "muse_privleak_auc; write it with --save-reference")
    return data


def _load(path: str, dtype: Any, device: Any):
    from .models import load_causal_lm

    return load_causal_lm(path, dtype=dtype, device=device)


def run(args: Sequence[str]) -> int:
    """Run the command; returns the exit status."""
    ns = parser().parse_args(list(args))
    if ns.tofu is None and ns.muse is None:
        raise UserInputError("lightning-unlearn evaluate: give --tofu FOLDER and/or --muse FOLDER (see --help)")
    if ns.save_reference and ns.output and Path(ns.save_reference).resolve() == Path(ns.output).resolve():
        raise UserInputError("--save-reference and --output must be different files")
    check_written_files(ns)

    from .data.adapters import load_muse_privleak, load_tofu_eval
    from .data.tokenizer import check_tokenizer_fits, load_tokenizer
    from .metrics.answer_scoring import ScoringOptions
    from .metrics.privacy_leak import DEFAULT_REFERENCE_AUC, muse_privleak
    from .metrics.qa_scoring import min_k_auc, reference_statistics, tofu_evaluation
    from .models import parse_dtype, resolve_device

    try:
        device = resolve_device(ns.device)
    except ValueError as err:
        raise UserInputError(f"--device: {err}") from None
    dtype = parse_dtype(ns.dtype) if ns.dtype else None
    options = ScoringOptions(batch_size=ns.batch_size, max_length=ns.max_length, k=ns.k, score_eos=ns.score_eos,
                             max_new_tokens=ns.max_new_tokens, generation_margin=ns.generation_margin)
    # read every input before loading a model: a missing file fails fast
    tofu = load_tofu_eval(ns.tofu, ns.split) if ns.tofu else None
    muse = load_muse_privleak(ns.muse) if ns.muse else None
    reference = _read_reference(ns.reference) if ns.reference else {}

    tokenizer = load_tokenizer(ns.tokenizer or ns.model)
    model = _load(ns.model, dtype, device)
    check_tokenizer_fits(tokenizer, model)
    if ns.retain_model:
        retain = _load(ns.retain_model, dtype, device)
        check_tokenizer_fits(tokenizer, retain)
        if tofu is not None:
            stats = reference_statistics(retain, tokenizer, tofu, options=options)
            reference["forget_truth_ratios"] = stats["forget_truth_ratios"].tolist()
            reference["privleak_auc"] = stats["privleak_auc"]
        if muse is not None:
            reference["muse_privleak_auc"] = min_k_auc(retain, tokenizer, muse["forget"], muse["holdout"], options)
        del retain

    metrics: dict[str, Any] = {}
    saved: dict[str, Any] = {}
    if tofu is not None:
        ratios = reference.get("forget_truth_ratios")
        if ratios is not None and len(ratios) != len(tofu["forget"]):
            raise UserInputError(f"the reference has {len(ratios)} forget truth ratios but {ns.split} has "
                                 f"{len(tofu['forget'])} questions: it was saved for another split")
        result = tofu_evaluation(model, tokenizer, tofu, options=options,
                                 retain_model_truth_ratios=[math.nan if r is None else r for r in ratios]
                                 if ratios is not None else None,
                                 retain_model_privleak_auc=reference.get("privleak_auc"))
        metrics.update(result)
        saved = {"split": ns.split, "forget_truth_ratios": result.per_item["forget_truth_ratio"],
                 "privleak_auc": result.get("mia_auc_min_k")}
    if muse is not None:
        auc = min_k_auc(model, tokenizer, muse["forget"], muse["holdout"], options)
        ref_auc = reference.get("muse_privleak_auc")
        ref_auc = DEFAULT_REFERENCE_AUC if ref_auc is None else float(ref_auc)
        metrics.update({"muse_mia_auc_min_k": auc, "muse_privleak_reference_auc": ref_auc,
                        "muse_privleak": float(muse_privleak(auc, ref_auc))})
        saved["muse_privleak_auc"] = auc
    metrics = {k: float(v) for k, v in sorted(metrics.items())}
    if ns.save_reference:
        _write_json(ns.save_reference, saved)
    if ns.output:
        _write_json(ns.output, metrics)
    print(json.dumps(_clean(metrics), indent=2, sort_keys=True))
    return 0
