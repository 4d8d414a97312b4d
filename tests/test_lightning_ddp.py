"""DDP with 2 CPU processes (gloo, `ddp_spawn`): curvature statistics are all-reduced through the strategy and
the unlearning update equals the single-process update on the same global data."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_unlearn.callbacks import ProcessGroupTeardown, Unlearn
from lightning_unlearn.checkpoint import load_curvature_state
from lightning_unlearn.methods import build_curvature
from lightning_unlearn.models import small_causal_lm

SEQ = 16


def encode(text: str) -> dict[str, torch.Tensor]:
    ids = [ord(c) % 127 for c in text[:SEQ]]
    n = len(ids)
    return {"input_ids": torch.tensor(ids + [127] * (SEQ - n)),
            "attention_mask": torch.tensor([1] * n + [0] * (SEQ - n)),
            "labels": torch.tensor(ids + [-100] * (SEQ - n))}


TRAIN = ["the cat sees a dog", "a bird likes sun", "my aunt reads", "old trees grow", "zq7 kx9 vv2 pq4",
         "red balls roll", "wm3 hh6 xr1 bt5", "the sky is big"]
FORGET = ["zq7 kx9 vv2 pq4", "wm3 hh6 xr1 bt5"]
HELD = ["a dog runs home", "the sun is red"]


def loader(texts: list[str], batch_size: int) -> DataLoader:
    return DataLoader([encode(t) for t in texts], batch_size=batch_size, shuffle=False)


class FrozenLM(pl.LightningModule):
    """Trains with lr 0, so both runs unlearn from the same weights; the curvature sees every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.model = small_causal_lm("gpt2", seed=0)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def make_unlearn(**kw) -> Unlearn:
    # the fixed step (absolute λ, no step-length search): a continuous function of the all-reduced statistics, so
    # the DDP update equals the single-process one to float precision
    return Unlearn(forget=loader(FORGET, 1), held_retain=next(iter(loader(HELD, 2))), method="newton",
                   curvature="kfac", curvature_data="full_minus_forget", damping=1e-2, scale=0.1, steps=2,
                   max_retain_increase=None, curvature_kwargs={"fisher_type": "empirical"},
                   method_kwargs={"damping_mode": "absolute", "step_search": False}, **kw)


def test_ddp_spawn_matches_single_process(tmp_path: Path) -> None:
    module = FrozenLM()
    start = {k: v.clone() for k, v in module.model.state_dict().items()}
    callback = make_unlearn(accumulate_every_n_batches=1, curvature_path=tmp_path / "curvature.pt")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1,
                         callbacks=[callback, ProcessGroupTeardown()],
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader(TRAIN, 2))  # each rank sees 2 batches of 2: half of the global data
    ddp_weights = module.model.state_dict()  # rank 0's weights, sent back by ddp_spawn

    # single process: the same statistics over the whole training data, the same request
    reference = FrozenLM()
    reference.model.load_state_dict(start)
    full = build_curvature("kfac", reference.model, fisher_type="empirical")
    with torch.enable_grad():
        for batch in loader(TRAIN, 4):
            full.accumulate(batch)
    full.finalize()
    records = make_unlearn(full_curvature=full).unlearn(reference)
    assert all(r.accepted for r in records) and len(records) == 2

    # factors all-reduced: the DDP curvature checkpoint equals the single-process one
    saved, single = load_curvature_state(tmp_path / "curvature.pt"), full.state_dict()
    assert float(saved["count"]) == float(single["count"]) > 0
    for name, layer in single["layers"].items():
        for key, value in layer.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                torch.testing.assert_close(saved["layers"][name][key], value, rtol=1e-4, atol=1e-6)
    # the update equals the single-process update (and it is not zero)
    moved = 0.0
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(ddp_weights[name], value, rtol=1e-4, atol=1e-6)
        moved += float((value - start[name]).abs().sum())
    assert moved > 1e-3
