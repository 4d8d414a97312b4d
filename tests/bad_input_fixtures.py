"""A user's project on disk for the bad-input catalogue: a saved tiny model, its training data and a working CLI
config, plus a byte-level snapshot to prove that nothing the user owns was changed by a failed (or refused) run."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from text_fixtures import char_tokenizer

from lightning_unlearn.errors import EXIT_USER_ERROR

FORGET_IDS = ["doc-0", "doc-3", "doc-7"]
#: a run where every trial is rolled back: no holdout target, a huge first-order step, no retain increase allowed
NOTHING_ACCEPTED = ["--model.method", "gradient_ascent", "--model.holdout_batches", "0",
                    "--model.max_retain_increase", "0", "--model.method_kwargs", '{"lr": 10.0}']
#: a run that never stops by itself (tiny accepted steps, no target, no budget): stopped by a signal
ENDLESS = ["--model.method", "gradient_ascent", "--model.holdout_batches", "0", "--model.max_retain_increase", "null",
           "--model.method_kwargs", '{"lr": 1e-7}', "--trainer.max_steps", "100000", "--trainer.limit_val_batches", "0"]
_PROJECTS: list[Project] = []


def created_projects() -> list[Project]:
    """Every project `make_project` made in this process (for a check after each case)."""
    return list(_PROJECTS)
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()


@dataclass
class Project:
    """Paths of a user's project: `model` (a saved HF model + tokenizer), `data` (train.jsonl), `config` (a
    working `lightning-unlearn fit` config whose output is `output`)."""

    root: Path
    model: Path
    data: Path
    config: Path
    output: Path
    initial: dict[str, str] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        return yaml.safe_load(self.config.read_text())

    def write_config(self, name: str, **changes: Any) -> Path:
        """A copy of the config with dotted keys changed (`**{"model.damping": 1.0}`); None removes a key."""
        config = self.settings()
        for dotted, value in changes.items():
            *parents, key = dotted.split(".")
            node = config
            for part in parents:
                node = node.setdefault(part, {})
            if value is None:
                node.pop(key, None)
            else:
                node[key] = value
        path = self.root / name
        path.write_text(yaml.safe_dump(config))
        return path

    def snapshot(self) -> dict[str, str]:
        """sha256 of every file under the model and data folders (the things a run must never touch)."""
        return snapshot(self.model, self.data.parent)

    def changed_files(self) -> list[str]:
        """The user's files (those present when the project was made) that are gone or changed since then."""
        now = self.snapshot()
        return [path for path, digest in self.initial.items() if now.get(path) != digest]


def snapshot(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def texts(n: int = 36) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        words = " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(6))
        rows.append({"id": f"doc-{i}", "text": f"record {i}: {words}. code {i * 7919 % 1000:03d}."})
    return rows


def make_project(root: Path, *, layers: int = 1, hidden: int = 32) -> Project:
    """Save a tiny GPT-2 + char tokenizer and its training data under `root`; write a working fit config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = Path(root)
    tok = char_tokenizer()
    model_dir, data_dir = root / "source" / "model", root / "source" / "data"
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=2,
                                       n_positions=64, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    data_dir.mkdir(parents=True)
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts()))
    (data_dir / "notes.txt").write_text("the user's own notes\n")
    output = root / "out" / "model"
    config = {
        "seed_everything": 0,
        "model": {"model": str(model_dir), "method": "newton", "curvature": "kfac", "curvature_data": "retain",
                  "curvature_batches": 2},
        "data": {"train": str(data_dir / "train.jsonl"), "id_column": "id", "forget_ids": list(FORGET_IDS),
                 "tokenizer": str(model_dir), "max_length": 64, "batch_size": 8, "forget_batch_size": 8},
        "trainer": {"max_steps": 2, "accelerator": "cpu", "enable_progress_bar": False},
        "output": str(output),
    }
    path = root / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    project = Project(root=root, model=model_dir, data=data_dir / "train.jsonl", config=path, output=output)
    project.initial = project.snapshot()
    _PROJECTS.append(project)
    return project


@contextlib.contextmanager
def in_dir(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_cli(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """`lightning-unlearn ARGS` in this process (logs under cwd/logs): (exit code, stdout, stderr)."""
    from lightning_unlearn.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)  # Lightning and wandb set variables (WANDB_SERVICE, WANDB_MODE=dryrun, PL_GLOBAL_SEED)
    os.environ["LIGHTNING_UNLEARN_LOG_DIR"] = str(Path(cwd) / "logs")
    code: Any = 0
    try:
        with in_dir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as exit_:
                code = exit_.code
    finally:  # leave the environment as it was: later tests start subprocesses from it
        os.environ.clear()
        os.environ.update(saved)
    if code is None:
        code = 0
    return (code if isinstance(code, int) else 1), out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def user_files_untouched():
    """After every case: each project's source model and training data as they were when it was made (autouse in
    every module that imports it)."""
    yield
    for project in created_projects():
        changed = project.changed_files()
        assert not changed, f"the user's files changed: {changed}"


def error_line(code: int, err: str, *fragments: str) -> str:
    """The command's one error line; it must be the only one, with exit status 2, no traceback, naming the problem."""
    lines = [line for line in err.splitlines() if line.startswith("lightning-unlearn: error: ")]
    assert code == EXIT_USER_ERROR, (code, err[-3000:])
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
