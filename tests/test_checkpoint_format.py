"""Curvature checkpoints are safetensors files that cannot run code: every backend round-trips bit-identically, the
header says what the file is, and pickled payloads, NaN and checkpoints of another model are refused."""

from __future__ import annotations

import json
import pathlib
import pickle
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from dense_models import lm_batch, tiny_gpt2
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from lightning_unlearn.callbacks import CurvatureCallback, Unlearn
from lightning_unlearn.checkpoint import (
    CURVATURE_FILE_FORMAT,
    LEGACY_CURVATURE_FILE_FORMAT,
    curvature_header,
    load_curvature_state,
    model_fingerprint,
    save_curvature,
)
from lightning_unlearn.errors import UserInputError
from lightning_unlearn.methods import build_curvature
from lightning_unlearn.models import small_causal_lm

BACKENDS = ["kfac", "diagonal", "woodfisher", "cg"]


def fitted(backend: str, model: torch.nn.Module | None = None):
    model = tiny_gpt2() if model is None else model
    return build_curvature(backend, model).fit([lm_batch(seed=2), lm_batch(seed=3)])


def wide_gpt2() -> torch.nn.Module:
    """`tiny_gpt2` with twice the width: the same parameter names, other shapes."""
    return small_causal_lm("gpt2", vocab_size=16, hidden=8, layers=1, heads=2, max_positions=8, dtype=torch.float64)


class Payload:
    """A pickle whose loading would create `marker` (what a malicious checkpoint does, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def write_payload(how: str, path: Path, marker: Path) -> Path:
    if how == "torch.save":
        torch.save(Payload(marker), path)
    elif how == "pickle.dump":
        with path.open("wb") as f:
            pickle.dump(Payload(marker), f)
    elif how == "legacy curvature file":
        torch.save({"format": LEGACY_CURVATURE_FILE_FORMAT, "state": {"backend": "kfac", "x": Payload(marker)},
                    "meta": {}}, path)
    else:  # a Lightning-checkpoint-shaped file
        torch.save({"callbacks": {"Unlearn{}": {"curvature": Payload(marker)}}, "state_dict": {}}, path)
    return path


def leaves(state, prefix=""):
    if isinstance(state, dict):
        return {k: v for key, sub in state.items() for k, v in leaves(sub, f"{prefix}/{key}").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, sub in enumerate(state) for k, v in leaves(sub, f"{prefix}/{i}").items()}
    return {prefix: state}


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_round_trips_bit_identically(tmp_path: Path, backend: str) -> None:
    curvature = fitted(backend)
    path = save_curvature(curvature, tmp_path / "curvature.safetensors", batches=2)
    state = load_curvature_state(path, model=curvature.model, backend=backend)
    before, after = leaves(curvature.state_dict()), leaves(state)
    assert before.keys() == after.keys()
    for k, v in before.items():
        if isinstance(v, torch.Tensor):
            assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
        else:
            assert after[k] == v and type(after[k]) is type(v), k
    loaded = build_curvature(backend, curvature.model)
    loaded.load_state_dict(state)
    if backend == "cg":  # matrix-free: a state keeps no batches, with any storage (see HessianFree)
        with pytest.raises(RuntimeError, match="keeps no batches"):
            loaded.apply({n: torch.ones_like(p) for n, p in curvature.model.named_parameters()
                          if n in curvature.param_names}, 1e-2)
        return
    params = dict(curvature.model.named_parameters())
    g = torch.Generator().manual_seed(0)
    vector = {n: torch.randn(params[n].shape, generator=g, dtype=params[n].dtype) for n in curvature.param_names}
    for power in (-1.0, 1.0):
        a, b = curvature.apply(vector, 1e-2, power), loaded.apply(vector, 1e-2, power)
        assert all(torch.equal(a[n], b[n]) for n in a), power


def test_the_file_is_safetensors_with_a_descriptive_header(tmp_path: Path) -> None:
    curvature = fitted("kfac")
    path = save_curvature(curvature, tmp_path / "c.safetensors", batches=2, global_step=7, world_size=1)
    assert not path.read_bytes().startswith((b"PK", b"\x80"))  # no zip, no pickle
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # atomic: no temporary file left
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == CURVATURE_FILE_FORMAT and meta["backend"] == "kfac" and meta["scope"] == "full"
    assert json.loads(meta["param_names"]) == list(curvature.param_names) and meta["world_size"] == "1"
    params = dict(curvature.model.named_parameters())
    assert json.loads(meta["param_shapes"]) == {n: list(params[n].shape) for n in curvature.param_names}
    assert meta["model_fingerprint"] == model_fingerprint(curvature.model, curvature.param_names)
    assert json.loads(meta["meta"]) == {"batches": 2, "global_step": 7}
    assert any(k.endswith("/A") for k in keys) and "count" in keys


def test_metadata_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="JSON-able"):
        save_curvature(fitted("diagonal"), tmp_path / "c.safetensors", model_object=object())
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump", "legacy curvature file", "lightning checkpoint"])
def test_pickled_payloads_are_refused_and_never_run(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    path = write_payload(how, tmp_path / "curvature.pt", marker)
    with pytest.raises(UserInputError, match="pickled Python objects.*never executes.*save_curvature"):
        load_curvature_state(path)
    model = tiny_gpt2()
    unlearn = Unlearn(curvature="kfac", curvature_data="full_minus_forget", full_curvature=path)
    with pytest.raises(UserInputError, match="pickled Python objects"):
        unlearn.unlearn(model, forget=[lm_batch(seed=4)])
    assert not marker.exists()


def test_older_torch_files_still_load_as_tensors_only(tmp_path: Path) -> None:
    curvature = fitted("kfac")
    path = tmp_path / "old.pt"
    torch.save({"format": LEGACY_CURVATURE_FILE_FORMAT, "state": curvature.state_dict(), "meta": {"batches": 2}},
               path)
    state = load_curvature_state(path, model=curvature.model, backend="kfac")
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
               for a, b in zip(leaves(curvature.state_dict()).values(), leaves(state).values()))


def test_nan_is_refused_naming_the_entry(tmp_path: Path) -> None:
    path = save_curvature(fitted("kfac"), tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("/G"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(UserInputError, match=f"NaN/inf in '{key}'"):
        load_curvature_state(path)
    with pytest.raises(ValueError, match="NaN/inf"):  # and nobody writes such a file in the first place
        save_curvature({"backend": "diagonal", "count": torch.tensor(float("inf"))}, tmp_path / "d.safetensors")


def test_a_checkpoint_of_a_wider_model_is_refused_naming_the_parameter(tmp_path: Path) -> None:
    path = save_curvature(fitted("kfac", wide_gpt2()), tmp_path / "wide.safetensors")
    first = "transformer.h.0.attn.c_attn.weight"
    with pytest.raises(UserInputError, match=rf"another model: parameter '{first}' has shape \(8, 24\) in the "
                                             r"checkpoint but \(4, 12\) in this model"):
        load_curvature_state(path, model=tiny_gpt2())
    unlearn = Unlearn(curvature="kfac", curvature_data="full_minus_forget", full_curvature=path)
    with pytest.raises(UserInputError, match=first):  # not "size of tensor a (9) must match ..." later on
        unlearn.unlearn(tiny_gpt2(), forget=[lm_batch(seed=4)])


def test_another_backend_is_refused(tmp_path: Path) -> None:
    path = save_curvature(fitted("diagonal"), tmp_path / "c.safetensors")
    with pytest.raises(UserInputError, match="holds a 'diagonal' curvature, but curvature='kfac'"):
        load_curvature_state(path, backend="kfac")
    assert load_curvature_state(path, backend="diagonal")["backend"] == "diagonal"


def test_world_size_matters_only_for_one_rank_s_share(tmp_path: Path) -> None:
    curvature = fitted("diagonal")
    full = save_curvature(curvature, tmp_path / "full.safetensors", world_size=2)
    assert load_curvature_state(full, world_size=4)["backend"] == "diagonal"  # the reduced state: any world size
    share = save_curvature(curvature, tmp_path / "rank.safetensors", world_size=2, scope="rank")
    assert load_curvature_state(share, world_size=2)["backend"] == "diagonal"
    with pytest.raises(UserInputError, match="world size 2, but this run has 1 processes"):
        load_curvature_state(share, world_size=1)


class _TinyModule(pl.LightningModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_gpt2()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def test_a_lightning_checkpoint_is_read_with_weights_only_and_checked(tmp_path: Path) -> None:
    batches = [{k: v[i] for k, v in lm_batch(b=4, seed=s).items()} for s in (2, 3) for i in range(4)]
    module = _TinyModule()
    callback = CurvatureCallback("kfac", path=tmp_path / "curvature.safetensors")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[callback], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(batches, batch_size=4))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    from_ckpt = load_curvature_state(tmp_path / "run.ckpt", model=module.model, backend="kfac")
    from_file = load_curvature_state(tmp_path / "curvature.safetensors", model=module.model, backend="kfac")
    assert leaves(from_ckpt).keys() == leaves(from_file).keys()
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
               for a, b in zip(leaves(from_ckpt).values(), leaves(from_file).values()))
    assert torch.load(tmp_path / "run.ckpt", weights_only=True)["callbacks"][callback.state_key]["curvature_meta"] \
        == curvature_header(callback.curvature)
    with pytest.raises(UserInputError, match="another model: parameter 'transformer.h.0.attn.c_attn.weight'"):
        load_curvature_state(tmp_path / "run.ckpt", model=wide_gpt2())
