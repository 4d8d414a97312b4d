"""Atomic outputs: a file or a folder appears whole or not at all, and what was there before is kept on failure.

Everything the project writes (reports, curvature checkpoints, saved models, the demo's run folder) goes through
these two context managers, so an interrupted or failed run never leaves a half-written output behind.
`check_output` refuses, before any work, an output folder the run must not replace (a user's files, the source
model or data) or cannot write; `run.json` (`write_manifest`, `mark_running`) says how the run that wrote a folder
ended, and marks an older output as not the current run's while a run is under way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (an existing folder is swapped out,
    then deleted), on failure it is deleted and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- output folders
#: the run manifest written into an output folder (numbers and status only, never data text)
MANIFEST = "run.json"
TOOL = "lightning-unlearn"


def is_previous_output(path: str | Path) -> bool:
    """Whether `path` is a folder holding our own `run.json` (an output of an earlier run of this tool)."""
    manifest = Path(path) / MANIFEST
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("tool") == TOOL


def is_empty_output(path: str | Path) -> bool:
    """An existing folder with nothing in it but (at most) our own `run.json`: an interrupted run's marker."""
    path = Path(path)
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    return not names or (names == {MANIFEST} and is_previous_output(path))


def check_output(path: str | Path, overwrite: bool = False, protected: Mapping[str, Any] | Iterable[Any] = (), *,
                 key: str = "--output") -> Path:
    """Refuse, before any work, an output folder the run must not (or cannot) write; returns it resolved.

    Refused: a plain file at `path`; an existing non-empty folder without `overwrite` (an empty one, or one holding
    only our interrupted run's `run.json`, is fine); `path` equal to or an ancestor of any `protected` path (the
    source model, the training data, the config: even `overwrite` never deletes those; a mapping names them, e.g.
    `{"model.model": ...}`); a folder whose parent cannot be created or written (checked by creating and removing a
    temporary file there). Raises `UserInputError` naming the problem and the fix."""
    from .errors import UserInputError

    given = str(path)
    path = Path(path).expanduser().absolute()
    resolved = path.resolve()
    items = protected.items() if isinstance(protected, Mapping) else ((None, p) for p in protected)
    for label, value in items:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            continue
        other = Path(value).expanduser().resolve()
        what = f"{label} {str(other)!r}" if label else repr(str(other))
        if resolved == other:
            raise UserInputError(f"{key} {given!r} is {what} itself; the run must not replace it, choose another "
                                 "output folder")
        if resolved in other.parents:
            raise UserInputError(f"{key} {given!r} contains {what}; writing the output there would delete it (even "
                                 "with --overwrite), choose another output folder")
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{key} {given!r} is a file, not a folder; give a folder path (the file is kept)")
    if path.is_dir() and not overwrite and not is_empty_output(path):
        raise UserInputError(f"{key} {given!r} already exists and is not empty; pass --overwrite to replace it, or "
                             "choose another output folder")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserInputError(f"{key} {given!r} cannot be created: {str(parent)!r} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".write-check.", dir=parent)
        try:
            os.close(fd)
        finally:
            os.unlink(name)
    except OSError as err:
        raise UserInputError(f"{key} {given!r} cannot be written: folder {str(parent)!r} is not writable "
                             f"({err.strerror or type(err).__name__}); choose another output folder") from None
    return path


def utc_now() -> str:
    """The time now, ISO 8601 in UTC to the second (the manifest's `started` / `ended`)."""
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_manifest(folder: str | Path, **fields: Any) -> Path:
    """Write `folder/run.json` atomically: `{"tool": "lightning-unlearn", **fields}` (numbers and status only)."""
    path = Path(folder) / MANIFEST
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"tool": TOOL, **fields}, indent=2) + "\n")
    return path


def mark_running(folder: str | Path, **fields: Any) -> bool:
    """Before a run: if `folder` is an earlier output of ours or an empty folder, write a `run.json` saying
    `finished: false, status: "running"`, so that an interrupted run leaves no older output that looks like its
    own. Returns whether it wrote the marker (nothing is written to a folder that is not ours, or that is absent)."""
    folder = Path(folder)
    if not folder.is_dir() or not (is_empty_output(folder) or is_previous_output(folder)):
        return False
    write_manifest(folder, **{**fields, "status": "running", "finished": False})
    return True
