"""The Monte-Carlo Fisher's sampled labels are a function of (seed, example) only: the same examples batched
differently (sizes, order, padding width) give the same curvature, and 2 DDP processes give the update of one."""

from __future__ import annotations

import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_unlearn.callbacks import ProcessGroupTeardown, Unlearn
from lightning_unlearn.curvature import KFAC, DiagonalFisher
from lightning_unlearn.curvature.objective import example_keys, position_keys
from lightning_unlearn.methods import build_curvature
from lightning_unlearn.models import small_causal_lm

TEXTS = ["the cat sees a dog", "a bird likes sun", "my aunt reads", "old trees grow", "zq7 kx9 vv2 pq4",
         "red balls roll", "wm3 hh6 xr1 bt5", "the sky is big"]


def collate(rows: list[tuple[int, str]], with_ids: bool) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row of *this* batch (so the padding width depends on the batching)."""
    width = max(len(t) for _, t in rows)
    ids = torch.full((len(rows), width), 127)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (_, text) in enumerate(rows):
        tokens = torch.tensor([ord(c) % 127 for c in text])
        ids[i, : len(text)], labels[i, : len(text)], mask[i, : len(text)] = tokens, tokens, 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if with_ids:
        batch["example_id"] = torch.tensor([k for k, _ in rows])
    return batch


def batchings(with_ids: bool) -> tuple[list[dict], list[dict]]:
    """The 8 examples as 1 batch of 8, and as 2 batches of 4 in another order."""
    rows = list(enumerate(TEXTS))
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    return [collate(rows, with_ids)], [collate(shuffled[:4], with_ids), collate(shuffled[4:], with_ids)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_kfac_mc_factors_do_not_depend_on_batching(with_ids: bool, kfac_approx: str) -> None:
    model = small_causal_lm("gpt2", seed=0)
    one, two = batchings(with_ids)
    fits = [KFAC(model, kfac_approx=kfac_approx, mc_samples=2).fit(b) for b in (one, two)]
    for layer in fits[0].layers:
        for f0, f1 in zip(fits[0].factor(layer.name), fits[1].factor(layer.name)):
            assert rel(f1, f0) <= 1e-6
    # another seed draws other labels: G changes, A (inputs only) does not
    other = KFAC(model, kfac_approx=kfac_approx, mc_samples=2, seed=1).fit(one)
    name = fits[0].layers[-1].name
    assert rel(other.factor(name)[1], fits[0].factor(name)[1]) > 1e-3
    assert rel(other.factor(name)[0], fits[0].factor(name)[0]) <= 1e-6


@pytest.mark.parametrize("with_ids", [False, True])
def test_diagonal_mc_does_not_depend_on_batching(with_ids: bool) -> None:
    model = small_causal_lm("gpt2", seed=0)
    one, two = batchings(with_ids)
    fits = [DiagonalFisher(model).fit(b) for b in (one, two)]
    for n in fits[0].param_names:
        assert rel(fits[1].diagonal[n], fits[0].diagonal[n]) <= 1e-6


def test_example_keys_ignore_padding_and_use_ids() -> None:
    right = {"input_ids": torch.tensor([[5, 6, 7, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0, 0]])}
    left = {"input_ids": torch.tensor([[9, 9, 5, 6, 7]]), "attention_mask": torch.tensor([[0, 0, 1, 1, 1]])}
    bare = {"input_ids": torch.tensor([[5, 6, 7]])}
    assert example_keys(right) == example_keys(left) == example_keys(bare)
    # position counters count attended positions only
    mask = torch.tensor([[True, True, False, False, False]]), torch.tensor([[False, False, True, True, False]])
    assert torch.equal(position_keys(right, mask[0], 0), position_keys(left, mask[1], 0))
    # an id >= 0 tells apart two copies of a text; -1 (a packed block) falls back to the tokens alone
    same = {**bare, "example_id": torch.tensor([-1])}
    assert example_keys(same) == example_keys(bare)
    ids = [example_keys({**bare, "example_id": torch.tensor([i])}) for i in (3, 4)]
    assert ids[0] != ids[1]
    assert example_keys({"input_ids": torch.tensor([[5, 6, 8]])}) != example_keys(bare)


def test_seed_is_recorded_in_the_state() -> None:
    model = small_causal_lm("gpt2", seed=0)
    one, _ = batchings(False)
    kfac = KFAC(model, seed=7).fit(one)
    state = kfac.state_dict()
    assert state["seed"] == 7
    fresh = KFAC(model)
    fresh.load_state_dict(state)
    assert fresh.seed == 7


# ---------------------------------------------------------------------------------------------------- DDP
# the data and the frozen module of the empirical-Fisher DDP test, this time with the default Monte-Carlo Fisher
from test_lightning_ddp import FORGET, HELD, FrozenLM, loader  # noqa: E402


def make_unlearn(**kw) -> Unlearn:
    # the fixed step (absolute λ, no step-length search) with the default Monte-Carlo Fisher
    return Unlearn(forget=loader(FORGET, 1), held_retain=next(iter(loader(HELD, 2))), method="newton",
                   curvature="kfac", curvature_data="full_minus_forget", damping=1e-2, scale=0.1, steps=2,
                   max_retain_increase=None, curvature_kwargs={"fisher_type": "mc"},
                   method_kwargs={"damping_mode": "absolute", "step_search": False}, **kw)


def test_ddp_mc_fisher_update_matches_single_process(tmp_path: Path) -> None:
    module = FrozenLM()
    start = {k: v.clone() for k, v in module.model.state_dict().items()}
    callback = make_unlearn(accumulate_every_n_batches=1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1,
                         callbacks=[callback, ProcessGroupTeardown()],
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader(TEXTS, 2))  # each rank sees 2 batches of 2: half of the global data
    ddp_weights = module.model.state_dict()  # rank 0's weights, sent back by ddp_spawn

    reference = FrozenLM()
    reference.model.load_state_dict(start)
    full = build_curvature("kfac", reference.model, fisher_type="mc")
    with torch.enable_grad():
        for batch in loader(TEXTS, 4):  # another batching than either rank's
            full.accumulate(batch)
    full.finalize()
    records = make_unlearn(full_curvature=full).unlearn(reference)
    assert all(r.accepted for r in records) and len(records) == 2

    moved, worst = 0.0, 0.0
    for name, value in reference.model.state_dict().items():
        worst = max(worst, float((ddp_weights[name] - value).abs().max()))
        moved += float((value - start[name]).abs().sum())
    assert worst <= 1e-5
    assert moved > 1e-3
