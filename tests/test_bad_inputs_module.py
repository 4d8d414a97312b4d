"""Bad input to `UnlearningModule` driven by a real `lightning.Trainer`: a forget loader of several batches (the target
is judged on the whole forget set, never on one batch) and a fit resumed from a checkpoint (refused: the run's retain
budget, losses before and target belong to the original model).
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from canary_corpus import V, corpus
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader

from lightning_unlearn.errors import UserInputError
from lightning_unlearn.models import small_causal_lm
from lightning_unlearn.module import UnlearningModule

Batch = dict[str, torch.Tensor]


def rows(ids: torch.Tensor, labels: torch.Tensor | None = None) -> list[Batch]:
    """One dict per example (what a `DataLoader` batches), labelled on `labels` (default: every position)."""
    labels = ids.clone() if labels is None else labels
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y} for x, y in zip(ids, labels)]


def trainer(tmp_path: Path, **kw: Any) -> pl.Trainer:
    settings: dict[str, Any] = dict(accelerator="cpu", enable_progress_bar=False, enable_checkpointing=False,
                                    enable_model_summary=False, logger=False, num_sanity_val_steps=0)
    settings.update(kw)
    return pl.Trainer(default_root_dir=tmp_path, **settings)


def memorised_but_two() -> dict[str, Any]:
    """A tiny GPT-2 that memorised 10 of 12 digit canaries (labelled on their digits); the other 2 ("fresh") carry a
    token the model never saw in their span, so they look more unseen than the never-trained holdout canaries.
    Returns the model, the memorised and fresh forget rows, the retain rows and the holdout rows."""
    retain, _, canaries, labels, more, more_labels = corpus(seed=0, n_holdout=16)
    canaries, labels = torch.cat([canaries, more]), torch.cat([labels, more_labels])  # 20 canaries
    fresh, fresh_labels = canaries[18:20].clone(), labels[18:20].clone()
    fresh[:, 8:14] = V - 1  # the Markov chain never emits V - 1: the model learns that it never comes
    fresh_labels[:, 8:14] = V - 1
    model = small_causal_lm("gpt2", vocab_size=V, hidden=32, seed=0).train()
    data = torch.cat([retain, canaries[:10].repeat(8, 1)])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        x = data[torch.randint(0, len(data), (32,), generator=g)]
        loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return {"model": model, "memorised": rows(canaries[:10], labels[:10]), "fresh": rows(fresh, fresh_labels),
            "retain": rows(retain[:128]), "holdout": rows(canaries[10:18], labels[10:18])}


@pytest.fixture(scope="module")
def uneven_forget_set() -> dict[str, Any]:
    """`memorised_but_two()`, trained once for the module."""
    return memorised_but_two()


def whole_set_loss(model: nn.Module, forget_rows: list[Batch]) -> float:
    """The forget set's mean token NLL over its labelled positions (what the summary's forget losses are)."""
    ids = torch.stack([r["input_ids"] for r in forget_rows])
    labels = torch.stack([r["labels"] for r in forget_rows])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]
    return float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)))


class WholeSetScore(Callback):
    """After every training step: the whole forget set's score at the step's weights, measured apart from the
    module's own decisions (fresh batch objects, no remembered score)."""

    def __init__(self, forget_rows: list[Batch]) -> None:
        self.batches = [next(iter(DataLoader(forget_rows, batch_size=len(forget_rows))))]
        self.scores: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if module.history:
            self.scores.append(module.unlearner.measure_forget_score(self.batches)[0])


def unlearn(setup: dict[str, Any], forget_rows: list[Batch], tmp_path: Path) -> tuple[UnlearningModule, WholeSetScore,
                                                                                       pl.Trainer]:
    """The default recipe on a copy of the memorised model, 5 steps at most, forget batches of 2 in order (a retain
    budget of 50 %: this tiny model spends 5 % in one step)."""
    module = UnlearningModule(copy.deepcopy(setup["model"]), method="newton", curvature="kfac",
                              max_retain_increase=0.5)
    module.set_curvature_data(DataLoader(setup["retain"], batch_size=32))
    module.set_holdout_data(DataLoader(setup["holdout"], batch_size=8))
    whole = WholeSetScore(forget_rows)
    t = trainer(tmp_path, max_steps=5, callbacks=[whole])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # holdout and how-it-ended warnings of this tiny setup: not the point here
        t.fit(module, CombinedLoader({"forget": DataLoader(forget_rows, batch_size=2),
                                      "retain": DataLoader(setup["retain"], batch_size=32)}, "max_size_cycle"))
    return module, whole, t


def test_a_first_forget_batch_that_looks_unseen_does_not_end_the_run(uneven_forget_set, tmp_path: Path) -> None:
    """The first of 6 forget batches is past the target, the other 5 are memorised: the module judged `begin` on the
    first batch alone and ended the run at once, `target_reached` with 0 steps and the weights unchanged. The whole
    forget set decides: steps are taken, and the losses before are the whole set's."""
    setup = uneven_forget_set
    forget_rows = setup["fresh"] + setup["memorised"]
    module, whole, t = unlearn(setup, forget_rows, tmp_path)
    summary = module.summary()
    assert module.history and t.global_step >= 1, (module.status, summary)
    assert summary["forget_score_before"] < summary["target"], summary  # the whole set is still memorised
    assert summary["forget_loss_before"] == pytest.approx(whole_set_loss(setup["model"], forget_rows), rel=1e-4)
    assert summary["forget_loss_after"] == pytest.approx(whole_set_loss(module.model, forget_rows), rel=1e-4)
    for record, score in zip(module.history, whole.scores):
        assert (record.reason == "target_reached") == (record.accepted and score >= record.target), (record, score)


def test_a_forget_batch_that_looks_unseen_does_not_stop_the_run(uneven_forget_set, tmp_path: Path) -> None:
    """The second forget batch is past the target, the rest memorised: its step reached the target on that batch,
    so the module stopped with `target_reached` while the whole forget set was still memorised. Every step's stop
    and the status are judged on the whole forget set, and the step that meets the batch with nothing left to
    forget takes the whole forget set (a step on the batch alone is a vanishing one, and the run stalled after it)."""
    setup = uneven_forget_set
    forget_rows = setup["memorised"][:2] + setup["fresh"] + setup["memorised"][2:]
    module, whole, t = unlearn(setup, forget_rows, tmp_path)
    assert len(module.history) >= 2 and len(whole.scores) == t.global_step, [r.reason for r in module.history]
    for record, score in zip(module.history, whole.scores):
        assert (record.reason == "target_reached") == (record.accepted and score >= record.target), (record, score)
    for record, score in zip(module.history, whole.scores):
        if record.accepted:
            assert record.forget_score == pytest.approx(score, abs=1e-9)  # the record speaks for the whole set
    summary = module.summary()
    reached = summary["forget_score_after"] >= summary["target"]
    assert (module.status == "target_reached") == reached, (module.status, summary)
    assert summary["forget_score_after"] >= summary["forget_score_before"] + 0.2, whole.scores  # no stall


def test_reading_the_forget_set_keeps_the_order_of_a_seeded_shuffle(tmp_path: Path) -> None:
    """The forget set is read once at the start; a shuffled forget loader with a seeded generator (the data module's)
    still gives the fit the batches in the order it gives without that read."""
    g = torch.Generator().manual_seed(0)
    forget = rows(torch.randint(0, 127, (8, 16), generator=g))
    retain = rows(torch.randint(0, 127, (32, 16), generator=g))  # 4 retain batches: one epoch, 3 steps
    expected = [b["input_ids"] for b in DataLoader(forget, batch_size=2, shuffle=True,
                                                   generator=torch.Generator().manual_seed(3))][:3]
    seen: list[torch.Tensor] = []

    class Recording(UnlearningModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            seen.append(batch["forget"]["input_ids"].clone())
            return super().training_step(batch, batch_idx)

    module = Recording(small_causal_lm("gpt2", seed=0), method="newton", curvature="diagonal", damping=1.0,
                       scale=1e-3, max_retain_increase=None, method_kwargs={"step_search": False})
    module.set_curvature_data(DataLoader(retain, batch_size=8))
    loader = DataLoader(forget, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(3))
    trainer(tmp_path, max_steps=3).fit(module, CombinedLoader({"forget": loader,
                                                               "retain": DataLoader(retain, batch_size=8)}))
    assert len(seen) == 3
    for got, want in zip(seen, expected):
        assert torch.equal(got, want)


def test_several_combined_batches_without_a_forget_loader_warn(tmp_path: Path) -> None:
    """A loader that yields `{"forget": ..., "retain": ...}` batches itself has no forget loader to read the whole
    forget set from: the target is judged per forget batch, and a warning says so and names the fixes."""
    from lightning_unlearn.module import ForgetBatchWarning

    g = torch.Generator().manual_seed(0)
    forget = DataLoader(rows(torch.randint(0, 127, (4, 16), generator=g)), batch_size=2)
    retain = DataLoader(rows(torch.randint(0, 127, (4, 16), generator=g)), batch_size=2)
    combined = [{"forget": f, "retain": r} for f, r in zip(forget, retain)]
    module = UnlearningModule(small_causal_lm("gpt2", seed=0), method="newton", curvature="diagonal", damping=1.0,
                              scale=1e-3, max_retain_increase=None, method_kwargs={"step_search": False})
    module.set_curvature_data(retain)
    with pytest.warns(ForgetBatchWarning, match="judged on each step's forget batch alone.*forget_batch_size"):
        trainer(tmp_path, max_steps=2).fit(module, DataLoader(combined, batch_size=None))
    assert len(module.history) == 2


def test_resuming_a_fit_from_a_checkpoint_is_refused(tmp_path: Path) -> None:
    """A fit resumed with `ckpt_path` measured the retain budget, the losses before and the target anew on the
    checkpoint's weights: a run that had spent its 5 % retain budget took more steps and reported the checkpoint as
    "before". The resume is refused, naming the fix, before any weight changes; validating the checkpoint works."""
    g = torch.Generator().manual_seed(0)
    forget = DataLoader(rows(torch.randint(0, 127, (4, 16), generator=g)), batch_size=2)
    retain = DataLoader(rows(torch.randint(0, 127, (16, 16), generator=g)), batch_size=8)

    def module() -> UnlearningModule:
        m = UnlearningModule(small_causal_lm("gpt2", seed=0), method="newton", curvature="diagonal", damping=1.0,
                             scale=1e-3, max_retain_increase=None, method_kwargs={"step_search": False})
        return m.set_curvature_data(retain)

    def data() -> CombinedLoader:
        return CombinedLoader({"forget": forget, "retain": retain}, "max_size_cycle")

    first = module()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    trainer(tmp_path, max_steps=2, callbacks=[ckpt], enable_checkpointing=True).fit(first, data())
    assert len(first.history) == 2
    last = tmp_path / "ckpt" / "last.ckpt"

    resumed = module()
    before = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    with pytest.raises(UserInputError, match="cannot be resumed from a checkpoint.*from the original model"):
        trainer(tmp_path / "again", max_steps=4).fit(resumed, data(), ckpt_path=last)
    assert resumed.history == [] and resumed.status is None
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, before[name]), name

    metrics = trainer(tmp_path / "val").validate(resumed, dataloaders=[forget, retain], ckpt_path=last,
                                                  verbose=False)
    assert math.isfinite(metrics[0]["val/forget_loss"])
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, first.model.state_dict()[name])
