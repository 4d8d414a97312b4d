"""First-order baselines and the forget objectives."""

from __future__ import annotations

import pytest
import torch

from lightning_unlearn.methods import FORGET_LOSSES, build_unlearner
from lightning_unlearn.methods.losses import forget_objective
from lightning_unlearn.models import small_causal_lm


def _batch(x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone() if labels is None else labels}


@pytest.fixture
def data():
    x = torch.randint(0, 31, (6, 10), generator=torch.Generator().manual_seed(0))
    return _batch(x[:2]), _batch(x[2:4]), _batch(x[4:])


@pytest.mark.parametrize("method", ["gradient_ascent", "gradient_difference", "npo"])
def test_first_order_methods_raise_the_forget_loss(method, data):
    forget, retain, held = data
    model = small_causal_lm("gpt2", vocab_size=32, hidden=16)
    u = build_unlearner(method, model, lr=1e-2, steps=3, max_retain_increase=None)
    before = u.measure(forget)
    records = u.fit([forget], [retain], held_retain_batch=held)
    assert len(records) == 3 and all(r.accepted for r in records)
    assert u.measure(forget) > before
    assert records[0].scale == pytest.approx(1e-2) and records[0].damping == 1.0


def test_first_order_rollback_restores_weights_and_optimizer_moments(data):
    forget, retain, held = data
    model = small_causal_lm("gpt2", vocab_size=32, hidden=16)
    u = build_unlearner("gradient_ascent", model, lr=1e-3, steps=1, max_retain_increase=None)
    u.fit([forget])  # Adam has moments now
    moments = {k: {s: t.clone() if torch.is_tensor(t) else t for s, t in v.items()}
               for k, v in u.optimizer.state_dict()["state"].items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    u.lr, u.max_retain_increase, u.max_retries = 1e3, 0.0, 1
    record = u.step(forget, retain, held)
    assert not record.accepted and [r.damping for r in u.history[-2:]] == [1.0, 10.0]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    for k, v in u.optimizer.state_dict()["state"].items():
        for s, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(moments[k][s]))


def test_forget_objectives_cover_only_labelled_positions_and_unlikelihood_does_not_vanish():
    model = small_causal_lm("gpt2", vocab_size=32, hidden=16)
    x = torch.randint(0, 31, (2, 8), generator=torch.Generator().manual_seed(3))
    labels = torch.full_like(x, -100)
    labels[:, 4:6] = x[:, 4:6]
    params = [p for p in model.parameters() if p.requires_grad]
    for kind in FORGET_LOSSES:
        loss, weight = forget_objective(model, _batch(x, labels), kind, params)
        assert torch.isfinite(loss) and weight == (4 if not kind.endswith("_normalized") else 2)
    empty = torch.full_like(x, -100)
    assert forget_objective(model, _batch(x, empty), "unlikelihood")[1] == 0
    # on a saturated token (p ~ 1) the NLL gradient on its logit is -(1 - p) ~ 0, unlikelihood's is ~ 1
    logits = torch.tensor([[[12.0, 0.0, 0.0], [0.0, 0.0, 0.0]]], requires_grad=True)  # t=0 predicts label 1

    class Fixed(torch.nn.Module):
        def forward(self, ids):
            return logits

    b = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.tensor([[-100, 0]])}
    g_nll = torch.autograd.grad(forget_objective(Fixed(), b, "nll")[0], logits)[0][0, 0, 0]
    g_ul = torch.autograd.grad(forget_objective(Fixed(), b, "unlikelihood")[0], logits)[0][0, 0, 0]
    assert abs(float(g_nll)) < 0.5 and float(g_ul) > 0.3


@pytest.fixture(scope="module")
def memorised():
    from canary_corpus import memorise

    return memorise("gpt2")  # 4 memorised digit canaries (forget loss ~0.1 nats), 8 never-seen ones


@pytest.mark.parametrize("method", ["gradient_ascent", "gradient_difference", "npo", "simnpo"])
def test_first_order_defaults_unlearn_a_memorised_model(method, memorised):
    """No knob set: the defaults iterate guarded steps until the target or the retain budget (one Adam step at the
    default learning rate took the forget loss from 0.110 to 0.126 nats and reported budget_exhausted)."""
    import copy

    from lightning_unlearn.methods.target import retain_budget_nats

    base, forget, retain, held, holdout = memorised
    u = build_unlearner(method, copy.deepcopy(base))
    records = u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    summary = u.summary()
    assert u.status in ("target_reached", "budget_exhausted") and len(records) > 10, summary
    assert summary["forget_loss_after"] > summary["forget_loss_before"] + 1.0, summary
    budget = retain_budget_nats(u.max_retain_increase, summary["retain_loss_before"])
    assert summary["retain_loss_after"] <= summary["retain_loss_before"] + budget + 1e-9, summary


@pytest.mark.parametrize("method", ["gradient_ascent", "newton"])
@pytest.mark.parametrize("damping", [0, 0.0, -1.0, float("nan")])
def test_every_method_refuses_a_damping_that_is_not_positive(method, damping):
    """One check of `damping` everywhere (> 0): a first-order method divides its learning rate by it."""
    from lightning_unlearn.errors import UserInputError
    from lightning_unlearn.settings import UnlearnSettings

    with pytest.raises(UserInputError, match="damping must be a finite number > 0"):
        build_unlearner(method, small_causal_lm("gpt2", seed=0), damping=damping)
    with pytest.raises(UserInputError, match="damping must be a finite number > 0"):
        UnlearnSettings(method=method, damping=damping)

