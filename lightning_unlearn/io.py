"""Atomic outputs: a file or a folder appears whole or not at all, and what was there before is kept on failure.

Everything the project writes (reports, curvature checkpoints, saved models, the demo's run folder) goes through
these two context managers, so an interrupted or failed run never leaves a half-written output behind.
`check_output` refuses, before any work, an output folder the run must not replace (a user's files, the source
model or data) or cannot write; `run.json` (`write_manifest`, `mark_running`) says how the run that wrote a folder
ended, and marks an older output as not the current run's while a run is under way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
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
    then deleted), on failure it is deleted and `path` is left as it was.

    When `path` was taken by `claim_output` (the command's `--output`) and a folder with files appeared there during
    the run, it is replaced only if the claim allows overwriting (and the claim records it, for the command to say
    so); otherwise it is left as it is, the new folder is kept beside it under another name, and `UserInputError`
    names both."""
    path = Path(path)
    claim = _CLAIMS.get(_claim_key(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with _disk_errors(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _disk_errors(path):
            yield tmp
        if claim is not None and path.exists() and not claim.replaces_existing and not is_empty_output(path):
            if not claim.overwrite:
                from .errors import UserInputError

                kept = _free_name(path, ".new")
                os.replace(tmp, kept)
                raise UserInputError(
                    f"{claim.key} {str(path)!r} appeared during the run and holds files (another run or program wrote"
                    f" it); it was left as it is, and this run's output was saved to {str(kept)!r} instead: move it"
                    f" into place yourself, or run again with --overwrite to replace what is there")
            claim.replaced_during_run = True
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _free_name(path: Path, tag: str) -> Path:
    """A sibling of `path` that does not exist yet: `NAME.new-PID`, then `NAME.new-PID-2`, ..."""
    candidate, n = path.with_name(f"{path.name}{tag}-{os.getpid()}"), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}{tag}-{os.getpid()}-{n}")
    return candidate


#: errno values of a write that failed for lack of room: no space left, quota exceeded, a file size limit
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@contextlib.contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    """Turn a write that failed for lack of room (also as safetensors reports it) into `UserInputError` naming
    `path`; the atomic writers have removed what was half-written by the time the message is read."""
    try:
        yield
    except Exception as err:
        signs = [s for s in ("No space left on device", "Disk quota exceeded", "File too large") if s in str(err)]
        if isinstance(err, OSError) and err.errno in _NO_ROOM:
            why = err.strerror or os.strerror(err.errno)
        elif signs:  # safetensors and others wrap the OSError in their own error
            why = signs[0]
        else:
            raise
        from .errors import UserInputError

        raise UserInputError(f"cannot write {str(path)!r}: the disk is full or a size limit was reached ({why}); "
                             "nothing of it was written and what was there before is kept: free some space or "
                             "choose another output folder") from err


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
        if label is not None and label.startswith("model.") and other.is_dir() and other in resolved.parents:
            raise UserInputError(f"{key} {given!r} is inside {what}; the run must leave the source model's folder as "
                                 "it was, choose an output folder outside it")
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


class RunRecord:
    """The `run.json` of a run of the command (`fit`, `demo`): its fields (numbers and status only) and the marker it
    leaves on an earlier output while running (`mark_running`), then its final state there."""

    def __init__(self, command: str, output: Path | None = None) -> None:
        self.command = command
        self.output = output
        self.started: str | None = None
        self.status: str | None = None
        self.steps_accepted: int | None = None
        self.exit_code: int | None = None
        self.marked = False  # a `finished: false` marker was written into an existing output folder
        self.claim: OutputClaim | None = None  # the output taken for this run (`claim_output`)
        self.done = False  # the final run.json was written

    def fields(self, **extra: Any) -> dict[str, Any]:
        """The manifest's fields now (`ended` is the time now unless given)."""
        return {"command": self.command, "status": self.status, "steps_accepted": self.steps_accepted,
                "exit_code": self.exit_code, "started": self.started, "ended": utc_now(), **extra}

    def start(self) -> None:
        """The run begins: its start time, and the `finished: false` marker on an earlier output of ours."""
        self.started = utc_now()
        if self.output is not None:
            self.marked = mark_running(self.output, **self.fields(ended=None))

    def finish(self, **extra: Any) -> None:
        """The final run.json, where a marker was left (the run's new output holds its own)."""
        if self.marked and self.output is not None:
            write_manifest(self.output, **self.fields(finished=True, **extra))
        self.done = True

    def abort(self, err: BaseException, *, interrupted: bool, **extra: Any) -> None:
        """A run `interrupted` (a signal) or failed by `err`: the marker says so (still `finished: false`)."""
        if self.marked and not self.done and self.output is not None and self.output.is_dir():
            self.status = "interrupted" if interrupted else "failed"
            self.exit_code = getattr(err, "code", None) if interrupted else None
            with contextlib.suppress(OSError):
                write_manifest(self.output, **self.fields(finished=False, **extra))


# ---------------------------------------------------------------------------------------------------- claims
@dataclass
class OutputClaim:
    """An output folder taken by a run (`claim_output`): `atomic_directory` consults it when it saves there."""

    path: Path
    overwrite: bool
    #: a folder with files was there at the check (so --overwrite was given to replace it)
    replaces_existing: bool
    key: str = "--output"
    lock_fd: int | None = None
    #: set by `atomic_directory`: a folder with files appeared during the run and was replaced (--overwrite)
    replaced_during_run: bool = False


_CLAIMS: dict[Path, OutputClaim] = {}


def _claim_key(path: str | Path) -> Path:
    return Path(path).expanduser().absolute().resolve()


def claim_output(path: str | Path, overwrite: bool = False, *, key: str = "--output",
                 lock: bool = True) -> OutputClaim:
    """Take `path` (already accepted by `check_output`) for this run until `release_output`.

    `lock`: hold an exclusive lock on it (a lock file in the temporary folder, keyed by the resolved path; the system
    drops it when the process ends), so that a second run writing to the same output is refused at its start
    (`UserInputError` naming the other process) instead of both reporting success with one model lost. Where the
    file system has no locks the claim is made without one; the check at save time (see `atomic_directory`) still
    keeps a folder that appeared during the run unless `overwrite`."""
    resolved = _claim_key(path)
    fd = _lock(resolved, str(path), key) if lock else None
    claim = OutputClaim(path=resolved, overwrite=overwrite, key=key, lock_fd=fd,
                        replaces_existing=resolved.is_dir() and not is_empty_output(resolved))
    _CLAIMS[resolved] = claim
    return claim


def release_output(claim: OutputClaim | None) -> None:
    """End a claim: forget it and drop its lock (the lock file is removed)."""
    if claim is None:
        return
    if _CLAIMS.get(claim.path) is claim:
        del _CLAIMS[claim.path]
    if claim.lock_fd is not None:
        with contextlib.suppress(OSError):
            os.unlink(_lock_file(claim.path))
        with contextlib.suppress(OSError):
            os.close(claim.lock_fd)
        claim.lock_fd = None


def _lock_file(resolved: Path) -> Path:
    name = hashlib.sha256(str(resolved).encode()).hexdigest()[:32]
    return Path(tempfile.gettempdir()) / "lightning-unlearn-locks" / f"{name}.lock"


def _lock(resolved: Path, given: str, key: str) -> int | None:
    """An exclusive `flock` on the lock file of `resolved` (its descriptor), None where locks are not available;
    `UserInputError` naming the holder's process id when another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not a POSIX system
        return None
    from .errors import UserInputError

    path = _lock_file(resolved)
    try:
        path.parent.mkdir(mode=0o1777, exist_ok=True)
    except OSError:
        return None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise UserInputError(f"{key} {given!r} is being written by another run ({who}); two runs into one output"
                                 " would leave only one model: wait for that run to end, or choose another output "
                                 "folder") from None
        except OSError:
            os.close(fd)
            return None
        try:  # the last holder may have removed the file between our open and lock: lock the current one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
