"""Fisher Removal and Fisher Forgetting: seeded noise, its covariance, and runs on a tiny GPT-2."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_unlearn.curvature import CrossEntropyObjective, DiagonalFisher
from lightning_unlearn.methods import FisherForgetting, build_curvature, build_unlearner
from lightning_unlearn.models import small_causal_lm


def _tiny_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    batch = {"inputs": torch.randn(16, 3), "labels": torch.randint(0, 2, (16,))}
    return model, batch


def _flat(v: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([v[n].flatten() for n in names])


def _dense(curvature, damping: float, power: float) -> torch.Tensor:
    """The dense matrix of `(C + λI)^p`, column by column."""
    params = dict(curvature.model.named_parameters())
    names = curvature.param_names
    sizes = [params[n].numel() for n in names]
    cols = []
    for i in range(sum(sizes)):
        e = torch.zeros(sum(sizes))
        e[i] = 1.0
        vec, off = {}, 0
        for n, s in zip(names, sizes):
            vec[n] = e[off:off + s].view_as(params[n])
            off += s
        cols.append(_flat(curvature.apply(vec, damping, power), names))
    return torch.stack(cols, 1)


@pytest.mark.parametrize("backend", ["diagonal", "woodfisher"])
def test_fisher_forgetting_noise_covariance_matches_theory(backend):
    model, batch = _tiny_classifier()
    curvature = build_curvature(backend, model, fisher_type="empirical", objective=CrossEntropyObjective(shift=False))
    curvature.accumulate(batch)
    curvature.finalize()
    mu, sigma, lam = 1e-2, 2.0, 1e-2
    u = FisherForgetting(model, curvature, mu=mu, sigma=sigma, damping=lam, damping_mode="absolute", seed=7)
    names = curvature.param_names
    samples = torch.stack([_flat(u.noise(), names) for _ in range(4000)])
    empirical = samples.T @ samples / len(samples)
    expected = (mu * sigma**2) ** 0.5 * _dense(curvature, lam, -0.5)
    # the -1/2 power squares to the inverse: ties the check to the Newton operator
    inv = _dense(curvature, lam, -1.0)
    assert torch.allclose(_dense(curvature, lam, -0.5) @ _dense(curvature, lam, -0.5), inv, rtol=1e-3, atol=1e-3)
    isotropic = expected.diagonal().mean() * torch.eye(len(expected))
    assert (expected - isotropic).norm() > 0.2 * expected.norm()  # the curvature shapes the noise
    rel = (empirical - expected).norm() / expected.norm()
    assert rel < 0.08, float(rel)


def test_fisher_forgetting_is_reproducible_by_seed():
    model, batch = _tiny_classifier()

    def run(seed: int) -> torch.Tensor:
        m = copy.deepcopy(model)
        c = DiagonalFisher(m, objective=CrossEntropyObjective(shift=False))
        c.accumulate(batch)
        c.finalize()
        u = FisherForgetting(m, c, mu=1e-4, seed=seed, scale=0.1, max_retain_increase=None, step_search=False,
                             steps=1)
        u.fit([batch])
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("method", ["fisher_removal", "fisher_forgetting"])
def test_fisher_methods_run_on_tiny_gpt2(method):
    model = small_causal_lm("gpt2", vocab_size=32, hidden=16)
    x = torch.randint(0, 31, (6, 10), generator=torch.Generator().manual_seed(0))
    forget = {"input_ids": x[:2], "attention_mask": torch.ones_like(x[:2]), "labels": x[:2].clone()}
    retain = {"input_ids": x[2:], "attention_mask": torch.ones_like(x[2:]), "labels": x[2:].clone()}
    extra = {"mu": 1e-8} if method == "fisher_forgetting" else {}
    u = build_unlearner(method, model, damping=1e-2, scale=0.05, **extra)
    before = u.measure(forget)
    records = u.fit([forget], [retain])
    assert u.curvature.name == "woodfisher"
    # on this random model the first step already moves the weights by about their norm, so the run's trust region
    # (the steps together) may refuse the second: a step was accepted, and it forgot
    assert any(r.accepted for r in records) and u.measure(forget) > before
