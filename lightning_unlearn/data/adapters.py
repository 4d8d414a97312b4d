"""Adapters for unlearning benchmarks: TOFU (question/answer pairs) and MUSE (raw text), from local files or the hub.

TOFU (Maini et al., 2024): configs `forget01/05/10` with matching `retain99/95/90` and `holdout01/05/10`, rows
`{"question", "answer"}`. Each pair becomes one text; its answer is the sensitive span (`span="offsets"`).
MUSE (Shi et al., 2024): raw text splits `forget`, `retain1`/`retain2` and `holdout`, rows `{"text"}`.
A local folder holds one file per config or split (`forget10.json`, `retain90.jsonl`, `forget.txt`, ...).
For the benchmarks' metrics: `load_tofu_eval` reads TOFU's evaluation files (`forget10_perturbed.json`,
`retain_perturbed.json`, `real_authors_perturbed.json`, `world_facts_perturbed.json`, `holdout10.json`) as row
dicts, `load_muse_privleak` MUSE's privleak texts (`privleak/forget.json`, `privleak/holdout.json`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset

from ..errors import UserInputError
from .datamodule import ForgetRetainDataModule
from .sources import FORMATS, load_source

TOFU_SPLITS = {"forget01": ("retain99", "holdout01"), "forget05": ("retain95", "holdout05"),
               "forget10": ("retain90", "holdout10")}
TOFU_TEMPLATE = "Question: {question}\nAnswer: {answer}"


def _local_file(folder: Path, name: str) -> Path | None:
    for suffix in FORMATS:
        path = folder / f"{name}{suffix}"
        if path.exists():
            return path
    return None


def _load_part(source: str | Path, name: str, *, hub_config: str | None = None, required: bool = True):
    """One config/split of a benchmark: a file `name.*` in a local folder, else a hub dataset."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        path = _local_file(folder, name)
        if path is None:
            if required:
                raise FileNotFoundError(f"no {name} file in {str(folder)!r}; expected {name}.json, {name}.jsonl, "
                                        f"{name}.parquet, {name}.csv or {name}.txt")
            return None
        return load_source(path, name=name)
    if folder.exists() or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"benchmark folder {str(source)!r} does not exist; give a folder of split files or a "
                                "hub id")
    try:  # hub: TOFU names configs, MUSE names splits of its "raw" config
        if hub_config is None:
            return datasets.load_dataset(str(source), name, split="train")
        return datasets.load_dataset(str(source), hub_config, split=name)
    except Exception:
        if required:
            raise
        return None


def tofu_dataset(ds: Dataset, template: str = TOFU_TEMPLATE) -> Dataset:
    """Question/answer rows -> `text` plus `spans` (the answer's character span inside the text)."""
    for col in ("question", "answer"):
        if col not in ds.column_names:
            raise ValueError(f"not a TOFU file: no {col!r} column (columns: {ds.column_names}); TOFU rows are "
                             '{"question": ..., "answer": ...}')
    if "{answer}" not in template or not template.rstrip().endswith("{answer}"):
        raise ValueError("the TOFU template must end with {answer} so the answer span can be located")

    def convert(row: dict) -> dict:
        prefix = template.split("{answer}")[0].format(question=row["question"])
        text = prefix + row["answer"]
        return {"text": text, "spans": [[len(prefix), len(text)]]}

    return ds.map(convert, remove_columns=ds.column_names, load_from_cache_file=False, keep_in_memory=True)


def load_tofu(source: str | Path = "locuslab/TOFU", split: str = "forget10", *,
              template: str = TOFU_TEMPLATE) -> dict[str, Dataset]:
    """The forget, retain and (when present) holdout parts of a TOFU forget split as text datasets."""
    if split not in TOFU_SPLITS:
        raise ValueError(f"unknown TOFU split {split!r}; choose one of {', '.join(TOFU_SPLITS)}")
    retain_name, holdout_name = TOFU_SPLITS[split]
    parts = {"forget": _load_part(source, split), "retain": _load_part(source, retain_name),
             "holdout": _load_part(source, holdout_name, required=False)}
    return {k: tofu_dataset(v, template) for k, v in parts.items() if v is not None}


def load_muse(source: str | Path = "muse-bench/MUSE-News", *, retain: str = "retain1") -> dict[str, Dataset]:
    """The forget, retain (`retain1`, `retain2`, or a single `retain` file) and holdout parts of MUSE raw text."""
    if retain not in ("retain1", "retain2", "retain"):
        raise ValueError(f"unknown MUSE retain split {retain!r}; choose 'retain1', 'retain2' or 'retain'")
    parts = {"forget": _load_part(source, "forget", hub_config="raw"),
             "retain": _load_part(source, retain, hub_config="raw"),
             "holdout": _load_part(source, "holdout", hub_config="raw", required=False)}
    for name, ds in parts.items():
        if ds is not None and "text" not in ds.column_names:
            raise ValueError(f"not a MUSE {name} file: no 'text' column (columns: {ds.column_names})")
    return {k: v.select_columns(["text"]) for k, v in parts.items() if v is not None}


def tofu_datamodule(source: str | Path = "locuslab/TOFU", split: str = "forget10", *, span: str = "offsets",
                    template: str = TOFU_TEMPLATE, **kwargs: Any) -> ForgetRetainDataModule:
    """A `ForgetRetainDataModule` on a TOFU split; forget examples keep loss on their answers (`span="offsets"`)."""
    parts = load_tofu(source, split, template=template)
    kwargs.setdefault("test_fraction", 0.0)
    return ForgetRetainDataModule(forget=parts["forget"], retain=parts["retain"], holdout=parts.get("holdout"),
                                  span=span, **kwargs)


def muse_datamodule(source: str | Path = "muse-bench/MUSE-News", *, retain: str = "retain1",
                    **kwargs: Any) -> ForgetRetainDataModule:
    """A `ForgetRetainDataModule` on MUSE raw text (whole-example forgetting)."""
    parts = load_muse(source, retain=retain)
    kwargs.setdefault("test_fraction", 0.0)
    return ForgetRetainDataModule(forget=parts["forget"], retain=parts["retain"], holdout=parts.get("holdout"),
                                  **kwargs)


# ------------------------------------------------------------------------------------ evaluation files (metrics)
#: TOFU's evaluation parts -> the hub file (config) each is read from; the forget part is `<split>_perturbed`
TOFU_EVAL_FILES = {"retain": "retain_perturbed", "real_authors": "real_authors_perturbed",
                   "world_facts": "world_facts_perturbed"}
#: the fields the metrics need per part (TOFU's files may carry more, e.g. `paraphrased_question`, kept as they are)
TOFU_EVAL_FIELDS = {"forget": ("question", "answer", "paraphrased_answer", "perturbed_answer"),
                    "retain": ("question", "answer", "paraphrased_answer", "perturbed_answer"),
                    "real_authors": ("question", "answer", "perturbed_answer"),
                    "world_facts": ("question", "answer", "perturbed_answer"),
                    "holdout": ("question", "answer")}
MUSE_PRIVLEAK_SPLITS = ("forget", "holdout", "retain")


def read_json_records(path: str | Path) -> list[Any]:
    """The records of a JSON file: one JSON array, or JSON lines (one value per line, as the TOFU hub files are,
    despite their `.json` name). Errors name the file and line, never the content."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserInputError(f"{str(path)!r} is not valid JSON (line {err.lineno}, column {err.colno}: "
                                 f"{err.msg})") from None
        return list(data)
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserInputError(f"{str(path)!r} line {number} is not valid JSON ({err.msg}); expected a JSON "
                                     "array or one JSON object per line") from None
    return records


def _eval_file(folder: Path, name: str) -> Path | None:
    for suffix in (".json", ".jsonl"):
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def _tofu_rows(path: Path, part: str) -> list[dict[str, Any]]:
    required = TOFU_EVAL_FIELDS[part]
    rows = read_json_records(path)
    if not rows:
        raise UserInputError(f"{str(path)!r} has no rows")
    out = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise UserInputError(f"{str(path)!r} row {i} is a JSON {type(row).__name__}, not an object with fields "
                                 f"{', '.join(required)}")
        missing = [f for f in required if row.get(f) is None]
        if missing:
            raise UserInputError(f"{str(path)!r} row {i} has no {', '.join(repr(f) for f in missing)} field (it has: "
                                 f"{', '.join(sorted(row))}); the {part} part needs {', '.join(required)}")
        row = dict(row)
        if "perturbed_answer" in required and isinstance(row["perturbed_answer"], str):
            row["perturbed_answer"] = [row["perturbed_answer"]]
        for field in required:
            value = row[field]
            ok = (isinstance(value, list) and value and all(isinstance(v, str) for v in value)
                  if field == "perturbed_answer" else isinstance(value, str))
            if not ok:
                kind = "a non-empty list of strings" if field == "perturbed_answer" else "a string"
                raise UserInputError(f"{str(path)!r} row {i}: field {field!r} must be {kind}, got a JSON "
                                     f"{type(value).__name__}")
        out.append(row)
    return out


def load_tofu_eval(folder: str | Path, split: str = "forget10", *, holdout: bool = True) -> dict[str, list[dict]]:
    """TOFU's evaluation rows from a folder of the hub's files (`locuslab/TOFU`, JSON lines named `<config>.json`).

    Parts: `forget` (`<split>_perturbed.json`), `retain` (`retain_perturbed.json`), `real_authors`
    (`real_authors_perturbed.json`), `world_facts` (`world_facts_perturbed.json`), and `holdout`
    (`holdout<NN>.json`, when present and `holdout`). Rows are dicts with `question`, `answer`, `perturbed_answer`
    (a list; 5 per row on forget/retain, 3 on real authors/world facts) and, on forget/retain, `paraphrased_answer`;
    other fields are kept. The result feeds `metrics.qa_scoring.tofu_evaluation`. Missing files are named together.
    """
    if split not in TOFU_SPLITS:
        raise UserInputError(f"unknown TOFU split {split!r}; choose one of {', '.join(TOFU_SPLITS)}")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"TOFU folder {str(folder)!r} does not exist or is not a folder; download the hub's "
                                "files (forget10_perturbed.json, retain_perturbed.json, ...) into one folder")
    names = {"forget": f"{split}_perturbed", **TOFU_EVAL_FILES}
    paths = {part: _eval_file(root, name) for part, name in names.items()}
    missing = [f"{names[p]}.json" for p, path in paths.items() if path is None]
    if missing:
        raise FileNotFoundError(f"TOFU folder {str(folder)!r} lacks {', '.join(missing)} (TOFU's evaluation files, "
                                "as the hub names them)")
    parts = {part: _tofu_rows(path, part) for part, path in paths.items()}
    holdout_path = _eval_file(root, TOFU_SPLITS[split][1]) if holdout else None
    if holdout_path is not None:
        parts["holdout"] = _tofu_rows(holdout_path, "holdout")
    return parts


def _texts(path: Path, split: str) -> list[str]:
    if path.suffix == ".txt":  # MUSE's raw .txt files: documents separated by blank lines
        texts = [t.strip() for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    else:
        texts = []
        for i, record in enumerate(read_json_records(path), start=1):
            if isinstance(record, dict):
                record = record.get("text")
            if not isinstance(record, str):
                raise UserInputError(f"{str(path)!r} record {i} is not a text: MUSE files hold a JSON list of strings "
                                     'or objects with a "text" field')
            texts.append(record)
    if not texts:
        raise UserInputError(f"{str(path)!r} has no texts (the MUSE {split} split)")
    return texts


def load_muse_privleak(folder: str | Path) -> dict[str, list[str]]:
    """MUSE's privleak texts: `forget` and `holdout` (and `retain` when present) as lists of strings.

    Reads MUSE's layout (`muse_bench/load_data.py`: `<corpus>/privleak/{forget,retain,holdout}.json`, each a JSON
    list of strings) from `folder/privleak/` or `folder/` itself; JSON lines or `{"text": ...}` records also work,
    and so do the `raw/` splits (`forget.json` / `.txt`, documents separated by blank lines) as a last resort.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"MUSE folder {str(folder)!r} does not exist or is not a folder")
    for base in (root / "privleak", root, root / "raw"):
        found = {split: _eval_file(base, split) or (base / f"{split}.txt" if (base / f"{split}.txt").is_file()
                                                     else None) for split in MUSE_PRIVLEAK_SPLITS}
        if found["forget"] is not None and found["holdout"] is not None:
            return {split: _texts(path, split) for split, path in found.items() if path is not None}
    raise FileNotFoundError(f"MUSE folder {str(folder)!r} has no forget.json and holdout.json (looked in privleak/, "
                            "the folder itself and raw/); MUSE's load_data.py writes <corpus>/privleak/forget.json")
