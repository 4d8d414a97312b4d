"""Adapters for unlearning benchmarks: TOFU (question/answer pairs) and MUSE (raw text), from local files or the hub.

TOFU (Maini et al., 2024): configs `forget01/05/10` with matching `retain99/95/90` and `holdout01/05/10`, rows
`{"question", "answer"}`. Each pair becomes one text; its answer is the sensitive span (`span="offsets"`).
MUSE (Shi et al., 2024): raw text splits `forget`, `retain1`/`retain2` and `holdout`, rows `{"text"}`.
A local folder holds one file per config or split (`forget10.json`, `retain90.jsonl`, `forget.txt`, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset

from .datamodule import ForgetRetainDataModule
from .sources import FORMATS, load_source

TOFU_SPLITS = {"forget01": ("retain99", "holdout01"), "forget05": ("retain95", "holdout05"),
               "forget10": ("retain90", "holdout10")}
TOFU_TEMPLATE = "Question: {question}\nAnswer: {answer}"
MUSE_SPLITS = ("forget", "retain1", "retain2", "retain", "holdout")


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
