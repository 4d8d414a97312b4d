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

A reference file also records what its numbers depend on: the split, the scoring settings (`--max-length`, `--k`,
`--score-eos`), a sha256 of the tokenizer and sha256s of the forget / holdout rows and MUSE texts (hashes, never
text). `--reference` refuses (exit 2) a file whose values are malformed or whose record differs from this run, before
any model is loaded; a file from an older version without that record is used with a warning that it cannot be
checked. `--save-reference` with `--retain-model` is refused: it saves the statistics of `--model`.

The metrics are printed as one JSON object (numbers only, never a text of the data; NaN becomes null) and written to
`--output FILE` when given. Keys: see `metrics.qa_scoring.tofu_evaluation`, plus `<part>_rows_dropped` (rows without
an answer token within `--max-length`, left out of every number of their part) and, when `--tofu` has no holdout file
for the split, `mia_auc_min_k`, `privleak` and `privleak_reference_auc` as null (with a warning); MUSE's are
`muse_mia_auc_min_k`, `muse_privleak`, `muse_privleak_reference_auc`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import warnings
from collections.abc import Mapping, Sequence
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
                   help="write this model's forget truth ratios and Min-K%% AUCs, with the split, scoring settings and "
                        "hashes of the tokenizer and rows they depend on (run it on the retain model; not with "
                        "--retain-model)")
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


#: the scoring settings a reference's numbers depend on (`--max-length`, `--k`, `--score-eos`)
REFERENCE_SCORING = ("max_length", "k", "score_eos")
#: what a reference records besides its numbers, checked against the run that reads it
REFERENCE_RECORD = ("split", "scoring", "tokenizer_sha256", "forget_rows_sha256", "holdout_rows_sha256",
                    "muse_rows_sha256")
_FLAGS = {"max_length": "--max-length", "k": "--k", "score_eos": "--score-eos"}


def sha256_json(value: Any) -> str:
    """sha256 of a canonical JSON form (sorted keys): identifies rows or settings without holding them."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of what decides a tokenizer's ids: its vocabulary, merges, normalizer, pre-tokenizer, post-processor
    (a BOS it adds) and special token ids (not its class name or saved flags, which vary with the library version)."""
    record: dict[str, Any] = {"vocab": sorted(tokenizer.get_vocab().items()),
                              "special": {name: getattr(tokenizer, f"{name}_token_id", None)
                                          for name in ("bos", "eos", "pad", "unk")}}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        record.update({key: spec.get(key) for key in ("normalizer", "pre_tokenizer", "post_processor")})
        record["merges"] = (spec.get("model") or {}).get("merges")
    return sha256_json(record)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_reference_values(data: Mapping[str, Any], path: str) -> None:
    """Refuse malformed reference values (a hand-edited file): truth ratios must be a list of non-negative finite
    numbers or nulls with at least one number, AUCs null or a finite number in [0, 1]."""
    where = f"--reference {path!r}"
    fix = "re-save it with `lightning-unlearn evaluate --model <retain model> ... --save-reference FILE`"
    ratios = data.get("forget_truth_ratios")
    if ratios is not None:
        if not isinstance(ratios, list) or not ratios:
            raise UserInputError(f"{where}: forget_truth_ratios must be a non-empty list of numbers or nulls, got "
                                 f"{type(ratios).__name__}; {fix}")
        bad = [i for i, r in enumerate(ratios) if r is not None and not (_is_number(r) and math.isfinite(r)
                                                                          and r >= 0)]
        if bad:
            kinds = sorted({type(ratios[i]).__name__ if not _is_number(ratios[i]) else "negative or non-finite number"
                            for i in bad})
            raise UserInputError(f"{where}: forget_truth_ratios entries {bad[:10]} are not non-negative finite numbers "
                                 f"or null ({', '.join(kinds)}); {fix}")
        if all(r is None for r in ratios):
            raise UserInputError(f"{where}: forget_truth_ratios holds no number (all null: the retain model scored no "
                                 f"forget row); {fix}, with a --max-length that keeps the answers")
    for key in ("privleak_auc", "muse_privleak_auc"):
        value = data.get(key)
        if value is not None and not (_is_number(value) and math.isfinite(value) and 0.0 <= value <= 1.0):
            shown = f"{value:g}" if _is_number(value) else f"a {type(value).__name__}"
            raise UserInputError(f"{where}: {key} must be null or a finite number in [0, 1] (an AUC), got {shown}; "
                                 f"{fix}")
    scoring = data.get("scoring")
    if scoring is not None and not (isinstance(scoring, dict) and set(scoring) == set(REFERENCE_SCORING)):
        raise UserInputError(f"{where}: scoring must be an object with {', '.join(REFERENCE_SCORING)}; {fix}")
    for key in ("split", "tokenizer_sha256", "forget_rows_sha256", "holdout_rows_sha256", "muse_rows_sha256"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise UserInputError(f"{where}: {key} must be a string, got {type(data[key]).__name__}; {fix}")


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
    check_reference_values(data, path)
    return data


def reference_record(ns: argparse.Namespace, tokenizer: Any, tofu: Mapping[str, Any] | None,
                     muse: Mapping[str, Any] | None) -> dict[str, Any]:
    """What this run's reference numbers depend on (saved with them; checked against a `--reference`)."""
    record: dict[str, Any] = {"scoring": {"max_length": ns.max_length, "k": ns.k, "score_eos": ns.score_eos},
                              "tokenizer_sha256": tokenizer_sha256(tokenizer)}
    if tofu is not None:
        record.update(split=ns.split, forget_rows_sha256=sha256_json(tofu["forget"]),
                      holdout_rows_sha256=sha256_json(tofu["holdout"]) if "holdout" in tofu else None)
    if muse is not None:
        record["muse_rows_sha256"] = sha256_json({"forget": muse["forget"], "holdout": muse["holdout"]})
    return record


def _shown(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def check_reference_record(reference: Mapping[str, Any], record: Mapping[str, Any], path: str) -> None:
    """Refuse a reference saved for other data or settings than this run (naming what differs); warn when it records
    nothing to check against (a file from an older version)."""
    uses_tofu = "split" in record and (reference.get("forget_truth_ratios") is not None
                                       or reference.get("privleak_auc") is not None)
    uses_muse = "muse_rows_sha256" in record and reference.get("muse_privleak_auc") is not None
    checks: list[tuple[str, str]] = []  # (field, how it is named)
    if uses_tofu or uses_muse:
        checks += [("scoring", ""), ("tokenizer_sha256", "the tokenizer")]
    if uses_tofu:
        checks += [("split", "split"), ("forget_rows_sha256", "the forget rows")]
        if reference.get("privleak_auc") is not None and record.get("holdout_rows_sha256") is not None:
            checks.append(("holdout_rows_sha256", "the holdout rows"))  # used only when this run has a holdout
    if uses_muse:
        checks.append(("muse_rows_sha256", "the MUSE forget/holdout texts"))
    differ, unchecked = [], []
    for field, name in checks:
        if field not in reference:
            unchecked.append(field)
        elif field == "scoring":
            differ += [f"{_FLAGS[k]} {_shown(reference[field][k])} (this run: {_shown(record[field][k])})"
                       for k in REFERENCE_SCORING if reference[field][k] != record[field][k]]
        elif field == "split" and reference[field] != record[field]:
            differ.append(f"--split {reference[field]} (this run: {record[field]})")
        elif reference[field] != record[field]:
            differ.append(f"{name} (sha256 differs)")
    if differ:
        raise UserInputError(f"--reference {path!r} was saved for other data or settings than this run: "
                             f"{'; '.join(differ)}; its numbers do not apply: re-save it with `lightning-unlearn "
                             "evaluate --model <retain model> --save-reference FILE` with this run's --tofu/--muse, "
                             "--split, --max-length, --k, --score-eos and tokenizer")
    if unchecked:
        warnings.warn(f"--reference {path!r} does not record {', '.join(unchecked)} (saved by an older version): "
                      "whether it was saved with this run's data and settings cannot be checked; re-save it with "
                      "--save-reference to have it checked", UserWarning, stacklevel=2)


def _load(path: str, dtype: Any, device: Any):
    from .models import load_causal_lm

    return load_causal_lm(path, dtype=dtype, device=device)


def run(args: Sequence[str]) -> int:
    """Run the command; returns the exit status."""
    ns = parser().parse_args(list(args))
    if ns.tofu is None and ns.muse is None:
        raise UserInputError("lightning-unlearn evaluate: give --tofu FOLDER and/or --muse FOLDER (see --help)")
    if ns.save_reference and ns.retain_model:
        raise UserInputError("--save-reference writes the statistics of --model, not of --retain-model: drop one of "
                             "them (save the reference once with `lightning-unlearn evaluate --model <retain model> "
                             "--save-reference FILE`, then evaluate with --reference FILE)")
    if ns.save_reference and ns.output and Path(ns.save_reference).resolve() == Path(ns.output).resolve():
        raise UserInputError("--save-reference and --output must be different files")
    check_written_files(ns)

    from .data.adapters import TOFU_SPLITS, load_muse_privleak, load_tofu_eval
    from .data.tokenizer import check_tokenizer_fits, load_tokenizer
    from .metrics.answer_scoring import ScoringOptions
    from .metrics.privacy_leak import DEFAULT_REFERENCE_AUC, muse_privleak
    from .metrics.qa_scoring import min_k_auc, reference_statistics, tofu_evaluation
    from .metrics.utility_interval import model_utility_interval
    from .models import parse_dtype, resolve_device

    try:
        device = resolve_device(ns.device)
    except ValueError as err:
        raise UserInputError(f"--device: {err}") from None
    dtype = parse_dtype(ns.dtype) if ns.dtype else None
    options = ScoringOptions(batch_size=ns.batch_size, max_length=ns.max_length, k=ns.k, score_eos=ns.score_eos,
                             max_new_tokens=ns.max_new_tokens, generation_margin=ns.generation_margin)
    # read and check every input before loading a model: a missing file or a mismatched reference fails fast
    tofu = load_tofu_eval(ns.tofu, ns.split) if ns.tofu else None
    muse = load_muse_privleak(ns.muse) if ns.muse else None
    reference = _read_reference(ns.reference) if ns.reference else {}
    ratios = reference.get("forget_truth_ratios")
    if tofu is not None and ratios is not None and len(ratios) != len(tofu["forget"]):
        raise UserInputError(f"the reference has {len(ratios)} forget truth ratios but {ns.split} has "
                             f"{len(tofu['forget'])} questions: it was saved for another split; re-save it with "
                             f"--split {ns.split}")
    tokenizer = load_tokenizer(ns.tokenizer or ns.model)
    record = reference_record(ns, tokenizer, tofu, muse)
    if ns.reference:
        check_reference_record(reference, record, ns.reference)

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
    saved: dict[str, Any] = dict(record)
    if tofu is not None:
        ratios = reference.get("forget_truth_ratios")
        result = tofu_evaluation(model, tokenizer, tofu, options=options,
                                 retain_model_truth_ratios=[math.nan if r is None else r for r in ratios]
                                 if ratios is not None else None,
                                 retain_model_privleak_auc=reference.get("privleak_auc"))
        metrics.update({k: float(v) for k, v in result.items()})
        metrics.update({f"{part}_rows_dropped": n for part, n in result.rows_dropped.items()})
        if "model_utility" in result:  # how much of it is the choice of questions: 95 % bootstrap over the rows
            interval = model_utility_interval(result.per_item)
            metrics.update({"model_utility_low": interval["low"], "model_utility_high": interval["high"]})
        if "holdout" not in tofu:
            metrics.update({"mia_auc_min_k": None, "privleak": None, "privleak_reference_auc": None})
            warnings.warn(f"--tofu {ns.tofu!r} has no {TOFU_SPLITS[ns.split][1]}.json (TOFU's holdout for "
                          f"{ns.split}): mia_auc_min_k, privleak and privleak_reference_auc are null; add the hub's "
                          "holdout file to compute them", UserWarning, stacklevel=2)
        saved.update({"forget_truth_ratios": result.per_item["forget_truth_ratio"],
                      "privleak_auc": result.get("mia_auc_min_k")})
    if muse is not None:
        auc = min_k_auc(model, tokenizer, muse["forget"], muse["holdout"], options)
        ref_auc = reference.get("muse_privleak_auc")
        ref_auc = DEFAULT_REFERENCE_AUC if ref_auc is None else float(ref_auc)
        metrics.update({"muse_mia_auc_min_k": auc, "muse_privleak_reference_auc": ref_auc,
                        "muse_privleak": float(muse_privleak(auc, ref_auc))})
        saved["muse_privleak_auc"] = auc
    metrics = dict(sorted(metrics.items()))
    if ns.save_reference:
        _write_json(ns.save_reference, saved)
    if ns.output:
        _write_json(ns.output, metrics)
    print(json.dumps(_clean(metrics), indent=2, sort_keys=True))
    return 0
