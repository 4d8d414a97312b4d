"""Bad input to the command (`lightning-unlearn fit|validate|demo`): outputs it must refuse before any work, exit
statuses (2 bad input, 3 nothing accepted), one-line errors (and which errors are the user's), a saved config that
holds nothing of the forget selection, and `validate` evaluating the unlearned model. Every case checks that the
user's source model and training data are byte-for-byte unchanged (the autouse `user_files_untouched` check and
`project.snapshot()`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import yaml
from bad_input_fixtures import (
    FORGET_IDS,
    NOTHING_ACCEPTED,
    error_line,
    make_project,
    run_cli,
    user_files_untouched,  # noqa: F401 - the autouse check of every case
)

from lightning_unlearn.errors import EXIT_NOTHING_ACCEPTED, UserInputError

TINY_DEMO = {"experiment": {"corpus_bytes": 30_000, "canaries_per_group": 2, "repetitions": [2, 8], "n_references": 6,
                            "secret_length": 4, "vocab_size": 300, "max_length": 64, "hidden": 32, "layers": 1,
                            "heads": 2, "batch_size": 8, "train_steps": 20, "warmup_steps": 5},
             "unlearning": {"curvature_batches": 2}}



@pytest.fixture(scope="module")
def cmd_project(tmp_path_factory):
    """One user's project for every case that does not change it."""
    return make_project(tmp_path_factory.mktemp("user"))


@pytest.fixture(scope="module")
def fitted(cmd_project):
    """A successful `fit` into an existing empty folder (`mktemp -d`): (output, stdout, stderr)."""
    output = cmd_project.root / "fitted"
    output.mkdir()
    before = cmd_project.snapshot()
    code, out, err = run_cli(["fit", "--config", str(cmd_project.config), "--output", str(output)], cmd_project.root)
    assert code == 0, err[-3000:]
    assert cmd_project.snapshot() == before
    return output, out, err


def fit(cmd_project, *args: str) -> tuple[int, str, str]:
    return run_cli(["fit", "--config", str(cmd_project.config), *args], cmd_project.root)



# ------------------------------------------------------------------ outputs refused before any work
def test_a_non_empty_folder_needs_overwrite(cmd_project):
    before = cmd_project.snapshot()
    folder = cmd_project.root / "users_folder"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    code, _, err = fit(cmd_project, "--output", str(folder))
    error_line(code, err, str(folder), "not empty", "--overwrite")
    assert (folder / "thesis.tex").read_text() == "years of work" and len(list(folder.iterdir())) == 1
    assert cmd_project.snapshot() == before


def test_a_plain_file_is_never_an_output(cmd_project):
    before = cmd_project.snapshot()
    target = cmd_project.root / "results.csv"
    target.write_text("a,b\n1,2\n")
    for extra in ([], ["--overwrite"]):
        code, _, err = fit(cmd_project, "--output", str(target), *extra)
        error_line(code, err, "is a file, not a folder")
        assert target.read_text() == "a,b\n1,2\n"
    assert cmd_project.snapshot() == before


def test_the_source_model_is_never_the_output(cmd_project):
    before = cmd_project.snapshot()
    for extra in ([], ["--overwrite"]):
        code, _, err = fit(cmd_project, "--output", str(cmd_project.model), *extra)
        error_line(code, err, "model.model", "itself")
    assert cmd_project.snapshot() == before


def test_overwrite_never_deletes_a_folder_holding_the_source_model(cmd_project):
    before = cmd_project.snapshot()
    code, _, err = fit(cmd_project, "--output", str(cmd_project.model.parent), "--overwrite")
    error_line(code, err, "contains model.model", "even with --overwrite")
    assert cmd_project.snapshot() == before


def test_overwrite_never_deletes_a_folder_holding_the_training_data(cmd_project):
    before = cmd_project.snapshot()
    code, _, err = fit(cmd_project, "--output", str(cmd_project.data.parent), "--overwrite")
    error_line(code, err, "contains data.train", str(cmd_project.data))
    assert (cmd_project.data.parent / "notes.txt").exists()
    assert cmd_project.snapshot() == before


def test_an_output_that_cannot_be_created_is_refused_before_the_run(cmd_project):
    """The parent is a plain file (chmod tests are moot as root, which CI is): refused up front, not after the run."""
    before = cmd_project.snapshot()
    blocker = cmd_project.root / "some_file"
    blocker.write_text("not a folder")
    code, out, err = fit(cmd_project, "--output", str(blocker / "model"))
    error_line(code, err, "cannot be created", "some_file", "is a file")
    assert "unlearning status" not in out  # nothing ran
    assert blocker.read_text() == "not a folder" and cmd_project.snapshot() == before


def test_an_unwritable_parent_is_refused_before_the_run(cmd_project):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere; the plain-file parent case covers the check")
    before = cmd_project.snapshot()
    parent = cmd_project.root / "read_only"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        code, _, err = fit(cmd_project, "--output", str(parent / "model"))
    finally:
        parent.chmod(0o700)
    error_line(code, err, "not writable")
    assert cmd_project.snapshot() == before


# ------------------------------------------------------------------ a run: an empty folder, run.json, exit 3
def test_an_existing_empty_folder_is_accepted_and_gets_the_model_and_its_manifest(cmd_project, fitted):
    output, out, _ = fitted
    assert "unlearned model written to" in out
    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()
    manifest = json.loads((output / "run.json").read_text())
    assert manifest["finished"] is True and manifest["exit_code"] == 0 and manifest["model_written"] is True
    assert manifest["status"] in ("target_reached", "budget_exhausted") and isinstance(manifest["steps_accepted"], int)
    assert set(manifest) >= {"started", "ended", "command", "tool"}
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_nothing_accepted_exits_3_and_writes_no_model(cmd_project):
    before = cmd_project.snapshot()
    output = cmd_project.root / "never_written"
    code, out, err = fit(cmd_project, "--output", str(output), *NOTHING_ACCEPTED)
    assert code == EXIT_NOTHING_ACCEPTED, err[-3000:]
    assert "unlearned model written" not in out
    assert "nothing accepted: every trial was rolled back (retain_increase" in out
    assert not output.exists()
    assert cmd_project.snapshot() == before


def test_nothing_accepted_keeps_an_older_output_and_says_it_is_not_this_runs(cmd_project, fitted):
    output, _, _ = fitted
    old = (output / "model.safetensors").read_bytes()
    code, out, err = fit(cmd_project, "--output", str(output), "--overwrite", *NOTHING_ACCEPTED)
    assert code == EXIT_NOTHING_ACCEPTED, err[-3000:]
    assert (output / "model.safetensors").read_bytes() == old
    manifest = json.loads((output / "run.json").read_text())
    assert manifest["status"] == "nothing_accepted" and manifest["model_written"] is False
    assert manifest["exit_code"] == EXIT_NOTHING_ACCEPTED




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
def test_a_corrupt_safetensors_model_names_the_file(cmd_project, tmp_path):
    before = cmd_project.snapshot()
    broken = tmp_path / "broken_model"
    shutil.copytree(cmd_project.model, broken)
    (broken / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors header")
    code, out, err = fit(cmd_project, "--model.model", str(broken), "--output", str(tmp_path / "out"))
    error_line(code, err, str(broken / "model.safetensors"), "corrupt")
    assert not (tmp_path / "out").exists() and cmd_project.snapshot() == before


def test_an_unknown_dtype_lists_the_valid_ones(cmd_project, tmp_path):
    before = cmd_project.snapshot()
    code, _, err = fit(cmd_project, "--model.dtype", "float8", "--output", str(tmp_path / "out"))
    error_line(code, err, "model.dtype", "'float8'", "bfloat16", "float32")
    assert cmd_project.snapshot() == before


def test_a_jsonargparse_error_is_one_line_and_masks_the_forget_pattern(cmd_project, tmp_path):
    before = cmd_project.snapshot()
    code, _, err = fit(cmd_project, "--data.forget_regex", "code 217", "--model.damping", "code 217",
                       "--output", str(tmp_path / "out"))
    error_line(code, err, "model.damping")
    assert "code 217" not in err
    assert cmd_project.snapshot() == before


def test_the_traceback_is_there_on_request(cmd_project, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_UNLEARN_TRACEBACK", "1")
    with pytest.raises(UserInputError, match="model.dtype"):
        fit(cmd_project, "--model.dtype", "int4", "--output", str(tmp_path / "out"))


# ------------------------------------------------------------------ privacy and evaluation
def test_no_output_file_holds_a_forget_id_nor_its_hash(cmd_project, fitted):
    output, out, err = fitted
    texts = [*FORGET_IDS, "\n".join(FORGET_IDS)]
    secrets = [*FORGET_IDS, *(hashlib.sha256(t.encode()).hexdigest() for t in texts)]
    files = [p for p in [*(cmd_project.root / "logs").rglob("*"), *output.rglob("*")] if p.is_file()]
    assert any(p.name == "config.yaml" for p in files)
    for path in files:
        blob = path.read_bytes()
        assert not [s for s in secrets if s.encode() in blob], path
    assert not [s for s in secrets if s in out + err]
    saved = yaml.safe_load(next(p for p in files if p.name == "config.yaml").read_text())
    assert saved["data"]["forget_ids"] == [f"<{len(FORGET_IDS)} ids redacted>"]


def test_validate_evaluates_the_unlearned_output(cmd_project, fitted):
    output, _, _ = fitted
    before = cmd_project.snapshot()
    code, out, err = run_cli(["validate", "--config", str(cmd_project.config), "--output", str(output)],
                             cmd_project.root)
    assert code == 0, err[-3000:]
    assert f"evaluating the unlearned model {str(output)!r}" in out
    assert "val/test_loss" in out and "val/retain_loss" not in out  # the test split under its own name
    code, out, err = run_cli(["validate", "--config", str(cmd_project.config), "--output",
                              str(cmd_project.root / "not_yet")], cmd_project.root)
    assert code == 0, err[-3000:]
    assert "evaluating the ORIGINAL model" in out
    assert cmd_project.snapshot() == before


# ------------------------------------------------------------------ what counts as the user's error, and Ctrl-C
def test_only_errors_of_the_user_become_one_line_messages():
    from lightning_unlearn.cli.user_errors import TRACEBACK_HINT
    from lightning_unlearn.cli.user_errors import user_error as _user_error
    from lightning_unlearn.models import ARCHITECTURES, MOE_ARCHITECTURES, small_config

    with pytest.raises(ValueError) as ours:
        small_config("transformer-xxl")  # a ValueError raised by our own code: one line plus the hint
    assert _user_error(ours.value, []) == f"unknown architecture 'transformer-xxl'; choose one of " \
        f"{', '.join(ARCHITECTURES + MOE_ARCHITECTURES)} {TRACEBACK_HINT}"
    with pytest.raises(FileNotFoundError) as missing:
        open("/no/such/file.jsonl")  # noqa: SIM115 - an OSError naming a file
    assert "/no/such/file.jsonl" in _user_error(missing.value, [])
    assert _user_error(RuntimeError("a bug of ours"), []) is None  # keeps its traceback
    assert _user_error(UserInputError("data.train: bad\n  second line"), []) == "data.train: bad; second line"
