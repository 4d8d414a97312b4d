"""Weighting the forget examples by how recognisable each still is (`lightning_unlearn.methods.forget_focus`): the
percentiles against the holdout by hand, the weighted objective and gradient against the plain ones, and on a tiny
Llama that memorised its facts, a knowledge-regime run with it that leaves fewer answers memorised or over-forgotten
than one without."""

from __future__ import annotations

import copy

import pytest
import torch
from test_knowledge_regime import facts  # noqa: F401  (the module's memorised-facts fixture)

from lightning_unlearn.methods import build_unlearner
from lightning_unlearn.methods.forget_focus import unforgotten_weights
from lightning_unlearn.methods.losses import example_losses, forget_objective, labelled_rows, token_nll
from lightning_unlearn.methods.target import forget_score, holdout_histogram, holdout_percentiles
from lightning_unlearn.models import small_causal_lm


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_percentiles_and_weights_by_hand():
    hist = holdout_histogram(_f64(1.0, 2.0, 3.0, 4.0), _same)
    losses = _f64(2.5, 0.1, 9.0, 3.5)
    # 2 of the 4 holdout losses below 2.5, none below 0.1, all 4 below 9.0, 3 below 3.5
    assert torch.allclose(holdout_percentiles(losses, hist), _f64(0.5, 0.0, 1.0, 0.75))
    assert forget_score(losses, hist, _same) == pytest.approx((0.5 + 0.0 + 1.0 + 0.75) / 4)
    assert torch.allclose(unforgotten_weights(losses, hist, _same), _f64(0.5, 1.0, 0.0, 0.25))
    # every example above every holdout example: nothing to weight by, all alike
    assert torch.equal(unforgotten_weights(_f64(8.0, 9.0), hist, _same), _f64(1.0, 1.0))


def _batch(rows: torch.Tensor, answer: int = 3) -> dict[str, torch.Tensor]:
    labels = torch.full_like(rows, -100)
    labels[:, -answer:] = rows[:, -answer:]
    return {"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": labels}


@pytest.mark.parametrize("kind", ["nll", "unlikelihood"])
def test_the_weighted_objective_weighs_each_examples_tokens(kind):
    model = small_causal_lm("gpt2", vocab_size=30, hidden=32, seed=0).eval()
    batch = _batch(torch.randint(0, 30, (4, 8), generator=torch.Generator().manual_seed(1)))
    batch["labels"][2] = -100  # a row with no label: no weight for it
    assert labelled_rows(batch) == 3
    weights = torch.tensor([1.0, 0.0, 0.5])
    loss, n = forget_objective(model, batch, kind, weights=weights)
    plain, n_plain = forget_objective(model, batch, kind)
    nll, example = token_nll(model(input_ids=batch["input_ids"]).logits, batch)
    assert n == n_plain == nll.numel() == 9
    per_row = {0: 1.0, 1: 0.0, 3: 0.5}
    token_weight = torch.tensor([per_row[int(e)] for e in example])
    if kind == "nll":
        assert loss.item() == pytest.approx(-(nll * token_weight).sum().item() / 9, rel=1e-5)
        assert plain.item() == pytest.approx(-nll.mean().item(), rel=1e-5)
    ones, _ = forget_objective(model, batch, kind, weights=torch.ones(3))
    assert ones.item() == pytest.approx(plain.item(), rel=1e-5)
    with pytest.raises(ValueError, match="3 labelled examples"):
        forget_objective(model, batch, kind, weights=torch.ones(4))
    with pytest.raises(ValueError, match="normalises each example itself"):
        forget_objective(model, batch, f"{kind}_normalized", list(model.parameters()), weights=weights)


def test_forget_gradient_reads_the_weights_batch_by_batch():
    model = small_causal_lm("gpt2", vocab_size=30, hidden=32, seed=0).eval()
    g = torch.Generator().manual_seed(2)
    first, second = _batch(torch.randint(0, 30, (3, 8), generator=g)), _batch(torch.randint(0, 30, (2, 8), generator=g))
    u = build_unlearner("gradient_ascent", model, forget_loss="nll")
    # weight 0 on every example of the second batch: the first batch's gradient, over both batches' positions
    weighted = u.forget_gradient([first, second], example_weights=torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))
    alone = u.forget_gradient([first])
    for name, grad in weighted.items():
        assert torch.allclose(grad, alone[name] * 9 / 15, atol=1e-7)


def test_focus_moves_the_answers_an_attack_still_recognises(facts):  # noqa: F811
    base, forget, retain, held, holdout = facts
    assert build_unlearner("newton", copy.deepcopy(base)).focus_unforgotten is False  # opt-in
    u = build_unlearner("newton", copy.deepcopy(base), focus_unforgotten=True)
    u.calibrate([holdout])
    # the weights are 1 - each example's share of the holdout below it, at the weights of the step
    f, _, _ = example_losses(u.model, [forget], _same)
    h, _, _ = example_losses(u.model, [holdout], _same)
    by_hand = 1.0 - (h[None, :] < f[:, None]).double().mean(1)
    assert torch.allclose(u.forget_weights([forget]), by_hand, atol=1.0 / len(h))
    assert build_unlearner("newton", copy.deepcopy(base)).forget_weights([forget]) is None

    percentiles = {}
    for focus in (True, False):
        u = build_unlearner("newton", copy.deepcopy(base), focus_unforgotten=focus)
        u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
        assert u.summary()["knowledge_regime"] is True
        f, _, _ = example_losses(u.model, [forget], _same)
        h, _, _ = example_losses(u.model, [holdout], _same)
        percentiles[focus] = (h[None, :] < f[:, None]).double().mean(1)
    # plain NLL ascent leaves some answers below every holdout answer and pushes others above every one
    extremes = {k: int(((p == 0) | (p == 1)).sum()) for k, p in percentiles.items()}
    assert extremes[True] < extremes[False]
