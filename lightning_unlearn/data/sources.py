"""Load text sources: local files (txt, jsonl, json, csv, parquet), `save_to_disk` folders, `datasets` objects,
hub names, or plain lists of strings, as a `datasets.Dataset` (map-style) or `datasets.IterableDataset` (streaming).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Union

import datasets
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

Source = Union[str, Path, Dataset, IterableDataset, Sequence[str]]  # noqa: UP007 (a runtime alias on 3.10)
AnyDataset = Union[Dataset, IterableDataset]  # noqa: UP007

# file suffix -> `datasets` packaged builder
FORMATS = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".jsonl": "json", ".json": "json", ".ndjson": "json",
    ".csv": "csv", ".tsv": "csv",
    ".parquet": "parquet", ".pq": "parquet",
}


def _looks_local(source: str | Path) -> bool:
    text = str(source)
    return isinstance(source, Path) or text.startswith((".", "/", "~")) or Path(text).suffix.lower() in FORMATS \
        or Path(text).exists()


def _pick_split(ds, split: str, where: str):
    if isinstance(ds, (DatasetDict, IterableDatasetDict)):
        if split not in ds:
            raise ValueError(f"{where} has splits {sorted(ds)} but not {split!r}; pass split=<one of them>")
        return ds[split]
    return ds


def load_source(source: Source, *, split: str = "train", streaming: bool = False, name: str = "source") -> AnyDataset:
    """Load `source` as one split of a `datasets` dataset; `streaming=True` returns an `IterableDataset`.

    `name` only labels error messages ("train", "forget", ...).
    """
    if isinstance(source, IterableDataset):
        return source
    if isinstance(source, Dataset):
        return source.to_iterable_dataset() if streaming else source
    if isinstance(source, (DatasetDict, IterableDatasetDict)):
        return load_source(_pick_split(source, split, f"{name} dataset"), streaming=streaming, name=name)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        texts = list(source)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError(f"{name}: a list source must hold strings (the texts); got {type(texts[0]).__name__}")
        ds = Dataset.from_dict({"text": texts})
        return ds.to_iterable_dataset() if streaming else ds
    if not isinstance(source, (str, Path)):
        raise TypeError(f"{name}: unsupported source type {type(source).__name__}; give a path, a dataset name, "
                        "a datasets.Dataset or a list of strings")
    if not _looks_local(source):  # a hub name (or a datasets script/repo id)
        try:
            return datasets.load_dataset(str(source), split=split, streaming=streaming)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{name}: {str(source)!r} is neither a local file nor a reachable dataset; "
                                    "check the path or the dataset name (the hub needs a connection)") from err
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{name} file {str(path)!r} does not exist; check the path")
    if path.is_dir():
        return _load_dir(path, split=split, streaming=streaming, name=name)
    builder = FORMATS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{name} file {str(path)!r} has an unreadable format {path.suffix!r}; "
                         f"use one of {', '.join(sorted(FORMATS))}, or load it yourself into a datasets.Dataset")
    if path.stat().st_size == 0:  # `datasets` cannot infer a schema from nothing
        ds = Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")}))
        return ds.to_iterable_dataset() if streaming else ds
    kwargs = {"sep": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, streaming=streaming, **kwargs)
        if not streaming:
            return ds
        next(iter(ds), None)  # streaming reads lazily: surface a broken file now, not in the middle of training
        return ds
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError, StopIteration) as err:
        raise ValueError(f"{name} file {str(path)!r} could not be read as {builder} ({type(err).__name__}); "
                         f"check that the file is valid {builder} or give it the right suffix") from err


def _load_dir(path: Path, *, split: str, streaming: bool, name: str) -> AnyDataset:
    """A folder written by `save_to_disk` (Dataset or DatasetDict), else a folder of data files for `load_dataset`."""
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        ds = _pick_split(datasets.load_from_disk(str(path)), split, f"{name} folder {str(path)!r}")
        return ds.to_iterable_dataset() if streaming else ds
    try:
        return _pick_split(datasets.load_dataset(str(path), streaming=streaming), split, f"{name} folder {str(path)!r}")
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
        raise ValueError(f"{name} folder {str(path)!r} is neither a save_to_disk dataset nor a folder of data files; "
                         "give a file path or a folder written by Dataset.save_to_disk") from err


def text_column_of(ds: AnyDataset, text_column: str, name: str = "source") -> str:
    """Check that `text_column` exists (or pick the only string column) and return it."""
    columns = ds.column_names
    if columns is None:  # an IterableDataset with unknown features: peek at the first row
        first = next(iter(ds), None)
        columns = list(first) if first else []
    if text_column in columns:
        return text_column
    features = getattr(ds, "features", None) or {}
    strings = [c for c, f in features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    raise ValueError(f"{name} has no text column {text_column!r} (columns: {columns}); pass text_column=<name>")
