"""The knowledge regime (`lightning_unlearn.methods.knowledge`): the second-order recipe switches to the NLL
objective, retain protection and a 30 % budget when the held retain data is memorised, and keeps the secret recipe
when it is not; what the caller sets wins. Measured on a tiny Llama that memorised every one of its "facts"
(random token rows labelled on their last 6 tokens, as an answer after a question) and on the canary corpus."""

from __future__ import annotations

import copy

import pytest
import torch
from canary_corpus import memorise

from lightning_unlearn.errors import UserInputError
from lightning_unlearn.methods import build_unlearner
from lightning_unlearn.methods import repair as repair_module
from lightning_unlearn.methods.knowledge import (
    KNOWLEDGE_PROTECT_RETAIN,
    KNOWLEDGE_RETAIN_INCREASE,
    KNOWLEDGE_RETAIN_SHARE,
    KNOWLEDGE_STEPS,
    MEMORISED_NATS,
    RETAIN_MEMORISED_OF_HELD,
)
from lightning_unlearn.methods.target import over_retain_budget
from lightning_unlearn.models import small_causal_lm
from lightning_unlearn.settings import UnlearnSettings

V, T, ANSWER = 40, 12, 6


def _qa(x: torch.Tensor) -> dict[str, torch.Tensor]:
    labels = torch.full_like(x, -100)
    labels[:, -ANSWER:] = x[:, -ANSWER:]
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}


@pytest.fixture(scope="module")
def facts():
    """(model, forget batch, retain batches, held retain batch, holdout batch): 72 trained facts, all memorised."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, V, (88, T), generator=g)
    trained, holdout = rows[:72], rows[72:]
    model = small_causal_lm("llama", vocab_size=V, hidden=48, seed=0).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = model(**_qa(trained[torch.randint(0, 72, (24,), generator=g)])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    forget = _qa(trained[:8])
    retain = [_qa(trained[8 + 16 * i: 24 + 16 * i]) for i in range(3)]
    held = _qa(trained[56:72])
    return model, forget, retain, held, _qa(holdout)


def test_memorised_retain_switches_to_the_knowledge_regime(facts):
    base, forget, retain, held, holdout = facts
    model = copy.deepcopy(base)
    u = build_unlearner("newton", model)
    assert u.measure(held) < MEMORISED_NATS  # the fixture memorised its retain facts
    records = u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    summary = u.summary()
    assert summary["knowledge_regime"] is True
    assert (u.forget_loss, u.protect_retain, u.max_retain_increase, u.steps) == (
        "nll", KNOWLEDGE_PROTECT_RETAIN, KNOWLEDGE_RETAIN_INCREASE, KNOWLEDGE_STEPS)
    # the regime's budget bounds the run: the held retain loss rose by at most log(1.3) nats
    budget = torch.log1p(torch.tensor(KNOWLEDGE_RETAIN_INCREASE)).item()
    assert summary["retain_loss_after"] <= summary["retain_loss_before"] + budget + 1e-6
    assert summary["forget_loss_after"] > summary["forget_loss_before"] + 1.0
    # the staged budget: step k of K spends at most k/K of it, and a stage that spends its share does not end the run
    assert u.staged_budget and summary["steps_accepted"] > 1
    for k, record in enumerate(r for r in records if r.accepted):
        share = (k + 1) / KNOWLEDGE_STEPS * budget
        assert record.retain_loss <= summary["retain_loss_before"] + share + 1e-6

    secret = build_unlearner("newton", copy.deepcopy(base), knowledge=False)
    secret.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    assert secret.summary()["knowledge_regime"] is False and not secret.staged_budget
    assert (secret.forget_loss, secret.protect_retain, secret.max_retain_increase, secret.steps) == (
        "unlikelihood", 0, 0.05, 5)
    # the knowledge regime forgets more of the memorised facts than the secret recipe within its budget
    assert summary["forget_loss_after"] > secret.summary()["forget_loss_after"]


def test_what_the_caller_sets_wins(facts):
    base, forget, retain, held, holdout = facts
    u = build_unlearner("newton", copy.deepcopy(base), forget_loss="unlikelihood", protect_retain=2,
                        max_retain_increase=0.5, steps=1)
    u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    assert u.summary()["knowledge_regime"] is True
    assert (u.forget_loss, u.protect_retain, u.max_retain_increase, u.steps) == ("unlikelihood", 2, 0.5, 1)
    # the next run starts from the caller's settings again, and knowledge=True needs no memorised data
    forced = build_unlearner("newton", copy.deepcopy(base), knowledge=True, max_retain_increase=None)
    assert (forced.forget_loss, forced.protect_retain, forced.max_retain_increase) == ("nll", 8, None)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "gpt_neox"])
def test_canaries_keep_the_secret_recipe(arch):
    """Neither trigger fires on canaries beside prose, however well the canaries are memorised (forget 0.01-0.02 of
    the holdout's loss here): the held prose is not memorised, and too few retain examples are (these tiny models
    overfit their prose: 0-3 % of a retain batch below 0.15 of the held prose's loss)."""
    model, forget, retain, held, holdout = memorise(arch)
    u = build_unlearner("newton", model, steps=1)
    held_loss = u.measure(held)
    share = u.memorised_share(retain[0], RETAIN_MEMORISED_OF_HELD * held_loss)  # at the weights the run starts from
    u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    assert held_loss > MEMORISED_NATS and u.forget_is_knowledge() and share < KNOWLEDGE_RETAIN_SHARE
    assert u.summary()["knowledge_regime"] is False
    assert (u.forget_loss, u.protect_retain, u.max_retain_increase) == ("unlikelihood", 0, 0.05)


def test_knowledge_setting_is_checked():
    assert UnlearnSettings(knowledge=False).kwargs()["knowledge"] is False
    assert "knowledge" not in UnlearnSettings().kwargs()
    with pytest.raises(UserInputError, match="second-order"):
        UnlearnSettings(method="gradient_ascent", knowledge=True)
    with pytest.raises(UserInputError, match="knowledge must be"):
        UnlearnSettings(knowledge="yes")
    with pytest.raises(ValueError, match="knowledge must be"):
        build_unlearner("newton", small_causal_lm("gpt2"), knowledge=1)


def _lightning_run(facts, tmp_path, step_retain, max_steps):
    """(UnlearningModule, Trainer, data module) of a Lightning run on the `facts`: the forget batch at every step
    beside `step_retain` (the first is the module's held budget batch); the data module's splits for the curvature
    and the holdout."""
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.combined_loader import CombinedLoader
    from torch.utils.data import DataLoader

    from lightning_unlearn.module import UnlearningModule

    base, forget, retain, held, holdout = facts

    class Data(pl.LightningDataModule):
        def dataloader(self, split):
            return {"forget": [forget], "retain": retain, "holdout": [holdout]}[split]

        def curvature_dataloader(self, split="retain"):
            return self.dataloader(split)

        def train_dataloader(self):
            return CombinedLoader({"forget": DataLoader([forget] * len(step_retain), batch_size=None),
                                   "retain": DataLoader(step_retain, batch_size=None)}, "max_size_cycle")

    module = UnlearningModule(copy.deepcopy(base), method="newton", curvature="kfac")
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=1, enable_progress_bar=False,
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=tmp_path)
    return module, trainer, Data()


def test_lightning_max_steps_below_the_regime_steps_is_said_with_the_fix(facts, tmp_path):
    """Under Lightning the trainer's max_steps sets the regime's stages: fewer than KNOWLEDGE_STEPS is warned about,
    naming the fix, and the run still goes on (the stages spread over max_steps)."""
    held = facts[3]
    module, trainer, data = _lightning_run(facts, tmp_path, [held] * 4, max_steps=2)
    with pytest.warns(UserWarning, match=rf"knowledge regime.*max_steps={KNOWLEDGE_STEPS}\)"):
        trainer.fit(module, datamodule=data)
    assert module.unlearner.knowledge_regime and module.unlearner.steps == 2
    assert len(module.history) >= 1


def test_the_retain_repair_lowers_the_held_retain_loss_and_keeps_the_forgetting(facts):
    """The knowledge regime ends with the retain repair (`methods.repair`): the held retain loss falls from where the
    staged steps left it, the forget score stays at least at min(its value, the target), and the forget examples'
    loss stays far above its start. `retain_repair=False` ends where the steps ended; the secret recipe never
    repairs."""
    base, forget, retain, held, holdout = facts
    repaired = build_unlearner("newton", copy.deepcopy(base))
    repaired.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    plain = build_unlearner("newton", copy.deepcopy(base), retain_repair=False)
    plain.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    r, p = repaired.summary(), plain.summary()
    assert r["knowledge_regime"] and p["knowledge_regime"]
    assert p["retain_loss_before_repair"] is None
    # the same steps (the repair runs after them, in finish)
    assert r["steps_accepted"] == p["steps_accepted"]
    assert r["retain_loss_before_repair"] == pytest.approx(p["retain_loss_after"], rel=1e-5)
    assert r["retain_loss_after"] < r["retain_loss_before_repair"]
    assert r["forget_score_after"] >= min(p["forget_score_after"], r["target"]) - 1e-9
    assert r["forget_loss_after"] > r["forget_loss_before"] + 1.0
    secret = build_unlearner("newton", copy.deepcopy(base), knowledge=False, retain_repair=None)
    secret.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    assert secret.summary()["retain_loss_before_repair"] is None
    # forced on outside the regime it runs too; without retain batches there is nothing to descend
    forced = build_unlearner("newton", copy.deepcopy(base), knowledge=False, retain_repair=True)
    forced.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    f = forced.summary()
    assert f["retain_loss_before_repair"] is not None and f["retain_loss_after"] < f["retain_loss_before_repair"]


def test_the_repair_takes_rounds_until_the_held_loss_is_within_the_callers_budget(facts, monkeypatch):
    """The regime relaxes the budget for the staged steps; the repair then takes up to `REPAIR_ROUNDS` constrained
    steps down the retain loss, each from where the last left the weights, until the held retain loss is back within
    the caller's own budget. Here one round leaves it above the default 5 % (the fixture's held facts start at
    ~0.005 nats): more rounds go lower from the same steps, the forget score within a slack per round of its floor. A
    budget that one round meets stops after it."""
    base, forget, retain, held, holdout = facts

    def run(**kwargs):
        u = build_unlearner("newton", copy.deepcopy(base), **kwargs)
        u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
        return u.summary()

    rounds = run()
    monkeypatch.setattr(repair_module, "REPAIR_ROUNDS", 1)
    one = run()
    monkeypatch.undo()
    assert one["repair_rounds"] == 1 and 2 <= rounds["repair_rounds"] <= repair_module.REPAIR_ROUNDS
    assert rounds["retain_loss_before_repair"] == pytest.approx(one["retain_loss_before_repair"], rel=1e-6)
    assert over_retain_budget(one["retain_loss_after"], one["retain_loss_before"], 0.05)
    assert rounds["retain_loss_after"] < one["retain_loss_after"]
    steps_only = run(retain_repair=False)  # where the staged steps left the score; each round may lower it by the slack
    floor = min(steps_only["forget_score_after"], rounds["target"])
    assert rounds["forget_score_after"] >= floor - rounds["repair_rounds"] * repair_module.REPAIR_SCORE_SLACK - 1e-9
    loose = run(max_retain_increase=0.5)
    assert loose["repair_rounds"] == 1
    assert not over_retain_budget(loose["retain_loss_after"], loose["retain_loss_before"], 0.5)


def test_lightning_runs_the_retain_repair_on_its_last_retain_batches(facts, tmp_path):
    """`UnlearningModule` hands `finish` the last retain batches it stepped on (up to `REPAIR_BATCHES`), so a run
    under Lightning in the knowledge regime ends with the retain repair as `fit` does: the held retain loss (the first
    retain batch, the module's budget batch) falls from where the steps left it."""
    _, _, retain, held, _ = facts
    steps = [held, *retain] * 4  # the first is the module's held (budget) batch
    module, trainer, data = _lightning_run(facts, tmp_path, steps, max_steps=KNOWLEDGE_STEPS)
    trainer.fit(module, datamodule=data)
    summary = module.unlearner.summary()
    assert summary["knowledge_regime"] and summary["steps_accepted"] >= 1
    assert summary["retain_loss_before_repair"] is not None
    assert summary["retain_loss_after"] < summary["retain_loss_before_repair"]
