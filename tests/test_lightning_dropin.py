"""Drop-in unlearning inside an ordinary `Trainer.fit`: a LightningModule written here (not the project's),
`Trainer(callbacks=[Unlearn(...)])` with the default recipe and a holdout target, and a curvature checkpoint that
serves a second request without retain data."""

from __future__ import annotations

import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_unlearn.callbacks import Unlearn
from lightning_unlearn.checkpoint import load_curvature_state
from lightning_unlearn.methods.losses import mean_nll
from lightning_unlearn.methods.target import retain_budget_nats
from lightning_unlearn.models import small_causal_lm

SEQ = 32
PAD = 127


def encode(text: str) -> dict[str, torch.Tensor]:
    """Characters as token ids (ASCII < 127), right-padded to SEQ; padding is not a label."""
    ids = [ord(c) % PAD for c in text[:SEQ]]
    n = len(ids)
    ids = ids + [PAD] * (SEQ - n)
    mask = [1] * n + [0] * (SEQ - n)
    labels = [i if m else -100 for i, m in zip(ids, mask)]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


WORDS = ("the", "a", "cat", "dog", "bird", "sees", "likes", "finds", "ball", "tree", "sun", "book", "red", "big",
         "old", "runs", "to", "and", "home", "sky")


def retain_texts(n: int = 64, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(6)) + "." for _ in range(n)]


FORGET = ["zq7 kx9 vv2 pq4 jj8", "wm3 hh6 xr1 bt5 nn0"]


def loader(texts: list[str], batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader([encode(t) for t in texts], batch_size=batch_size, shuffle=shuffle)


class TinyLM(pl.LightningModule):
    """A plain LightningModule around a tiny GPT-2: forward returns the HF output (logits and loss)."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = small_causal_lm("gpt2", seed=0)
        self.model.train()
        self.lr = lr

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        loss = self(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def nll(model, texts: list[str]) -> float:
    batch = {k: torch.stack([encode(t)[k] for t in texts]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        s, c = mean_nll(model.eval(), batch)
    return float(s) / c


FORGET2 = ["gk2 yy5 qc8 fl1 dz6", "uo4 rb9 mx3 sk7 pv2"]
# never trained, of the forget strings' kind: their loss is the level a model that never saw FORGET would have
HOLDOUT = ["ti5 zw8 ao3 ub2 dl7", "hm8 ds3 ax3 ni2 ym2", "yz1 et9 oe2 aa3 yg2", "fj5 gr3 fw3 mj0 ln2",
           "ei1 kj9 sa9 vw5 cj5", "jp5 fp7 wf0 ia5 ma8", "zn5 ms0 ob2 tg1 yh7", "lq5 qi7 ds5 jb6 cg5"]


class Probe(pl.Callback):
    """Measures the losses when training ends, before `Unlearn` (callbacks run in list order)."""

    def __init__(self, retain: list[str]) -> None:
        self.retain = retain
        self.before: dict[str, float] = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self.before = {"forget": nll(pl_module.model, FORGET), "retain": nll(pl_module.model, self.retain),
                       "holdout": nll(pl_module.model, HOLDOUT)}
        pl_module.model.train()


def flat(state, prefix=""):
    """Every tensor of a nested state dict, by path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        return {k: v for key, sub in state.items() for k, v in flat(sub, f"{prefix}/{key}").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, sub in enumerate(state) for k, v in flat(sub, f"{prefix}/{i}").items()}
    return {}


#: a rise of the forget NLL that the accepted steps of these requests make on any library version (+3.6 and +3.9
#: nats with torch 2.13 and transformers 5; the smallest seen, +0.7): movement, not a number of one version
RISE = 0.25


def moved_toward_holdout(summary) -> bool:
    """The forget set moved toward the holdout's level: its forget score rose, or (every forget example still below
    every holdout example: the score stays 0) its loss did; the engine's own order of progress."""
    return ((summary["forget_score_after"], summary["forget_loss_after"])
            > (summary["forget_score_before"], summary["forget_loss_before"]))


FIXED_STEP = {"damping": 0.1, "scale": 0.02, "steps": 1,
              "method_kwargs": {"damping_mode": "absolute", "step_search": False}}


def test_dropin_unlearns_and_curvature_checkpoint_serves_a_second_request(tmp_path: Path) -> None:
    torch.manual_seed(0)
    retain = retain_texts()
    held_batch = next(iter(loader(retain_texts(16, seed=1), 16)))
    train = retain + (FORGET + FORGET2) * 8  # the forget strings are memorised
    module = TinyLM()
    curvature_file = tmp_path / "curvature.pt"
    probe = Probe(retain)
    unlearn = Unlearn(  # knobs set explicitly: the fixed step (absolute λ, no step search); see the test below
        forget=loader(FORGET), retain=loader(retain[:16]), held_retain=held_batch, holdout=loader(HOLDOUT),
        method="newton", curvature="kfac", damping=0.1, scale=1.0, steps=3, max_retain_increase=0.1,
        method_kwargs={"damping_mode": "absolute", "step_search": False},
        accumulate_every_n_batches=1, accumulate_from_epoch=20, curvature_path=curvature_file,
    )
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=25, callbacks=[probe, unlearn, ckpt],
                         enable_progress_bar=False, logger=CSVLogger(tmp_path, name="logs"),
                         enable_model_summary=False)
    trainer.fit(module, loader(train, shuffle=True))

    # request 1, at the end of training: what the recipe guarantees, not how far one library version's numbers go
    # (the forget NLL rose 0.05 -> 3.7 on one version, 0.03 -> 0.74 on another): a documented status, the forget
    # set moving toward the holdout's level (reaching it when the status says so), the retain budget kept
    before, after = probe.before, {"forget": nll(module.model, FORGET), "retain": nll(module.model, retain)}
    assert before["forget"] < 0.5 < before["holdout"], before  # memorised; the holdout never seen
    summary = unlearn.last_summary  # the method's summary() of the request
    assert summary["status"] in ("target_reached", "budget_exhausted") and summary["target_source"] == "holdout"
    assert summary["steps_accepted"] == sum(r.accepted for r in unlearn.history) >= 1
    assert moved_toward_holdout(summary), summary
    assert before["forget"] + RISE < after["forget"], (before, after)
    if summary["status"] == "target_reached":
        assert summary["forget_score_after"] >= summary["target"], summary
    budget = retain_budget_nats(0.1, summary["retain_loss_before"])  # max_retain_increase=0.1, on held_retain
    assert summary["retain_loss_after"] <= summary["retain_loss_before"] + budget + 1e-9, summary
    assert all(r.retain_loss <= summary["retain_loss_before"] + budget + 1e-9 for r in unlearn.history if r.accepted)
    assert after["forget"] == pytest.approx(summary["forget_loss_after"], rel=1e-4)
    assert summary["holdout_loss"] == pytest.approx(before["holdout"], rel=1e-4)  # the holdout, before unlearning
    # every decision logged through the trainer's logger, numbers only
    metrics = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "unlearn/forget_loss" in metrics and "unlearn/damping" in metrics and "unlearn/accepted" in metrics
    assert "unlearn/status_code" in metrics and "unlearn/target" in metrics
    logged = "".join(p.read_text(errors="ignore") for p in Path(trainer.logger.log_dir).rglob("*") if p.is_file())
    assert not any(text in logged for text in FORGET + FORGET2)

    # the curvature checkpoint: its own file and the Lightning checkpoint hold the same finalized statistics
    from_file = load_curvature_state(curvature_file)
    from_ckpt = load_curvature_state(tmp_path / "ckpt" / "last.ckpt")
    assert from_file["backend"] == "kfac" and float(from_file["count"]) > 0
    a, b = flat(from_file), flat(from_ckpt)
    assert a.keys() == b.keys() and len(a) > 4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)

    # request 2, later, with no retain data at all: full-data curvature minus the forget curvature, the same
    # holdout target; knobs set explicitly (the fixed step: absolute λ, η = 0.02, one step, no step search)
    f2_before = nll(module.model, FORGET2)
    weights = {k: v.clone() for k, v in module.model.state_dict().items()}
    results = {}
    for name, source in {"file": curvature_file, "lightning": tmp_path / "ckpt" / "last.ckpt"}.items():
        module.model.load_state_dict(weights)
        if name == "file":  # the holdout given to the callback, or to the request
            second = Unlearn(forget=loader(FORGET2), curvature="kfac", curvature_data="full_minus_forget",
                             full_curvature=source, holdout=loader(HOLDOUT), **FIXED_STEP)
            records = second.unlearn(module)
        else:
            second = Unlearn(curvature="kfac", curvature_data="full_minus_forget", full_curvature=source,
                             **FIXED_STEP)
            records = second.unlearn(module, forget=loader(FORGET2), holdout=loader(HOLDOUT))
        # no retain data: the budget is measured on the holdout (the only never-trained data at hand), and kept
        summary = second.last_summary
        assert records[-1].accepted and records[-1].retain_loss is not None
        assert summary["target_source"] == "holdout" and summary["steps_accepted"] >= 1
        assert summary["retain_loss_before"] == pytest.approx(summary["holdout_loss"])
        assert summary["retain_loss_after"] <= summary["retain_loss_before"] + retain_budget_nats(
            0.05, summary["retain_loss_before"]) + 1e-9, summary  # the default max_retain_increase
        assert moved_toward_holdout(summary), summary
        results[name] = (nll(module.model, FORGET2), nll(module.model, retain))
    f2_after, _ = results["file"]
    assert f2_before + RISE < f2_after, (f2_before, f2_after)
    assert results["lightning"] == pytest.approx(results["file"], rel=1e-4)  # the same statistics, the same step


def test_unlearn_with_holdout_reaches_the_target_with_the_default_recipe() -> None:
    from canary_corpus import memorise

    model, forget, retain, held, holdout = memorise("gpt2")  # 4 memorised digit canaries, 8 unseen ones
    callback = Unlearn(forget=[forget], retain=retain, held_retain=held, holdout=[holdout])  # no knob set
    records = callback.unlearn(model)
    summary = callback.last_summary
    assert summary["status"] == "target_reached" and summary["target_source"] == "holdout", summary
    assert records[-1].reason == "target_reached" and callback.history == records
    assert summary["forget_loss_after"] > summary["forget_loss_before"] + 1.0, summary
    assert summary["retain_loss_after"] <= 1.05 * summary["retain_loss_before"], summary
