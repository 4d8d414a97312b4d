"""The bad-input catalogue of the command (`lightning-unlearn fit|validate|demo`): outputs it must refuse before any
work, exit statuses (2 bad input, 3 nothing accepted, 143 SIGTERM), one-line errors, a saved config that holds
nothing of the forget selection, and `validate` evaluating the unlearned model. Every case checks that the user's
source model and training data are byte-for-byte unchanged (`project.snapshot()`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from bad_input_fixtures import FORGET_IDS, make_project, run_cli

from lightning_unlearn.errors import EXIT_NOTHING_ACCEPTED, EXIT_SIGTERM, EXIT_USER_ERROR, UserInputError
from lightning_unlearn.io import write_manifest

#: a run where every trial is rolled back: no holdout target, a huge first-order step, no retain increase allowed
NOTHING_ACCEPTED = ["--model.method", "gradient_ascent", "--model.holdout_batches", "0",
                    "--model.max_retain_increase", "0", "--model.method_kwargs", '{"lr": 10.0}']
#: a run that never stops by itself (tiny accepted steps, no target, no budget): stopped by the signal
ENDLESS = ["--model.method", "gradient_ascent", "--model.holdout_batches", "0", "--model.max_retain_increase", "null",
           "--model.method_kwargs", '{"lr": 1e-7}', "--trainer.max_steps", "100000", "--trainer.limit_val_batches", "0"]
TINY_DEMO = {"experiment": {"corpus_bytes": 30_000, "canaries_per_group": 2, "repetitions": [2, 8], "n_references": 6,
                            "secret_length": 4, "vocab_size": 300, "max_length": 64, "hidden": 32, "layers": 1,
                            "heads": 2, "batch_size": 8, "train_steps": 20, "warmup_steps": 5},
             "unlearning": {"curvature_batches": 2}}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """One user's project for every case that does not change it."""
    return make_project(tmp_path_factory.mktemp("user"))


@pytest.fixture(scope="module")
def fitted(project):
    """A successful `fit` into an existing empty folder (`mktemp -d`): (output, stdout, stderr)."""
    output = project.root / "fitted"
    output.mkdir()
    before = project.snapshot()
    code, out, err = run_cli(["fit", "--config", str(project.config), "--output", str(output)], project.root)
    assert code == 0, err[-3000:]
    assert project.snapshot() == before
    return output, out, err


def fit(project, *args: str) -> tuple[int, str, str]:
    return run_cli(["fit", "--config", str(project.config), *args], project.root)


def error_line(code: int, err: str, *fragments: str) -> str:
    """The command's one error line; it must be the only one, with exit status 2, no traceback, naming the problem."""
    lines = [line for line in err.splitlines() if line.startswith("lightning-unlearn: error: ")]
    assert code == EXIT_USER_ERROR, (code, err[-3000:])
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ outputs refused before any work
def test_a_non_empty_folder_needs_overwrite(project):
    before = project.snapshot()
    folder = project.root / "users_folder"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    code, _, err = fit(project, "--output", str(folder))
    error_line(code, err, str(folder), "not empty", "--overwrite")
    assert (folder / "thesis.tex").read_text() == "years of work" and len(list(folder.iterdir())) == 1
    assert project.snapshot() == before


def test_a_plain_file_is_never_an_output(project):
    before = project.snapshot()
    target = project.root / "results.csv"
    target.write_text("a,b\n1,2\n")
    for extra in ([], ["--overwrite"]):
        code, _, err = fit(project, "--output", str(target), *extra)
        error_line(code, err, "is a file, not a folder")
        assert target.read_text() == "a,b\n1,2\n"
    assert project.snapshot() == before


def test_the_source_model_is_never_the_output(project):
    before = project.snapshot()
    for extra in ([], ["--overwrite"]):
        code, _, err = fit(project, "--output", str(project.model), *extra)
        error_line(code, err, "model.model", "itself")
    assert project.snapshot() == before


def test_overwrite_never_deletes_a_folder_holding_the_source_model(project):
    before = project.snapshot()
    code, _, err = fit(project, "--output", str(project.model.parent), "--overwrite")
    error_line(code, err, "contains model.model", "even with --overwrite")
    assert project.snapshot() == before


def test_overwrite_never_deletes_a_folder_holding_the_training_data(project):
    before = project.snapshot()
    code, _, err = fit(project, "--output", str(project.data.parent), "--overwrite")
    error_line(code, err, "contains data.train", str(project.data))
    assert (project.data.parent / "notes.txt").exists()
    assert project.snapshot() == before


def test_an_output_that_cannot_be_created_is_refused_before_the_run(project):
    """The parent is a plain file (chmod tests are moot as root, which CI is): refused up front, not after the run."""
    before = project.snapshot()
    blocker = project.root / "some_file"
    blocker.write_text("not a folder")
    code, out, err = fit(project, "--output", str(blocker / "model"))
    error_line(code, err, "cannot be created", "some_file", "is a file")
    assert "unlearning status" not in out  # nothing ran
    assert blocker.read_text() == "not a folder" and project.snapshot() == before


def test_an_unwritable_parent_is_refused_before_the_run(project):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere; the plain-file parent case covers the check")
    before = project.snapshot()
    parent = project.root / "read_only"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        code, _, err = fit(project, "--output", str(parent / "model"))
    finally:
        parent.chmod(0o700)
    error_line(code, err, "not writable")
    assert project.snapshot() == before


# ------------------------------------------------------------------ a run: an empty folder, run.json, exit 3
def test_an_existing_empty_folder_is_accepted_and_gets_the_model_and_its_manifest(project, fitted):
    output, out, _ = fitted
    assert "unlearned model written to" in out
    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()
    manifest = json.loads((output / "run.json").read_text())
    assert manifest["finished"] is True and manifest["exit_code"] == 0 and manifest["model_written"] is True
    assert manifest["status"] in ("target_reached", "budget_exhausted") and isinstance(manifest["steps_accepted"], int)
    assert set(manifest) >= {"started", "ended", "command", "tool"}
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_nothing_accepted_exits_3_and_writes_no_model(project):
    before = project.snapshot()
    output = project.root / "never_written"
    code, out, err = fit(project, "--output", str(output), *NOTHING_ACCEPTED)
    assert code == EXIT_NOTHING_ACCEPTED, err[-3000:]
    assert "unlearned model written" not in out
    assert "nothing accepted: every trial was rolled back (retain_increase" in out
    assert not output.exists()
    assert project.snapshot() == before


def test_nothing_accepted_keeps_an_older_output_and_says_it_is_not_this_runs(project, fitted):
    output, _, _ = fitted
    old = (output / "model.safetensors").read_bytes()
    code, out, err = fit(project, "--output", str(output), "--overwrite", *NOTHING_ACCEPTED)
    assert code == EXIT_NOTHING_ACCEPTED, err[-3000:]
    assert (output / "model.safetensors").read_bytes() == old
    manifest = json.loads((output / "run.json").read_text())
    assert manifest["status"] == "nothing_accepted" and manifest["model_written"] is False
    assert manifest["exit_code"] == EXIT_NOTHING_ACCEPTED


def test_sigterm_exits_143_and_leaves_no_output_that_looks_complete(project):
    """A real process and a real SIGTERM once the run has started (its `finished: false` marker is there)."""
    before = project.snapshot()
    output = project.root / "older_output"
    shutil.copytree(project.model, output)  # an older output of ours: a model and its run.json
    write_manifest(output, command="fit", status="target_reached", finished=True, exit_code=0)
    old = (output / "model.safetensors").read_bytes()
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "LIGHTNING_UNLEARN_LOG_DIR": str(project.root / "sigterm_logs")}
    cmd = [sys.executable, "-m", "lightning_unlearn.cli", "fit", "--config", str(project.config), "--output",
           str(output), "--overwrite", *ENDLESS]
    proc = subprocess.Popen(cmd, cwd=project.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if json.loads((output / "run.json").read_text()).get("status") == "running":
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)  # well inside the fit
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_SIGTERM, err[-3000:]
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    manifest = json.loads((output / "run.json").read_text())
    assert manifest["finished"] is False and manifest["status"] == "interrupted"
    assert (output / "model.safetensors").read_bytes() == old  # the older model, marked as not this run's
    assert not [p for p in project.root.iterdir() if p.name.startswith(".older_output")], "temporary folder left"
    # the run's logs are removed with it (wandb's service may still be writing its own files: not checked)
    assert not [p for p in (project.root / "sigterm_logs").rglob("*") if p.name in ("config.yaml", "hparams.yaml",
                                                                                 "metrics.csv")]
    assert project.snapshot() == before


# ------------------------------------------------------------------ the demo
def test_demo_refuses_an_existing_non_empty_output(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep me")
    code, _, err = run_cli(["demo", "--output", str(folder), "--quiet"], tmp_path)
    error_line(code, err, str(folder), "not empty", "--overwrite")
    assert (folder / "mine.txt").read_text() == "keep me" and len(list(folder.iterdir())) == 1


def test_demo_runs_into_an_existing_empty_folder(tmp_path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_DEMO))
    folder = tmp_path / "empty"
    folder.mkdir()
    code, out, err = run_cli(["demo", "--config", "tiny.yaml", "--output", str(folder), "--quiet"], tmp_path)
    assert code in (0, EXIT_NOTHING_ACCEPTED), err[-3000:]
    assert (folder / "report.json").is_file() and (folder / "model" / "model.safetensors").is_file()
    manifest = json.loads((folder / "run.json").read_text())
    assert manifest["finished"] is True and manifest["command"] == "demo" and manifest["exit_code"] == code


@pytest.mark.parametrize("flag", ["--train-steps", "--corpus-bytes"])
def test_demo_negative_sizes_are_one_line_errors(tmp_path, flag):
    code, _, err = run_cli(["demo", flag, "-5", "--output", str(tmp_path / "out")], tmp_path)
    error_line(code, err, flag, "positive", "-5")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ models and config values
def test_a_corrupt_safetensors_model_names_the_file(project, tmp_path):
    before = project.snapshot()
    broken = tmp_path / "broken_model"
    shutil.copytree(project.model, broken)
    (broken / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors header")
    code, out, err = fit(project, "--model.model", str(broken), "--output", str(tmp_path / "out"))
    error_line(code, err, str(broken / "model.safetensors"), "corrupt")
    assert not (tmp_path / "out").exists() and project.snapshot() == before


def test_an_unknown_dtype_lists_the_valid_ones(project, tmp_path):
    before = project.snapshot()
    code, _, err = fit(project, "--model.dtype", "float8", "--output", str(tmp_path / "out"))
    error_line(code, err, "model.dtype", "'float8'", "bfloat16", "float32")
    assert project.snapshot() == before


def test_a_jsonargparse_error_is_one_line_and_masks_the_forget_pattern(project, tmp_path):
    before = project.snapshot()
    code, _, err = fit(project, "--data.forget_regex", "code 217", "--model.damping", "code 217",
                       "--output", str(tmp_path / "out"))
    error_line(code, err, "model.damping")
    assert "code 217" not in err
    assert project.snapshot() == before


def test_the_traceback_is_there_on_request(project, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_UNLEARN_TRACEBACK", "1")
    with pytest.raises(UserInputError, match="model.dtype"):
        fit(project, "--model.dtype", "int4", "--output", str(tmp_path / "out"))


# ------------------------------------------------------------------ privacy and evaluation
def test_no_output_file_holds_a_forget_id_nor_its_hash(project, fitted):
    output, out, err = fitted
    texts = [*FORGET_IDS, "\n".join(FORGET_IDS)]
    secrets = [*FORGET_IDS, *(hashlib.sha256(t.encode()).hexdigest() for t in texts)]
    files = [p for p in [*(project.root / "logs").rglob("*"), *output.rglob("*")] if p.is_file()]
    assert any(p.name == "config.yaml" for p in files)
    for path in files:
        blob = path.read_bytes()
        assert not [s for s in secrets if s.encode() in blob], path
    assert not [s for s in secrets if s in out + err]
    saved = yaml.safe_load(next(p for p in files if p.name == "config.yaml").read_text())
    assert saved["data"]["forget_ids"] == [f"<{len(FORGET_IDS)} ids redacted>"]


def test_validate_evaluates_the_unlearned_output(project, fitted):
    output, _, _ = fitted
    before = project.snapshot()
    code, out, err = run_cli(["validate", "--config", str(project.config), "--output", str(output)], project.root)
    assert code == 0, err[-3000:]
    assert f"evaluating the unlearned model {str(output)!r}" in out
    assert "val/test_loss" in out and "val/retain_loss" not in out  # the test split under its own name
    code, out, err = run_cli(["validate", "--config", str(project.config), "--output",
                              str(project.root / "not_yet")], project.root)
    assert code == 0, err[-3000:]
    assert "evaluating the ORIGINAL model" in out
    assert project.snapshot() == before


# ------------------------------------------------------------------ what counts as the user's error, and Ctrl-C
def test_only_errors_of_the_user_become_one_line_messages():
    from lightning_unlearn.cli import TRACEBACK_HINT, _user_error
    from lightning_unlearn.models import small_config

    with pytest.raises(ValueError) as ours:
        small_config("transformer-xxl")  # a ValueError raised by our own code: one line plus the hint
    assert _user_error(ours.value, []) == f"unknown architecture 'transformer-xxl'; choose one of " \
        f"gpt2, llama, qwen2, gpt_neox, opt {TRACEBACK_HINT}"
    with pytest.raises(FileNotFoundError) as missing:
        open("/no/such/file.jsonl")  # noqa: SIM115 - an OSError naming a file
    assert "/no/such/file.jsonl" in _user_error(missing.value, [])
    assert _user_error(RuntimeError("a bug of ours"), []) is None  # keeps its traceback
    assert _user_error(UserInputError("data.train: bad\n  second line"), []) == "data.train: bad; second line"


def test_ctrl_c_raises_through_finally_blocks_and_exits_130():
    from lightning_unlearn.cli import Interrupted, _install_signal_handlers

    restore = _install_signal_handlers()
    cleaned = []
    try:
        with pytest.raises(Interrupted) as info:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            finally:
                cleaned.append(True)
    finally:
        restore()
    assert info.value.code == 130 and cleaned == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
