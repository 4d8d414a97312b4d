"""Mistakes around the Lightning callbacks, caught early and by name: a `model_getter` that picks a module other
than the trained language model (a teacher, a backbone without its head, the LightningModule itself) fails before
training with a message naming `model_getter=`; a run resumed from a checkpoint taken during training continues
its curvature statistics (the same curvature as an uninterrupted run); checkpoint files saved before a deletion
request are named in a warning (they still hold the forget data)."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_unlearn.callbacks import (
    CheckpointsPredateUnlearningWarning,
    CurvatureCallback,
    CurvatureResumeWarning,
    Unlearn,
)
from lightning_unlearn.checkpoint import load_curvature_state
from lightning_unlearn.errors import UserInputError
from lightning_unlearn.models import small_causal_lm, small_config

SEQ = 16
PAD = 127
FORGET = ["zq7 kx9 vv2", "wm3 hh6 xr1"]
RETAIN = ["the cat sees a ball.", "a dog likes the sun.", "the bird finds a book.", "an old tree runs home.",
          "a red sky and a sun.", "the big dog runs to a tree.", "a cat finds the old book.", "the sun sees a bird."]
#: one request step of a fixed length: cheap, and enough to see which weights it changed
ONE_STEP = {"method": "newton", "curvature": "kfac", "damping": 0.1, "scale": 0.02, "steps": 1,
            "max_retain_increase": None, "method_kwargs": {"damping_mode": "absolute", "step_search": False}}


def encode(text: str) -> dict[str, torch.Tensor]:
    """Characters as token ids (< 127), right-padded to SEQ; padding is not a label."""
    ids = [ord(c) % PAD for c in text[:SEQ]]
    n = len(ids)
    ids = ids + [PAD] * (SEQ - n)
    mask = [1] * n + [0] * (SEQ - n)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
            "labels": torch.tensor([i if m else -100 for i, m in zip(ids, mask)])}


def loader(texts: list[str], batch_size: int = 4) -> DataLoader:
    return DataLoader([encode(t) for t in texts], batch_size=batch_size, shuffle=False)


def trainer(tmp_path: Path, callbacks: list, max_epochs: int = 1, **kw) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=callbacks, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir=tmp_path)
    options.update(kw)
    return pl.Trainer(**options)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


class Distill(pl.LightningModule):
    """Distillation: `student` is trained (the optimizer holds only its parameters); `model` is the teacher, run
    under no_grad (its requires_grad left on, or frozen)."""

    def __init__(self, freeze_teacher: bool = False) -> None:
        super().__init__()
        self.student = small_causal_lm("gpt2", seed=0).train()
        self.model = small_causal_lm("gpt2", seed=1)
        self.model.requires_grad_(not freeze_teacher)

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            teacher = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = self.student(**batch)
        kl = torch.nn.functional.kl_div(out.logits.log_softmax(-1), teacher.softmax(-1), reduction="batchmean")
        return out.loss + 0.1 * kl

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=1e-2)


@pytest.mark.parametrize("freeze_teacher", [False, True], ids=["teacher", "frozen-teacher"])
def test_a_teacher_in_the_model_attribute_is_refused_before_training(tmp_path: Path, freeze_teacher: bool) -> None:
    module = Distill(freeze_teacher)
    student, teacher = weights(module.student), weights(module.model)
    callback = Unlearn(forget=loader(FORGET), retain=loader(RETAIN), **ONE_STEP)
    fit = trainer(tmp_path, [callback])
    with pytest.raises(UserInputError, match=r"pl_module\.model \(a GPT2LMHeadModel\).*model_getter=lambda m: "
                                             r"m\.student") as refused:
        fit.fit(module, loader(RETAIN + FORGET))
    assert fit.global_step == 0 and callback.requests == 0  # before training, and nothing unlearned
    assert unchanged(module.student, student) and unchanged(module.model, teacher)
    assert not any(text in str(refused.value) for text in FORGET)


def test_a_frozen_teacher_is_refused_by_name_outside_training() -> None:
    module = Distill(freeze_teacher=True)  # no trainer: no optimizer to tell; the frozen weights tell
    teacher = weights(module.model)
    with pytest.raises(UserInputError, match=r"all frozen \(requires_grad=False\).*model_getter=lambda m: "
                                             r"m\.student"):
        Unlearn(forget=loader(FORGET), retain=loader(RETAIN), **ONE_STEP).unlearn(module)
    assert unchanged(module.model, teacher)


def test_the_suggested_model_getter_unlearns_the_trained_student(tmp_path: Path) -> None:
    module = Distill()
    teacher = weights(module.model)
    seen: dict[str, dict[str, torch.Tensor]] = {}

    class Before(pl.Callback):  # runs before Unlearn (list order): the student's trained weights
        def on_train_end(self, trainer, pl_module) -> None:
            seen["student"] = weights(pl_module.student)

    callback = Unlearn(forget=loader(FORGET), retain=loader(RETAIN), model_getter=lambda m: m.student, **ONE_STEP)
    trainer(tmp_path, [Before(), callback]).fit(module, loader(RETAIN + FORGET))
    assert callback.requests == 1 and callback.history[-1].accepted
    assert not unchanged(module.student, seen["student"])  # the request changed the trained model ...
    assert unchanged(module.model, teacher)  # ... and not the teacher


class Headed(pl.LightningModule):
    """A backbone (`model`: hidden states, no LM head) and a separate head: the default getter's `model` is not a
    language model."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import AutoModel

        torch.manual_seed(0)
        self.model = AutoModel.from_config(small_config("gpt2"), attn_implementation="eager")
        self.head = torch.nn.Linear(32, 128, bias=False)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"])
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def test_a_backbone_without_its_head_is_refused_before_training(tmp_path: Path) -> None:
    callback = Unlearn(forget=loader(FORGET), retain=loader(RETAIN), **ONE_STEP)
    fit = trainer(tmp_path, [callback])
    with pytest.raises(UserInputError, match=r"pl_module\.model \(a GPT2Model.*BaseModelOutput.*model_getter="):
        fit.fit(Headed(), loader(RETAIN + FORGET))
    assert fit.global_step == 0 and callback.requests == 0


class Wrapped(pl.LightningModule):
    """The language model under `net` (no `model` attribute) and `forward(**batch)`: the default getter picks the
    LightningModule itself, which cannot be called with `input_ids` alone."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_causal_lm("gpt2", seed=0).train()

    def forward(self, **batch):
        return self.net(**batch)

    def training_step(self, batch, batch_idx):
        return self(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("kind", ["Unlearn", "CurvatureCallback"])
def test_a_model_under_another_attribute_fails_before_training_naming_model_getter(tmp_path: Path, kind: str) -> None:
    if kind == "Unlearn":
        callback = Unlearn(forget=loader(FORGET), retain=loader(RETAIN), **ONE_STEP)
    else:  # no forget batch at fit start: the first training batch is tried before its step
        callback = CurvatureCallback("kfac", every_n_batches=1, path=tmp_path / "curvature.safetensors")
    fit = trainer(tmp_path, [callback], max_epochs=3)
    with pytest.raises(UserInputError, match=rf"the LightningModule itself \(Wrapped.*forward\(\).*"
                                             rf"{kind}\(\.\.\., model_getter=lambda m: m\.net\)"):
        fit.fit(Wrapped(), loader(RETAIN + FORGET))
    assert fit.global_step == 0
    assert not (tmp_path / "curvature.safetensors").exists()


class TinyLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = small_causal_lm("gpt2", seed=0).train()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def curvature_run(tmp_path: Path, kind: str, path: Path, max_epochs: int, ckpt: ModelCheckpoint | None = None,
                  ckpt_path: Path | None = None) -> CurvatureCallback:
    """A fit that accumulates a K-FAC curvature checkpoint on every training batch (unshuffled: the same batches
    in the same order, so a resumed run trains exactly like an uninterrupted one)."""
    torch.manual_seed(0)
    if kind == "Unlearn":
        callback: CurvatureCallback = Unlearn(forget=loader(FORGET), retain=loader(RETAIN), curvature="kfac",
                                              accumulate_every_n_batches=1, curvature_path=path,
                                              unlearn_on_train_end=False)
    else:
        callback = CurvatureCallback("kfac", every_n_batches=1, path=path)
    callbacks = [callback] + ([ckpt] if ckpt is not None else [])
    trainer(tmp_path, callbacks, max_epochs=max_epochs, enable_checkpointing=ckpt is not None).fit(
        TinyLM(), loader(RETAIN + FORGET), ckpt_path=ckpt_path)
    return callback


@pytest.mark.parametrize(("kind", "same_path"), [("CurvatureCallback", True), ("Unlearn", False)],
                         ids=["CurvatureCallback", "Unlearn-new-path"])
def test_a_resumed_run_continues_the_curvature_statistics(tmp_path: Path, kind: str, same_path: bool) -> None:
    full = curvature_run(tmp_path, kind, tmp_path / "full.safetensors", max_epochs=4)
    part_file = tmp_path / "part.safetensors"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    part = curvature_run(tmp_path, kind, part_file, max_epochs=2, ckpt=ckpt)  # "interrupted" after 2 epochs
    assert part.batches_seen == full.batches_seen // 2 == 6
    resumed_file = part_file if same_path else tmp_path / "resumed.safetensors"
    resumed = curvature_run(tmp_path, kind, resumed_file, max_epochs=4, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.batches_seen == full.batches_seen == 12
    a, b = load_curvature_state(tmp_path / "full.safetensors"), load_curvature_state(resumed_file)
    assert float(b["count"]) == float(a["count"]) > 0
    assert a["layers"].keys() == b["layers"].keys()
    for name in a["layers"]:
        for factor in ("A", "G"):
            torch.testing.assert_close(b["layers"][name][factor], a["layers"][name][factor], rtol=1e-5, atol=1e-7)
    # the Lightning checkpoint still serves requests: its finalized copy reads as a curvature checkpoint
    assert float(load_curvature_state(tmp_path / "ckpt" / "last.ckpt")["count"]) == pytest.approx(
        float(a["count"]) / 2)


def test_a_checkpoint_from_another_number_of_processes_warns_and_older_checkpoints_still_load(tmp_path: Path
                                                                                             ) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    curvature_run(tmp_path, "CurvatureCallback", tmp_path / "part.safetensors", max_epochs=1, ckpt=ckpt)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    (key,) = [k for k in saved["callbacks"] if k.startswith("CurvatureCallback")]
    state = saved["callbacks"][key]
    state["accumulators"] = state["accumulators"] * 2  # as if two processes had saved it
    torch.save(saved, tmp_path / "two.ckpt")
    with pytest.warns(CurvatureResumeWarning, match="gathered on 2 process.*this run has 1"):
        two = curvature_run(tmp_path, "CurvatureCallback", tmp_path / "part.safetensors", max_epochs=2,
                            ckpt_path=tmp_path / "two.ckpt")
    assert two.has_curvature  # the checkpoint's finalized statistics, as before this version
    del state["accumulators"]  # a checkpoint of an older version: finalized statistics only
    torch.save(saved, tmp_path / "old.ckpt")
    old = curvature_run(tmp_path, "CurvatureCallback", tmp_path / "part.safetensors", max_epochs=2,
                        ckpt_path=tmp_path / "old.ckpt")
    assert old.has_curvature and float(old.curvature.count) > 0


class Evaluated(TinyLM):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss)

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.model(**batch).loss)


def test_checkpoints_saved_before_the_request_are_named_in_a_warning(tmp_path: Path) -> None:
    callback = Unlearn(forget=loader(FORGET), retain=loader(RETAIN), **ONE_STEP)
    fit = trainer(tmp_path, [callback], max_epochs=2, enable_checkpointing=True, num_sanity_val_steps=0)
    with pytest.warns(CheckpointsPredateUnlearningWarning) as caught:
        fit.fit(Evaluated(), loader(RETAIN + FORGET), val_dataloaders=loader(RETAIN))
    assert callback.requests == 1
    saved = fit.checkpoint_callback.best_model_path
    assert saved and Path(saved).is_file()
    message = str(next(w.message for w in caught if isinstance(w.message, CheckpointsPredateUnlearningWarning)))
    assert saved in message and "forget data" in message and "ckpt_path=" in message and "save" in message
    assert not any(text in message for text in FORGET)


def test_no_checkpoint_warning_without_saved_checkpoints(tmp_path: Path) -> None:
    callback = Unlearn(forget=loader(FORGET), retain=loader(RETAIN), **ONE_STEP)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [callback]).fit(TinyLM(), loader(RETAIN + FORGET))
    assert callback.requests == 1
    assert not any(isinstance(w.message, CheckpointsPredateUnlearningWarning) for w in caught)
