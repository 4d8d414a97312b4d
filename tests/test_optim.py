"""NewtonUnlearner: a torch optimizer turning forget gradients into guarded damped Newton steps."""

from __future__ import annotations

import pytest
import torch

from lightning_unlearn.curvature import DiagonalFisher
from lightning_unlearn.curvature.kfac import KFAC
from lightning_unlearn.models import small_causal_lm
from lightning_unlearn.optim import NewtonUnlearner


def _batch(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def _nll(model, batch) -> torch.Tensor:
    return model(**batch).loss


@pytest.fixture
def setup():
    model = small_causal_lm("gpt2", vocab_size=32, hidden=16)
    x = torch.randint(0, 31, (6, 10), generator=torch.Generator().manual_seed(0))
    forget, retain, held = _batch(x[:2]), _batch(x[2:4]), _batch(x[4:])
    curvature = KFAC(model)
    curvature.accumulate(retain)
    curvature.finalize()
    return model, curvature, forget, held


def test_plain_pytorch_loop_matches_the_newton_formula(setup):
    model, curvature, forget, held = setup
    opt = NewtonUnlearner(model.parameters(), curvature, lr=0.05, damping=1e-2, max_retain_increase=None,
                          max_step_norm=None)  # the bare formula: no guard
    params = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    opt.zero_grad()
    _nll(model, forget).backward()
    grad = {n: params[n].grad.clone() for n in curvature.param_names}
    expected = curvature.apply(grad, 1e-2, -1.0)
    before = float(_nll(model, forget))
    opt.step()
    for n in curvature.param_names:  # θ + lr (C + λI)^-1 ∇L_forget: uphill on the forget loss
        torch.testing.assert_close(params[n].detach(), start[n] + 0.05 * expected[n])
    for n, p in params.items():  # the embeddings are not covered by K-FAC: untouched
        if n not in curvature.param_names:
            assert torch.equal(p, start[n])
    assert float(_nll(model, forget)) > before
    for _ in range(2):  # a few more iterations of the loop
        opt.zero_grad()
        _nll(model, forget).backward()
        opt.step(lambda: _nll(model, held))
    assert opt.param_groups[0]["steps"] == 3 and len(opt.history) >= 3


def test_minimize_flips_the_sign(setup):
    model, curvature, forget, _ = setup
    opt = NewtonUnlearner(model.parameters(), curvature, lr=0.05, damping=1e-2, maximize=False)
    opt.zero_grad()
    before = _nll(model, forget)
    before.backward()
    opt.step()
    assert float(_nll(model, forget)) < float(before)


def test_closure_rolls_back_huge_step_bit_identically_and_state_dict(setup):
    model, curvature, forget, held = setup
    opt = NewtonUnlearner(model.parameters(), curvature, lr=1e6, damping=1e-3, max_retries=2, max_retain_increase=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    _nll(model, forget).backward()
    opt.step(lambda: _nll(model, held))
    assert [r.accepted for r in opt.history] == [False, False, False]
    assert [r.damping for r in opt.history] == pytest.approx([1e-3, 1e-2, 1e-1])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    state = opt.state_dict()
    assert state["param_groups"][0]["damping"] == pytest.approx(1.0)
    fresh = NewtonUnlearner(model.parameters(), curvature)
    fresh.load_state_dict(state)
    assert fresh.damping == pytest.approx(1.0) and fresh.param_groups[0]["lr"] == 1e6


def test_errors_are_clear():
    model = small_causal_lm("gpt2", vocab_size=32, hidden=16)
    other = small_causal_lm("gpt2", vocab_size=32, hidden=16)
    c = DiagonalFisher(model)
    with pytest.raises(ValueError, match="finalized curvature"):
        NewtonUnlearner(model.parameters(), c)
    c.accumulate(_batch(torch.randint(0, 31, (2, 6))))
    c.finalize()
    with pytest.raises(ValueError, match="none of the optimizer's parameters is covered"):
        NewtonUnlearner(other.parameters(), c)
