"""Bad input, curvature checkpoints: each case hands lightning-unlearn a broken, foreign or hostile curvature checkpoint
(never unpickled; refused when foreign, broken or non-finite), checks that the error names the problem (and the file),
that no pickled code ran, and that the user's model and data are byte-for-byte unchanged afterwards (every case, by the
autouse `user_files_untouched` check, on top of each case's own).
"""

from __future__ import annotations

import os
import pathlib
import pickle
from pathlib import Path

import pytest
import torch
from bad_input_fixtures import (
    make_project,
    run_cli,
    user_files_untouched,  # noqa: F401 - the autouse check of every case
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lightning_unlearn.callbacks import Unlearn
from lightning_unlearn.checkpoint import load_curvature_state, save_curvature
from lightning_unlearn.errors import EXIT_USER_ERROR, UserInputError
from lightning_unlearn.methods import build_curvature
from lightning_unlearn.models import load_causal_lm


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
