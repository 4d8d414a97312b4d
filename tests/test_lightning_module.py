"""`UnlearningModule`: a Lightning fit on combined forget/retain batches, validation metrics, an atomic
`save_pretrained`, and PEFT/LoRA models (curvature and updates on the adapters only)."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from lightning_unlearn.models import small_causal_lm
from lightning_unlearn.module import UnlearningModule

SEQ = 16


def batches(n: int, seed: int, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 127, (n, SEQ), generator=g)
    rows = [{"input_ids": r, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": r.clone()} for r in ids]
    return DataLoader(rows, batch_size=batch_size)


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def trainer(tmp_path: Path, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_epochs=1, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, logger=CSVLogger(tmp_path, name="logs"), log_every_n_steps=1,
                      num_sanity_val_steps=0, **kw)


def test_fit_on_combined_loader_logs_and_saves(tmp_path: Path) -> None:
    original = tmp_path / "original"
    small_causal_lm("gpt2", seed=0).save_pretrained(original)
    before = tree_hash(original)
    forget, retain = batches(8, seed=1), batches(16, seed=2)
    # a random model: each step may move the weights by a quarter of their norm, so that the run's trust region
    # (the steps together, at most their norm) leaves room for several steps
    module = UnlearningModule(str(original), method="newton", curvature="kfac", damping=1e-2, scale=1.0,
                              max_retain_increase=0.5, method_kwargs={"max_step_norm": 0.25})
    module.set_curvature_data(retain)
    t = trainer(tmp_path)
    t.fit(module, train_dataloaders=CombinedLoader({"forget": forget, "retain": retain}, "max_size_cycle"),
          val_dataloaders=[forget, retain])
    assert len(module.history) >= 3 and any(r.accepted for r in module.history)
    metrics = t.callback_metrics
    for key in ("val/forget_loss", "val/retain_loss", "val/forget_ppl", "val/retain_ppl"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    torch.testing.assert_close(metrics["val/forget_ppl"], metrics["val/forget_loss"].exp(), rtol=1e-4, atol=1e-4)
    logged = (Path(t.logger.log_dir) / "metrics.csv").read_text()
    assert "unlearn/forget_loss" in logged and "val/retain_ppl" in logged

    # validation before/after: the forget loss went up
    start = UnlearningModule(str(original))
    v0 = trainer(tmp_path / "v0").validate(start, dataloaders=[forget, retain], verbose=False)
    assert metrics["val/forget_loss"] > v0[0]["val/forget_loss"]

    out = module.save_pretrained(tmp_path / "unlearned")
    assert (out / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, value in module.model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value)
    assert tree_hash(original) == before  # the original checkpoint is untouched
    module.save_pretrained(tmp_path / "unlearned")  # overwriting an earlier export is atomic too
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".unlearned")]
    with pytest.raises(ValueError, match="refusing to overwrite the original checkpoint"):
        module.save_pretrained(original)


def test_peft_lora_curvature_on_adapters_only(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = small_causal_lm("gpt2", seed=0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                             init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    forget, retain = batches(4, seed=1), batches(8, seed=2)
    module = UnlearningModule(model, method="newton", curvature="kfac", damping=1e-2, scale=1.0,
                              max_retain_increase=None)
    module.set_curvature_data(retain)
    trainer(tmp_path).fit(module, CombinedLoader({"forget": forget, "retain": retain}))
    names = module.unlearner.curvature.param_names
    assert names and all("lora_" in n for n in names)
    assert set(names) == set(lora)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if n in lora)


def test_refresh_every_refits_the_curvature_while_lightning_drives_the_steps(tmp_path: Path) -> None:
    class Counting(UnlearningModule):
        fits = 0

        def _curvature_source(self):
            Counting.fits += 1
            return super()._curvature_source()

    forget, retain = batches(8, seed=1), batches(16, seed=2)
    # the fixed step (no step search, no target): every step is "accepted", so the run goes on to max_steps
    module = Counting(small_causal_lm("gpt2", seed=0), method="newton", curvature="diagonal", damping=1.0,
                      scale=1e-3, max_retain_increase=None, refresh_every=2, curvature_batches=2,
                      method_kwargs={"step_search": False})
    module.set_curvature_data(retain)
    trainer(tmp_path, max_steps=4).fit(module, train_dataloaders=CombinedLoader(
        {"forget": forget, "retain": retain}, "max_size_cycle"))
    assert len(module.history) == 4 and all(r.reason == "accepted" for r in module.history)
    assert module.status == "budget_exhausted"  # no target: max_steps ended the run
    assert Counting.fits == 1 + 1  # on_train_start, then before step 2 (steps 0..3, refresh at global step 2)


# ---------------------------------------------------------------------------------------------- the target
class HoldoutData(pl.LightningDataModule):
    """A data module with forget, retain and holdout splits (`dataloader(split)`), like `ForgetRetainDataModule`:
    4 memorised digit canaries (labelled on the digits), retain text, 8 never-trained canaries as the holdout."""

    def __init__(self, forget, retain, held, holdout) -> None:
        super().__init__()
        self.splits = {"forget": [forget], "retain": retain, "holdout": [holdout]}
        self.held = held

    def dataloader(self, split: str) -> list:
        return self.splits[split]

    def curvature_dataloader(self, split: str = "retain") -> list:
        return self.dataloader(split)

    def train_dataloader(self) -> CombinedLoader:  # the held retain batch first: the run's safety budget
        return CombinedLoader({"forget": DataLoader([self.splits["forget"][0]] * 5, batch_size=None),
                               "retain": DataLoader([self.held] * 5, batch_size=None)}, "max_size_cycle")


def test_the_run_stops_itself_at_the_holdout_target(tmp_path: Path) -> None:
    from canary_corpus import memorise

    model, forget, retain, held, holdout = memorise("gpt2")
    data = HoldoutData(forget, retain, held, holdout)
    # the default recipe (no damping, no scale); the datamodule's holdout split sets the target
    module = UnlearningModule(model, method="newton", curvature="kfac")
    t = trainer(tmp_path, max_steps=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(module, datamodule=data)
    assert not any("knowledge regime" in str(w.message) for w in caught)  # canaries: the secret recipe, 5 steps
    assert module.status == "target_reached", [r.reason for r in module.history]
    assert module.unlearner.target_source == "holdout"
    assert module.history[-1].reason == "target_reached" and all(r.accepted for r in module.history)
    # the staged recipe spreads its stages over max_steps and stops at the target (at the latest at the last one)
    assert t.global_step == len(module.history) <= 5
    summary = module.summary()
    assert summary["status"] == "target_reached" and summary["steps_accepted"] == len(module.history)
    assert summary["forget_loss_after"] > summary["forget_loss_before"] + 1.0, summary
    from lightning_unlearn.methods.records import SUMMARY_FIELDS  # one summary schema: the request's

    assert tuple(summary) == SUMMARY_FIELDS and summary == module.unlearner.summary()
    assert summary["forget_score_after"] >= 0.5 and summary["retain_loss_before"] is not None, summary
    logged = (Path(t.logger.log_dir) / "metrics.csv").read_text()
    assert "unlearn/status_code" in logged and "unlearn/target" in logged

    # set_holdout_data wins over the datamodule; a target already met: no step at all (the unlearned canaries sit
    # above every example of a trained retain batch), and a holdout of trained text is warned about (the held retain
    # batch of the run itself would be refused: the same examples as the retain data)
    from lightning_unlearn.methods.holdout import HoldoutWarning

    again = UnlearningModule(model, method="newton", curvature="kfac").set_holdout_data([retain[0]])
    t2 = trainer(tmp_path / "again", max_steps=5)
    with pytest.warns(HoldoutWarning, match="holdout: "):
        t2.fit(again, datamodule=data)
    assert again.status == "target_reached" and again.history == [] and t2.global_step == 0


@pytest.mark.parametrize(("max_steps", "steps", "repeats"), [(12, 5, 2), (6, 5, 1), (3, 3, 0), (-1, 5, 2)])
def test_max_steps_caps_the_request_s_staged_steps_and_repeats(tmp_path: Path, max_steps, steps, repeats) -> None:
    """A second-order request under Lightning takes the steps every other driver takes (5 stages and up to 2 repeats
    of the last), within `max_steps`: fewer give fewer, larger stages and no repeat; unbounded gives all of them."""
    from canary_corpus import memorise

    model, forget, retain, held, holdout = memorise("gpt2")
    module = UnlearningModule(model, method="newton", curvature="kfac")
    t = pl.Trainer(accelerator="cpu", max_epochs=3, max_steps=max_steps, enable_progress_bar=False, logger=False,
                   enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
    t.fit(module, datamodule=HoldoutData(forget, retain, held, holdout))
    assert (module.unlearner.steps, module.unlearner.final_repeats) == (steps, repeats)
    assert 1 <= t.global_step == len(module.history) <= steps + repeats
    assert module.status in ("target_reached", "budget_exhausted")
