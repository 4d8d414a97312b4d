"""Load text sources: local files (txt, jsonl, json, csv, parquet), `save_to_disk` folders, `datasets` objects,
hub names, or plain lists of strings, as a `datasets.Dataset` (map-style) or `datasets.IterableDataset` (streaming).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import datasets
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

from ..errors import UserInputError

Source = Union[str, Path, Dataset, IterableDataset, Sequence[str]]  # noqa: UP007 (a runtime alias on 3.10)
AnyDataset = Union[Dataset, IterableDataset]  # noqa: UP007

# file suffix -> `datasets` packaged builder
FORMATS = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".jsonl": "json", ".json": "json", ".ndjson": "json",
    ".csv": "csv", ".tsv": "csv",
    ".parquet": "parquet", ".pq": "parquet",
}
TEXT_BUILDERS = ("text", "json", "csv")  # formats read as characters, so they must be valid UTF-8
#: how much of a streamed file is checked for UTF-8 before streaming starts (a map-style file is checked whole)
STREAM_UTF8_CHECK_BYTES = 256 * 2**20
#: the prefix that asks for a Hugging Face Hub dataset explicitly ("hub:owner/name"); a forget or holdout source
#: string is read as a hub id only with it (a bare string there is more likely a text given where a list was meant)
HUB_PREFIX = "hub:"
#: roles whose source strings may be texts (secrets): never resolved as a hub id without `HUB_PREFIX`, never echoed
SECRET_ROLES = ("forget", "holdout")
#: a Hugging Face Hub repo id: `name` or `owner/name`, alphanumerics, '-', '_', '.', at most 96 characters, not
#: starting or ending with '-' or '.', no '--' or '..' (the hub's own rule, checked here so that nothing is sent)
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/)?[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?$")


def describe(source: Any, name: str = "source") -> str:
    """`name` and where the data comes from, for error messages: "train file '/x/d.jsonl'", "forget data (a list
    of texts)". Never the data itself."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        kind = "folder" if path.is_dir() else "file" if path.exists() or _looks_local(source) else "dataset"
        return f"{name} {kind} {str(source)!r}"
    if isinstance(source, (Dataset, IterableDataset, DatasetDict, IterableDatasetDict)):
        return f"{name} data (a datasets.{type(source).__name__})"
    return f"{name} data (a list of texts)"


def check_utf8(path: str | Path, name: str = "source", limit: int | None = None,
               chunk_size: int = 16 * 2**20) -> None:
    """Raise `UserInputError` naming the file, line and byte offset of the first invalid UTF-8 byte (its text is
    not shown). Reads at most `limit` bytes (None: the whole file) in chunks."""
    line, base, pending, read = 1, 0, b"", 0
    with open(path, "rb") as f:
        while True:
            size = chunk_size if limit is None else min(chunk_size, limit - read)
            if size <= 0:  # the limit: a character cut by it is not an error
                return
            chunk = f.read(size)
            read += len(chunk)
            data = pending + chunk
            if not data:
                return
            try:
                data.decode("utf-8")
                good = len(data)
            except UnicodeDecodeError as err:
                truncated = chunk and err.end == len(data) and "unexpected end" in err.reason
                if not truncated:
                    bad = line + data.count(b"\n", 0, err.start)
                    raise UserInputError(
                        f"{name} file {str(path)!r} is not valid UTF-8: line {bad}, byte offset {base + err.start} "
                        f"(byte 0x{data[err.start]:02x}, {err.reason}); re-encode the file as UTF-8 (e.g. "
                        "`iconv -f latin1 -t utf-8`) or fix that line") from None
                good = err.start  # a character split across chunks: decode it with the next one
            line += data.count(b"\n", 0, good)
            base += good
            pending = data[good:]
            if not chunk:  # the end of the file
                return


def _looks_local(source: str | Path) -> bool:
    text = str(source)
    return isinstance(source, Path) or text.startswith((".", "/", "~")) or Path(text).suffix.lower() in FORMATS \
        or Path(text).exists()


def is_hub_id(text: str) -> bool:
    """Whether `text` is a valid Hugging Face Hub repo id (`name` or `owner/name`): anything else is never sent to
    the hub (a text given as a source would go into a URL, the logs and the error)."""
    return len(text) <= 96 and "--" not in text and ".." not in text and _HUB_ID.match(text) is not None


def _not_a_source(name: str, hub: bool) -> UserInputError:
    """The refusal of a source string that is neither an existing path nor a hub id; never repeats the string."""
    if name in SECRET_ROLES:
        what = (f"{name}: the given string is not an existing file or folder (the value is not shown: a {name} source "
                "given as one string may be a text); give the path of an existing file, a list of texts ("
                f"{name}=['a text'] for one text; in a config, a YAML list), or {HUB_PREFIX}<owner>/<name> for a "
                "Hugging Face Hub dataset")
    else:
        hint = (f"a hub id must be <name> or <owner>/<name> (letters, digits, '-', '_', '.'), or {HUB_PREFIX}<id>"
                if not hub else "check the path")
        what = (f"{name}: the given string is neither an existing file or folder nor a valid Hugging Face Hub "
                f"dataset id (the value is not shown: it may be a text given where a list of texts was meant); give "
                f"the path of an existing file, a list of texts, or a hub dataset id ({hint})")
    return UserInputError(what)


def _pick_split(ds, split: str, where: str):
    if isinstance(ds, (DatasetDict, IterableDatasetDict)):
        if split not in ds:
            raise UserInputError(f"{where} has splits {sorted(ds)} but not {split!r}; pass source_split=<one of them> "
                                 "to the data module (data.source_split in a config; split= for load_source)")
        return ds[split]
    return ds


def load_source(source: Source, *, split: str = "train", streaming: bool = False, name: str = "source",
                text_column: str = "text") -> AnyDataset:
    """Load `source` as one split of a `datasets` dataset; `streaming=True` returns an `IterableDataset`.

    `name` labels error messages ("train", "forget", ...) and decides how a string that is no existing path is read:
    for "forget" and "holdout" (whose strings may be texts, i.e. secrets) it is refused without being repeated unless
    it is `hub:<owner>/<name>`; elsewhere a valid hub id is loaded from the hub. `text_column` is read as text in a
    CSV file (not as numbers); a `.txt` file loses its byte order mark and its blank lines.
    """
    if isinstance(source, IterableDataset):
        return source
    if isinstance(source, Dataset):
        return source.to_iterable_dataset() if streaming else source
    if isinstance(source, (DatasetDict, IterableDatasetDict)):
        return load_source(_pick_split(source, split, f"{name} dataset"), streaming=streaming, name=name)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        texts = list(source)
        bad = next(((i, t) for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"{name}: a list source must hold strings (the texts); item {bad[0]} is a "
                            f"{type(bad[1]).__name__}")
        ds = Dataset.from_dict({"text": texts})
        return ds.to_iterable_dataset() if streaming else ds
    if not isinstance(source, (str, Path)):
        raise TypeError(f"{name}: unsupported source type {type(source).__name__}; give a path, a dataset name, "
                        "a datasets.Dataset or a list of strings")
    text = str(source)
    hub = isinstance(source, str) and text.startswith(HUB_PREFIX)
    if hub or (isinstance(source, str) and not Path(text).expanduser().exists()
               and (name in SECRET_ROLES or not _looks_local(source))):
        repo = text[len(HUB_PREFIX):] if hub else text
        if name in SECRET_ROLES and not hub or not is_hub_id(repo):  # checked before anything is sent
            raise _not_a_source(name, hub)
        try:
            return datasets.load_dataset(repo, split=split, streaming=streaming)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{name}: {repo!r} is neither a local file nor a reachable dataset; "
                                    "check the path or the dataset name (the hub needs a connection)") from err
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{name} file {str(path)!r} does not exist; check the path")
    if path.is_dir():
        return _load_dir(path, split=split, streaming=streaming, name=name)
    builder = FORMATS.get(path.suffix.lower())
    if builder is None:
        raise UserInputError(f"{name} file {str(path)!r} has an unreadable format {path.suffix!r}; "
                             f"use one of {', '.join(sorted(FORMATS))}, or load it yourself into a datasets.Dataset")
    if path.stat().st_size == 0:  # `datasets` cannot infer a schema from nothing
        return _empty(streaming)
    if builder in TEXT_BUILDERS:  # else `datasets` fails later, at the first access, without naming the file
        check_utf8(path, name, limit=STREAM_UTF8_CHECK_BYTES if streaming else None)
    kwargs: dict[str, Any] = {"sep": "\t"} if path.suffix.lower() == ".tsv" else {}
    if builder == "text":
        kwargs["encoding"] = "utf-8-sig"  # a byte order mark is not part of the first text
    if builder == "csv":
        kwargs["converters"] = {text_column: _csv_text}  # "1234" stays text, "0456" keeps its 0
    try:
        ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, streaming=streaming, **kwargs)
        if builder == "text":  # one example per line: a blank line is no example
            ds = ds.filter(_has_text, **({} if streaming else {"load_from_cache_file": False, "keep_in_memory": True}))
        if not streaming:
            return ds
        next(iter(ds), None)  # streaming reads lazily: surface a broken file now, not in the middle of training
        return ds
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError, StopIteration) as err:
        if "corresponds to no data" in str(err):  # blank lines only, or a CSV header without rows
            return _empty(streaming)
        bad = json_error_line(path) if builder == "json" else None
        where = f": line {bad[0]} is not valid JSON ({bad[1]})" if bad else f" ({type(err).__name__})"
        raise UserInputError(f"{name} file {str(path)!r} could not be read as {builder}{where}; check that the file "
                             f"is valid {builder} or give it the right suffix") from err


def _csv_text(cell: str) -> str | None:
    """A CSV cell of the text column as text (an empty cell is missing, as pandas reads it)."""
    return cell if cell != "" else None


def _has_text(row: dict) -> bool:
    """A line of a `.txt` file that is not blank (only whitespace)."""
    return bool(row["text"].strip())


def json_error_line(path: str | Path) -> tuple[int, str] | None:
    """The line number and the parser's complaint (never the text) of the first invalid JSON in a file that
    `datasets` failed to read: JSON Lines are checked line by line; a file whose first line is not JSON on its own
    is parsed as one document. None when the JSON is valid (the problem is elsewhere, e.g. mixed column types).
    Only called after a failure, so the extra read costs nothing on good files."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            first = True
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except ValueError as err:
                    if not first:
                        return number, getattr(err, "msg", "invalid JSON")
                    break  # perhaps one (pretty-printed) document: parse it whole below
                first = False
            else:
                return None
        with open(path, encoding="utf-8-sig") as f:
            json.load(f)
    except json.JSONDecodeError as err:
        return err.lineno, err.msg
    except (OSError, ValueError):
        return None
    return None


def _empty(streaming: bool) -> AnyDataset:
    """An empty text dataset (the data module says which source is empty)."""
    ds = Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")}))
    return ds.to_iterable_dataset() if streaming else ds


def _load_dir(path: Path, *, split: str, streaming: bool, name: str) -> AnyDataset:
    """A folder written by `save_to_disk` (Dataset or DatasetDict), else a folder of data files for `load_dataset`."""
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        ds = _pick_split(datasets.load_from_disk(str(path)), split, f"{name} folder {str(path)!r}")
        return ds.to_iterable_dataset() if streaming else ds
    try:
        return _pick_split(datasets.load_dataset(str(path), streaming=streaming), split, f"{name} folder {str(path)!r}")
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
        raise UserInputError(f"{name} folder {str(path)!r} is neither a save_to_disk dataset nor a folder of data "
                             "files; give a file path or a folder written by Dataset.save_to_disk") from err


def columns_of(ds: AnyDataset) -> list[str]:
    """The column names (an `IterableDataset` with unknown features: those of its first row)."""
    columns = ds.column_names
    if columns is None:
        first = next(iter(ds), None)
        columns = list(first) if first else []
    return list(columns)


def text_column_of(ds: AnyDataset, text_column: str, name: str = "source") -> str:
    """Check that `text_column` exists and return it; never guesses another column (explicit is safer: a wrong
    guess would unlearn or keep the wrong text)."""
    columns = columns_of(ds)
    if text_column in columns:
        return text_column
    features = getattr(ds, "features", None) or {}
    strings = [c for c, f in features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    hint = f" (string columns: {', '.join(strings)})" if strings else ""
    if "input_ids" in columns:
        raise UserInputError(
            f"{name} is pre-tokenised (an input_ids column, no {text_column!r} column; columns: {columns}): the data "
            "module tokenises every split itself, with one tokenizer, so give the texts (a text column, or "
            f"text_column=<name>){hint}")
    raise UserInputError(f"{name} has no text column {text_column!r} (columns: {columns}); pass "
                         f"text_column=<name> to say which column holds the text{hint}")
