"""The catalogue of bad inputs and faults: each case gives a bad file, setting, input or fault to the API or to the
command and asserts that the error names the problem (and, where there is one, the fix), that nothing that looks
complete is written, and that the user's source model folder and training data are byte-identical afterwards (every
case here, by the autouse `user_files_untouched` check, on top of each case's own).

Sections: curvature checkpoints, the command, data, the engine.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from bad_input_fixtures import FORGET_IDS, Project, created_projects, make_project, run_cli, texts
from lightning.fabric import Fabric
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_unlearn.callbacks import Unlearn, load_curvature_state, save_curvature
from lightning_unlearn.data import ForgetRetainDataModule
from lightning_unlearn.errors import EXIT_NOTHING_ACCEPTED, EXIT_SIGTERM, EXIT_USER_ERROR, UserInputError
from lightning_unlearn.io import write_manifest
from lightning_unlearn.methods import build_curvature, build_unlearner
from lightning_unlearn.models import load_causal_lm


@pytest.fixture(autouse=True)
def user_files_untouched():
    """After every case: each project's source model and training data as they were when it was made."""
    yield
    for project in created_projects():
        changed = project.changed_files()
        assert not changed, f"the user's files changed: {changed}"


# ======================================================================================================================
# Curvature checkpoints: never unpickled, refused when foreign, broken or non-finite
# Bad-input catalogue: curvature checkpoints. Each case hands lightning-unlearn a broken, foreign or hostile curvature
# checkpoint, checks that the error names the problem (and the file), that no pickled code ran, and that the user's
# model and data are byte-for-byte unchanged afterwards.
# ======================================================================================================================


class Payload:
    """A pickle whose loading would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def ckpt_project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("user"))


@pytest.fixture(scope="module")
def model(ckpt_project):
    return load_causal_lm(ckpt_project.model)


def batches(model: torch.nn.Module, n: int = 8) -> list[dict[str, torch.Tensor]]:
    """Random token batches: more positions than the project's forget set (full_minus_forget subtracts it)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1, model.config.vocab_size, (4, 32), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def checkpoint(model: torch.nn.Module, path: Path, backend: str = "kfac") -> Path:
    return save_curvature(build_curvature(backend, model).fit(batches(model)), path)


def ckpt_cli(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """`run_cli`; a refused checkpoint is the user's error: exit 2, one line, no traceback."""
    code, out, err = run_cli(args, cwd)
    if code != 0:
        assert code == EXIT_USER_ERROR and "Traceback" not in err, err[-2000:]
    return code, out, err


def ckpt_refused(path: Path, model: torch.nn.Module, match: str, **kwargs) -> None:
    with pytest.raises(UserInputError, match=match):
        load_curvature_state(path, model=model, backend="kfac", **kwargs)


def test_pickled_payload_via_the_api(ckpt_project, model, tmp_path):
    before, marker = ckpt_project.snapshot(), tmp_path / "pwned"
    path = tmp_path / "curvature.pt"
    torch.save(Payload(marker), path)
    ckpt_refused(path, model, "holds pickled Python objects .*never executes.*re-export.*save_curvature")
    with pytest.raises(UserInputError, match="pickled Python objects"):  # the drop-in callback, same refusal
        Unlearn(curvature="kfac", curvature_data="full_minus_forget", full_curvature=path).unlearn(
            model, forget=batches(model, 1))
    assert not marker.exists() and ckpt_project.snapshot() == before


def test_plain_pickle_payload_via_the_api(ckpt_project, model, tmp_path):
    before, marker = ckpt_project.snapshot(), tmp_path / "pwned"
    path = tmp_path / "curvature.pkl"
    with path.open("wb") as f:
        pickle.dump({"backend": "kfac", "count": Payload(marker)}, f)
    ckpt_refused(path, model, "pickled Python objects")
    assert not marker.exists() and ckpt_project.snapshot() == before


def test_pickled_payload_via_the_cli(ckpt_project, tmp_path):
    before, marker = ckpt_project.snapshot(), tmp_path / "pwned"
    path = tmp_path / "curvature.pt"
    torch.save({"format": "lightning_unlearn.curvature/1", "state": Payload(marker), "meta": {}}, path)
    code, out, err = ckpt_cli(["fit", "--config", str(ckpt_project.config), "--model.curvature_data",
                               "full_minus_forget",
                              "--model.full_curvature", str(path)], tmp_path)
    assert code != 0 and "holds pickled Python objects" in out + err and str(path) in out + err
    assert not marker.exists() and ckpt_project.snapshot() == before
    assert not ckpt_project.output.exists()


def test_a_good_checkpoint_works_through_the_cli(ckpt_project, model, tmp_path):
    """The control of the CLI cases: the same command with a real checkpoint of the project's model runs."""
    before = ckpt_project.snapshot()
    path = checkpoint(model, tmp_path / "curvature.safetensors")
    out_dir = tmp_path / "unlearned"
    code, out, err = ckpt_cli(["fit", "--config", str(ckpt_project.config), "--model.curvature_data",
                               "full_minus_forget",
                              "--model.full_curvature", str(path), "--output", str(out_dir)], tmp_path)
    assert code in (0, 3), out + err  # 3: ran, accepted no step (a tiny random model); never a refusal
    assert "UserInputError" not in out + err and ckpt_project.snapshot() == before


def test_nan_in_the_checkpoint(ckpt_project, model, tmp_path):
    before = ckpt_project.snapshot()
    path = checkpoint(model, tmp_path / "curvature.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("/A"))
    tensors[key][1, 1] = float("inf")
    save_file(tensors, str(path), metadata=meta)
    ckpt_refused(path, model, f"holds NaN/inf in '{key}'")
    assert ckpt_project.snapshot() == before


def test_a_checkpoint_of_another_width(ckpt_project, model, tmp_path):
    before = ckpt_project.snapshot()
    wide = make_project(tmp_path / "wide", hidden=64)
    path = checkpoint(load_causal_lm(wide.model), tmp_path / "wide.safetensors")
    ckpt_refused(path, model, r"another model: parameter 'transformer.h.0.attn.c_attn.weight' has shape \(64, 192\) in"
                         r" the checkpoint but \(32, 96\) in this model")
    code, out, err = ckpt_cli(["fit", "--config", str(ckpt_project.config), "--model.curvature_data",
                               "full_minus_forget",
                              "--model.full_curvature", str(path)], tmp_path)
    assert code != 0 and "'transformer.h.0.attn.c_attn.weight' has shape (64, 192)" in out + err
    assert "size of tensor" not in out + err
    assert ckpt_project.snapshot() == before and not ckpt_project.output.exists()


def test_a_checkpoint_of_another_backend(ckpt_project, model, tmp_path):
    before = ckpt_project.snapshot()
    path = checkpoint(model, tmp_path / "diagonal.safetensors", backend="diagonal")
    ckpt_refused(path,
                 model, "holds a 'diagonal' curvature, but curvature='kfac' was asked for; set curvature='diagonal'")
    assert ckpt_project.snapshot() == before


def test_model_weights_are_not_a_curvature_checkpoint(ckpt_project, model):
    """The user passes the model's own safetensors file: refused, and the file is left exactly as it was."""
    before = ckpt_project.snapshot()
    ckpt_refused(ckpt_project.model / "model.safetensors", model,
                 "safetensors file but not a lightning-unlearn curvature")
    assert ckpt_project.snapshot() == before


@pytest.mark.parametrize("content", [os.urandom(4096), b"curvature: see the notes on the wiki\n"],
                         ids=["random bytes", "a text file"])
def test_not_a_checkpoint(ckpt_project, model, tmp_path, content):
    before = ckpt_project.snapshot()
    path = tmp_path / "curvature.safetensors"
    path.write_bytes(b"\x01" + content)  # never a pickle's or a zip's first byte
    ckpt_refused(path,
                 model, rf"{path.name}.* is not a curvature checkpoint \(neither a safetensors nor a torch file\)")
    assert ckpt_project.snapshot() == before


def test_a_missing_file(ckpt_project, model, tmp_path):
    before = ckpt_project.snapshot()
    ckpt_refused(tmp_path / "nope.safetensors", model, "nope.safetensors' does not exist; check the path")
    assert ckpt_project.snapshot() == before


def test_a_directory(ckpt_project, model, tmp_path):
    before = ckpt_project.snapshot()
    ckpt_refused(tmp_path, model, f"{tmp_path.name}' is a directory; pass the curvature file inside it")
    assert ckpt_project.snapshot() == before


def test_an_empty_file(ckpt_project, model, tmp_path):
    before = ckpt_project.snapshot()
    path = tmp_path / "curvature.safetensors"
    path.touch()
    ckpt_refused(path, model, "curvature.safetensors' is empty")
    assert ckpt_project.snapshot() == before


def test_a_truncated_checkpoint(ckpt_project, model, tmp_path):
    before = ckpt_project.snapshot()
    path = checkpoint(model, tmp_path / "curvature.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # an interrupted copy
    ckpt_refused(path, model, "curvature.safetensors' is not a readable safetensors file .* truncated or damaged")
    assert ckpt_project.snapshot() == before


def test_a_truncated_torch_file(ckpt_project, model, tmp_path):
    before = ckpt_project.snapshot()
    path = tmp_path / "last.ckpt"
    torch.save({"callbacks": {}, "state_dict": model.state_dict()}, path)
    path.write_bytes(path.read_bytes()[:1000])
    ckpt_refused(path, model, "last.ckpt' looks like a torch file but cannot be read .* truncated or damaged")
    assert ckpt_project.snapshot() == before


def test_a_lightning_checkpoint_without_curvature(ckpt_project, model, tmp_path):
    before = ckpt_project.snapshot()
    path = tmp_path / "last.ckpt"
    torch.save({"callbacks": {"ModelCheckpoint{}": {"best_model_path": ""}}, "state_dict": {}}, path)
    ckpt_refused(path, model, "holds no curvature state.*CurvatureCallback/Unlearn")
    assert ckpt_project.snapshot() == before


# ======================================================================================================================
# The command: outputs, exit status, signals, one-line errors, privacy of what it writes
# The bad-input catalogue of the command (`lightning-unlearn fit|validate|demo`): outputs it must refuse before any
# work, exit statuses (2 bad input, 3 nothing accepted, 143 SIGTERM), one-line errors, a saved config that holds
# nothing of the forget selection, and `validate` evaluating the unlearned model. Every case checks that the user's
# source model and training data are byte-for-byte unchanged (`project.snapshot()`).
# ======================================================================================================================


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


def error_line(code: int, err: str, *fragments: str) -> str:
    """The command's one error line; it must be the only one, with exit status 2, no traceback, naming the problem."""
    lines = [line for line in err.splitlines() if line.startswith("lightning-unlearn: error: ")]
    assert code == EXIT_USER_ERROR, (code, err[-3000:])
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


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


def test_sigterm_exits_143_and_leaves_no_output_that_looks_complete(cmd_project):
    """A real process and a real SIGTERM once the run has started (its `finished: false` marker is there)."""
    before = cmd_project.snapshot()
    output = cmd_project.root / "older_output"
    shutil.copytree(cmd_project.model, output)  # an older output of ours: a model and its run.json
    write_manifest(output, command="fit", status="target_reached", finished=True, exit_code=0)
    old = (output / "model.safetensors").read_bytes()
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "LIGHTNING_UNLEARN_LOG_DIR": str(cmd_project.root / "sigterm_logs")}
    cmd = [sys.executable, "-m", "lightning_unlearn.cli", "fit", "--config", str(cmd_project.config), "--output",
           str(output), "--overwrite", *ENDLESS]
    proc = subprocess.Popen(cmd, cwd=cmd_project.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
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
    assert not [p for p in cmd_project.root.iterdir() if p.name.startswith(".older_output")], "temporary folder left"
    # the run's logs are removed with it (wandb's service may still be writing its own files: not checked)
    assert not [p for p in (cmd_project.root / "sigterm_logs").rglob("*") if p.name in ("config.yaml", "hparams.yaml",
                                                                                 "metrics.csv")]
    assert cmd_project.snapshot() == before


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
    from lightning_unlearn.cli.signals import Interrupted
    from lightning_unlearn.cli.signals import install_signal_handlers as _install_signal_handlers

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


# ======================================================================================================================
# Data: selections, columns, encodings, empty files and splits, tokenizers
# Bad-input catalogue, data: a user's project on disk (`make_project`), one bad data input per case. Each case
# asserts that the error names the problem (and the fix), that the source model and data are byte-for-byte unchanged,
# and, where a forget pattern or forget ids are involved, that the error does not repeat them (they may be secrets).
#
# Most cases go through the API (`ForgetRetainDataModule(...).setup("fit")`, fast); a few through the command.
# ======================================================================================================================


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Project:
    """One project for the API cases (none of them writes into it; each checks the snapshot)."""
    return make_project(tmp_path_factory.mktemp("project"))


@pytest.fixture
def data_project(tmp_path) -> Project:
    """A fresh project for cases that add a bad file to the user's data folder or run the command."""
    return make_project(tmp_path)


def data_module(data_project: Project, **changes: Any) -> ForgetRetainDataModule:
    """The project's `data:` config as a data module, with keys changed (None removes one)."""
    kwargs = dict(data_project.settings()["data"])
    for key, value in changes.items():
        if value is None:
            kwargs.pop(key, None)
        else:
            kwargs[key] = value
    return ForgetRetainDataModule(**kwargs)


def data_refused(data_project: Project, match: str, *, secrets: tuple[str, ...] = (), **changes: Any) -> str:
    """Build the data module with `changes` and set it up: it must raise a UserInputError matching `match`, leave
    the project unchanged and not contain any of `secrets`. Returns the message."""
    before = data_project.snapshot()
    with pytest.raises(UserInputError, match=match) as err:
        data_module(data_project, **changes).setup("fit")
    message = str(err.value)
    assert data_project.snapshot() == before
    for secret in secrets:
        assert secret not in message, f"the error repeats {secret!r}"
    return message


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_cli(data_project: Project, *args: str) -> tuple[int, str]:
    """`lightning-unlearn fit --config <project> ARGS`: (exit code, stdout + stderr); a refusal is the user's error:
    exit 2, one line, no traceback."""
    code, out, err = run_cli(["fit", "--config", str(data_project.config), *args], data_project.root)
    if code != 0:
        assert code == EXIT_USER_ERROR and "Traceback" not in err, err[-2000:]
    return code, out + err


# ------------------------------------------------------------------ forget selections


def test_regex_matching_everything(shared):
    data_refused(shared, r"retain is empty: the forget selection \(forget_regex\) selected 36 of 36 training examples, "
                    r"so nothing would be kept.*select fewer examples \(check forget_regex\)",
            secrets=(r"record \d+",), forget_ids=None, forget_regex=r"record \d+")


def test_ids_selecting_everything(shared):
    ids = [r["id"] for r in texts()]
    message = data_refused(shared, r"retain is empty: the forget selection \(forget_ids\) selected 36 of 36",
                      forget_ids=ids)
    assert "doc-" not in message


def test_column_selecting_everything(data_project):
    rows = [{**r, "erase": True} for r in texts()]
    write_jsonl(data_project.data.parent / "marked.jsonl", rows)
    data_refused(data_project, r"retain is empty: the forget selection \(forget_column 'erase'\) selected 36 of 36",
            train=str(data_project.data.parent / "marked.jsonl"), forget_ids=None, forget_column="erase")


def test_empty_forget_selections(shared):
    data_refused(shared, r"the forget set is empty: forget_ids=\[\] selects nothing", forget_ids=[])
    data_refused(shared, "forget_regex matched no training example; check the pattern", secrets=("zulu-9",),
            forget_ids=None, forget_regex="zulu-9")


def test_forget_ids_not_in_the_data(shared):
    data_refused(shared, r"2 of the 3 forget_ids are not in the training data; ids are matched against column 'id'",
            secrets=("doc-404", "doc-999"), forget_ids=["doc-1", "doc-404", "doc-999"])


def test_invalid_regex_is_not_echoed(shared):
    data_refused(shared, r"forget_regex is not a valid regular expression: unterminated character set at position 7 "
                    r"\(the pattern is not shown",
            secrets=("PIN: ", "[0-9"), forget_ids=None, forget_regex="PIN: (([0-9")


# ------------------------------------------------------------------ files and columns


def test_csv_without_text_column(data_project):
    csv = data_project.data.parent / "train.csv"
    csv.write_text("id,body\n" + "".join(f"{r['id']},{r['text']}\n" for r in texts()))
    message = data_refused(data_project,
                           r"train file '.*train.csv' has no text column 'text' \(columns: \['id', 'body'\]\); "
                               r"pass text_column=<name>", train=str(csv))
    assert "string columns: id, body" in message
    assert data_module(data_project, train=str(csv), text_column="body").forget_example_ids == [0, 3, 7]


def test_jsonl_with_another_string_column_is_not_guessed(data_project):
    path = write_jsonl(data_project.data.parent / "renamed.jsonl", [{"id": r["id"],
                                                                     "content": r["text"]} for r in texts()])
    data_refused(data_project,
                 r"train file '.*renamed.jsonl' has no text column 'text' \(columns: \['id', 'content'\]\)",
            train=str(path))


def test_non_utf8_jsonl_names_file_and_line(data_project):
    rows = texts()
    raw = b"".join((json.dumps(r) + "\n").encode() for r in rows[:4])
    raw += '{"id": "doc-4", "text": "Jos\u00e9 record 4"}\n'.encode("latin-1")
    raw += b"".join((json.dumps(r) + "\n").encode() for r in rows[5:])
    bad = data_project.data.parent / "latin1.jsonl"
    bad.write_bytes(raw)
    data_refused(data_project, r"train file '.*latin1.jsonl' is not valid UTF-8: line 5, byte offset \d+ \(byte 0xe9.*"
                     r"re-encode the file as UTF-8", secrets=("Jos",), train=str(bad))


@pytest.mark.parametrize("role", ["train", "holdout", "test"])
def test_empty_file_names_file_and_role(data_project, role):
    empty = data_project.data.parent / f"{role}-empty.jsonl"
    empty.write_text("\n")
    data_refused(data_project,
                 rf"the {role} file '.*{role}-empty.jsonl' has no examples \(an empty file, blank lines only, "
                     r"or a header without rows\)", **{role: str(empty)})


def test_empty_forget_file(data_project):
    forget = data_project.data.parent / "forget.csv"
    forget.write_text("text\n")  # a header, no rows
    data_refused(data_project, r"the forget set is empty: the forget file '.*forget.csv' has no examples",
            forget_ids=None, id_column=None, forget=str(forget))


def test_empty_split_has_no_batch(shared):
    dm = data_module(shared, test_fraction=0.0)
    before = shared.snapshot()
    with pytest.raises(UserInputError, match=r"the test split is empty \(0 examples\), so it has no batch; set "
                                             r"test_fraction > 0 or give test=<data>"):
        dm.dataloader("test")
    assert shared.snapshot() == before


# ------------------------------------------------------------------ tokenizers


def test_holdout_from_another_tokenizer(data_project):
    """A holdout tokenised with a bigger tokenizer: its ids do not fit the project's (45-token) tokenizer."""
    rows = [{"id": f"h-{i}", "text": f"held out {i}: kilo lima mike", "input_ids": [3, 70_000 + i]} for i in range(5)]
    holdout = write_jsonl(data_project.data.parent / "holdout.jsonl", rows)
    data_refused(data_project,
                 r"the holdout file '.*holdout.jsonl' holds token id 70004 but the tokenizer has only \d+ tokens: "
                     r"it was tokenised with another tokenizer", holdout=str(holdout))


def test_pretokenised_retain_without_text(data_project):
    retain = write_jsonl(data_project.data.parent / "retain.jsonl", [{"input_ids": [1, 2, 3]} for _ in range(5)])
    data_refused(data_project,
                 r"retain file '.*retain.jsonl' is pre-tokenised \(an input_ids column, no 'text' column.*give "
                     r"the texts", forget_ids=None, id_column=None, train=None,
            forget=[texts()[0]["text"]], retain=str(retain))


# ------------------------------------------------------------------ through the command


def test_cli_regex_matching_everything(data_project):
    before = data_project.snapshot()
    code, output = data_cli(data_project, "--data.forget_ids", "null", "--data.forget_regex", "cord [0-9]+:")
    assert code != 0
    assert "retain is empty: the forget selection (forget_regex) selected 36 of 36 training examples" in output
    assert "cord [0-9]+:" not in output and "num_samples" not in output
    assert data_project.snapshot() == before and not data_project.output.exists()


def test_cli_invalid_regex_is_not_echoed(data_project):
    before = data_project.snapshot()
    code, output = data_cli(data_project, "--data.forget_ids", "null", "--data.forget_regex", "ssn-([")
    assert code != 0
    assert "forget_regex is not a valid regular expression: unterminated character set at position 5" in output
    assert "ssn-([" not in output and "ssn" not in output
    assert data_project.snapshot() == before and not data_project.output.exists()


def test_cli_forget_ids_not_found(data_project):
    before = data_project.snapshot()
    code, output = data_cli(data_project, "--data.forget_ids", json.dumps(FORGET_IDS[:1] + ["doc-771"]))
    assert code != 0
    assert "1 of the 2 forget_ids are not in the training data" in output and "doc-771" not in output
    assert data_project.snapshot() == before and not data_project.output.exists()


# ======================================================================================================================
# The engine: trust region, settings, batches, weights, processes
# Bad input to the engine (the unlearning methods), from a user's saved model and data: each case fails with an error
# that names the problem, or is refused by a guard, and the user's model folder and training data stay byte-identical.
# ======================================================================================================================


@pytest.fixture(scope="module")
def engine_project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def loaded(engine_project):
    """(model, tokenizer, forget batch, retain batches, holdout batch) from the saved project, untrained weights."""
    model = AutoModelForCausalLM.from_pretrained(engine_project.model)
    tok = AutoTokenizer.from_pretrained(engine_project.model)
    rows = [json.loads(line) for line in engine_project.data.read_text().splitlines()]

    def batch(texts):
        enc = tok(texts, padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}

    forget = batch([r["text"] for r in rows if r["id"] in FORGET_IDS])
    others = [r["text"] for r in rows if r["id"] not in FORGET_IDS]
    retain = [batch(others[i:i + 8]) for i in range(0, 24, 8)]
    holdout = batch(others[24:32])
    return model, tok, forget, retain, holdout


@pytest.fixture
def untouched(engine_project):
    """Asserts after the test that the saved model and the training data were not changed."""
    before = engine_project.snapshot()
    yield
    assert engine_project.snapshot() == before, "the user's model folder or training data changed"


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_weights(model, before) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_huge_fixed_step_on_an_untrained_model_is_refused_by_the_trust_region(loaded, untouched):
    """scale 1e6 on an untrained model: the held retain loss does not move (3.783 before and after, weights at
    4.7e6), the trust region refuses it."""
    model, _, forget, retain, _ = loaded
    model = copy.deepcopy(model)
    before = weights(model)
    u = build_unlearner("newton", model, scale=1e6, step_search=False, steps=1, max_retries=1)
    with pytest.warns(UserWarning, match="no step was accepted"):
        records = u.fit([forget], retain)
    assert [r.reason for r in records] == ["trust_region", "trust_region"]
    assert u.status == "nothing_accepted" and same_weights(model, before)


def test_huge_first_step_of_the_search_stays_inside_the_trust_region(loaded, untouched):
    model, _, forget, retain, _ = loaded
    model = copy.deepcopy(model)
    u = build_unlearner("newton", model, scale=1e12, steps=1)
    records = u.fit([forget], retain)
    accepted = [r for r in records if r.accepted]
    assert accepted, [r.reason for r in records]
    start = loaded[0]
    moved = sum(float((p.detach() - q.detach()).double().pow(2).sum())
                for (n, p), (_, q) in zip(model.named_parameters(), start.named_parameters()) if n in u.param_names)
    size = sum(float(q.detach().double().pow(2).sum()) for n, q in start.named_parameters() if n in u.param_names)
    assert math.sqrt(moved / size) <= u.max_step_norm + 1e-9
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_curvature_trust_region_bounds_the_predicted_retain_increase(loaded, untouched):
    """½ΔᵀCΔ of the accepted step stays within predicted_trust × the retain budget, whatever `scale` asks for."""
    model, _, forget, retain, _ = loaded
    model = copy.deepcopy(model)
    u = build_unlearner("newton", model, scale=1e6, steps=1, predicted_trust=0.01)
    reference = u.measure(retain[0])
    records = u.fit([forget], retain)
    accepted = [r for r in records if r.accepted]
    assert accepted and accepted[-1].predicted_increase is not None
    assert accepted[-1].predicted_increase <= 0.01 * 0.05 * reference * (1 + 1e-6)


@pytest.mark.parametrize(("setting", "value", "named"), [
    ("scale", float("nan"), "scale"),
    ("scale", -1.0, "scale"),
    ("scale", 0.0, "scale"),
    ("damping", -0.1, "damping"),
    ("damping", float("inf"), "damping"),
    ("max_retain_increase", float("nan"), "max_retain_increase"),
    ("max_step_norm", 0.0, "max_step_norm"),
    ("predicted_trust", -1.0, "predicted_trust"),
    ("steps", 0, "steps"),
])
def test_nonsense_settings_are_refused_at_configuration(loaded, untouched, setting, value, named):
    model = loaded[0]
    with pytest.raises(ValueError, match=named):
        build_unlearner("newton", model, **{setting: value})


def test_a_typo_in_the_method_settings_names_the_key(loaded, untouched):
    with pytest.raises(UserInputError, match="'stepz'.*valid settings:.*steps"):
        build_unlearner("newton", loaded[0], stepz=3)


def test_an_unknown_forget_loss_lists_the_choices(loaded, untouched):
    with pytest.raises(ValueError, match="unknown forget_loss 'hinge'; choose one of"):
        build_unlearner("gradient_ascent", loaded[0], forget_loss="hinge")


def test_nan_in_the_model_weights_names_the_parameter(loaded, untouched):
    model, _, forget, retain, _ = loaded
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(UserInputError, match=r"not finite .*'transformer\.h\.0\.mlp\.c_fc\.weight'"):
        build_unlearner("newton", model).fit([forget], retain)


def test_a_tokenizer_larger_than_the_embedding_is_named(loaded, untouched):
    """Data tokenised by another (larger) tokenizer: today's failure would be 'index out of range in self'."""
    model, _, forget, retain, _ = loaded
    vocab = model.get_input_embeddings().weight.shape[0]
    big = dict(forget, input_ids=forget["input_ids"].clone())
    big["input_ids"][0, 1] = vocab + 5
    with pytest.raises(UserInputError, match=rf"outside the model's embedding .*{vocab} rows.*tokenizer"):
        build_unlearner("newton", copy.deepcopy(model)).fit([big], retain)


def test_a_zero_row_batch_is_named(loaded, untouched):
    model, _, forget, retain, _ = loaded
    empty = {k: v[:0] for k, v in forget.items()}
    with pytest.raises(UserInputError, match="forget batch 1 is empty"):
        build_unlearner("newton", copy.deepcopy(model)).fit([forget, empty], retain)


def test_labels_that_do_not_align_with_the_inputs_are_named(loaded, untouched):
    model, _, forget, retain, _ = loaded
    bad = dict(retain[0], labels=retain[0]["labels"][:, :-1])
    with pytest.raises(UserInputError, match="retain batch 0: labels have shape"):
        build_unlearner("newton", copy.deepcopy(model)).fit([forget], [bad])


def test_a_batch_that_is_not_a_dict_is_named(loaded, untouched):
    model, _, forget, retain, _ = loaded
    with pytest.raises(UserInputError, match="holdout batch 0 is a Tensor"):
        build_unlearner("newton", copy.deepcopy(model)).fit([forget], retain, holdout_batches=[forget["input_ids"]])


def test_a_typo_in_method_kwargs_fails_through_the_command_before_any_work(engine_project, untouched):
    code, out, err = run_cli(["fit", "--config", str(engine_project.config), "--model.method_kwargs", '{"stepz": 3}'],
                             cwd=engine_project.root)
    assert code != 0 and "'stepz'" in out + err and "valid settings" in out + err
    assert not engine_project.output.exists()


def _rank_without_forget(fabric: Fabric, out: Path) -> None:
    from lightning_unlearn.distributed import leave_process_group
    from lightning_unlearn.fabric import fabric_unlearn
    from lightning_unlearn.models import small_causal_lm

    torch.set_num_threads(1)
    x = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
    forget = [batch] if fabric.global_rank == 0 else []  # rank 1's share of the forget set is empty
    try:
        fabric_unlearn(fabric, small_causal_lm("gpt2", seed=0), forget, [batch])
        message = "no error"
    except Exception as err:  # noqa: BLE001 - the test records what each rank saw
        message = f"{type(err).__name__}: {err}"
    (out / f"rank{fabric.global_rank}.txt").write_text(message)
    leave_process_group()


def test_a_process_without_forget_batches_fails_the_same_way_on_every_process(tmp_path, untouched):
    """Not "Connection closed by peer" on the other process: both raise the same clear error."""
    Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").launch(_rank_without_forget, tmp_path)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1], messages
    assert "UserInputError: fabric_unlearn: process 1 of 2 got no forget batch" in messages[0]
    assert "forget batches per process: [1, 0]" in messages[0]


def _ranks_with_different_batch_counts(fabric: Fabric, out: Path) -> None:
    from lightning_unlearn.distributed import leave_process_group
    from lightning_unlearn.fabric import fabric_unlearn
    from lightning_unlearn.models import small_causal_lm

    torch.set_num_threads(1)
    x = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
    model = small_causal_lm("gpt2", seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    extra = 1 if fabric.global_rank == 0 else 0  # rank 0 has one batch more of the kind under test
    cases = {"forget": dict(forget_loader=[batch] * (1 + extra), retain_loader=[batch] * 2),
             "retain": dict(forget_loader=[batch], retain_loader=[batch] * (2 + extra)),
             "holdout": dict(forget_loader=[batch], retain_loader=[batch] * 2, holdout=[batch] * (1 + extra))}
    lines = []
    for kind, data in cases.items():
        try:
            fabric_unlearn(fabric, model, steps=1, **data)
            message = "no error"
        except Exception as err:  # noqa: BLE001 - the test records what each rank saw
            message = f"{type(err).__name__}: {err}"
        lines.append(f"{kind}\t{message}")
    unchanged = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    (out / f"rank{fabric.global_rank}.txt").write_text("\n".join([*lines, f"unchanged\t{unchanged}"]))
    leave_process_group()


def test_processes_with_different_batch_counts_fail_the_same_way_on_every_process(tmp_path, untouched):
    """Rank 0 with 2 forget batches and rank 1 with 1 (then retain 3 vs 2, holdout 2 vs 1): each keeps its share of
    its own list, so one of rank 0's batches would never enter the request. Both processes raise the same error,
    naming the kind of data, the counts per process and the fix, before any weight changes."""
    Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").launch(_ranks_with_different_batch_counts, tmp_path)
    ranks = [dict(line.split("\t", 1) for line in (tmp_path / f"rank{r}.txt").read_text().splitlines())
             for r in (0, 1)]
    assert ranks[0] == ranks[1], ranks
    for kind, counts in (("forget", "[2, 1]"), ("retain", "[3, 2]"), ("holdout", "[2, 1]")):
        message = ranks[0][kind]
        assert message.startswith(f"UserInputError: fabric_unlearn: the processes got different numbers of {kind} "
                                  f"batches ({kind} batches per process: {counts})"), message
        assert f"pass the same {kind} batches on every process" in message, message
    assert ranks[0]["unchanged"] == "True"


def test_the_newton_optimizer_refuses_a_huge_step_too(loaded, untouched):
    from lightning_unlearn.methods import build_curvature
    from lightning_unlearn.methods.losses import token_nll
    from lightning_unlearn.optim import NewtonUnlearner

    model, _, forget, retain, _ = loaded
    model = copy.deepcopy(model)
    curvature = build_curvature("kfac", model).fit(retain)
    opt = NewtonUnlearner(model.parameters(), curvature, lr=1e6, damping=1e-3, max_retries=1)
    before = weights(model)
    opt.zero_grad()
    token_nll(model(**{k: v for k, v in forget.items() if k != "labels"}).logits, forget)[0].mean().backward()
    opt.step()
    assert [r.reason for r in opt.history] == ["trust_region", "trust_region"] and same_weights(model, before)


@pytest.mark.parametrize(("override", "named"), [
    (["--model.scale", ".nan"], "scale must be a finite number > 0"),  # YAML for NaN
    (["--model.scale", "-1"], "scale must be a finite number > 0"),
    (["--model.damping", "-0.5"], "damping must be a finite number > 0"),
    (["--model.forget_loss", "hinge"], "unknown forget_loss 'hinge'"),
])
def test_nonsense_settings_fail_through_the_command_as_one_line(engine_project, untouched, override, named):
    code, out, err = run_cli(["fit", "--config", str(engine_project.config), *override], cwd=engine_project.root)
    assert code == 2 and named in err, (code, err[-2000:])
    assert [line for line in err.splitlines() if "error" in line.lower()] == [err.strip().splitlines()[-1]]
    assert "Traceback" not in err
    assert not engine_project.output.exists()


def _variant(engine_project, name: str, edit) -> Path:
    """A copy of the project's saved model, changed by `edit(state_dict, config) -> (state_dict, config)`."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = engine_project.root / name
    if not folder.exists():
        shutil.copytree(engine_project.model, folder)
        state = load_file(folder / "model.safetensors")
        config = json.loads((folder / "config.json").read_text())
        state, config = edit(state, config)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_nan_weights_in_a_saved_model_fail_through_the_command(engine_project, untouched):
    def poison(state, config):
        key = next(k for k in state if k.endswith("mlp.c_fc.weight"))
        state[key] = state[key].clone()
        state[key][0, 0] = float("nan")
        return state, config

    broken = _variant(engine_project, "nan_model", poison)
    before = {p.name: p.read_bytes() for p in broken.iterdir()}
    code, out, err = run_cli(["fit", "--config", str(engine_project.config), "--model.model", str(broken)],
                             cwd=engine_project.root)
    assert code == 2 and "not finite" in err and "c_fc.weight" in err, err[-2000:]
    assert {p.name: p.read_bytes() for p in broken.iterdir()} == before and not engine_project.output.exists()


def test_a_tokenizer_larger_than_the_model_fails_through_the_command(engine_project, untouched):
    def shrink(state, config):
        vocab = 20
        for key in [k for k in state if k.endswith("wte.weight") or k.endswith("lm_head.weight")]:
            state[key] = state[key][:vocab].clone()
        config["vocab_size"] = vocab
        return state, config

    small = _variant(engine_project, "small_vocab_model", shrink)
    code, out, err = run_cli(["fit", "--config", str(engine_project.config), "--model.model", str(small)],
                             cwd=engine_project.root)
    assert code == 2 and "tokenizer has 44 tokens" in err and "only 20 rows" in err, err[-2000:]
    assert not engine_project.output.exists()
