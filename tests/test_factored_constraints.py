"""Constraint gradients kept in low-rank form (`curvature/carried.py`): K-FAC's constrained solve rotates their
factors where that is cheaper and gives the direction the matrices give; the protection groups' gradients carry
factors whose product is the gradient, in one process only."""

from __future__ import annotations

import pytest
import torch

from lightning_unlearn.curvature.carried import FactoredGradient, layer_factors, restricted
from lightning_unlearn.curvature.kronecker import factors_are_cheaper
from lightning_unlearn.methods import build_unlearner
from lightning_unlearn.methods.group_gradients import grouped_nll_gradients
from lightning_unlearn.models import small_causal_lm
from tests.test_curvature_kfac_memory_options import D64, batch, close, fit, vector, wide_mlp
from tests.test_group_gradients import _batches


def factored(kfac, rows: int, seed: int) -> FactoredGradient:
    """A random constraint of rank `rows` per layer, with its factors."""
    g = torch.Generator().manual_seed(seed)
    values, factors = {}, {}
    for layer in kfac.layers:
        pair = (torch.randn(rows, layer.out_features, generator=g, dtype=D64),
                torch.randn(rows, layer.in_features + int(layer.has_bias), generator=g, dtype=D64))
        factors[layer.name] = pair
        values.update(layer.from_matrix(pair[0].T @ pair[1]))
    return FactoredGradient(values, factors)


def test_the_cost_rule_prefers_factors_for_few_positions() -> None:
    assert factors_are_cheaper(30, 512, 129, 512)  # 30 positions of a 128 -> 512 layer
    assert not factors_are_cheaper(400, 512, 129, 512)
    assert factors_are_cheaper(1, 8, 3, 0) and not factors_are_cheaper(50, 8, 3, 0)  # diagonal G


@pytest.mark.parametrize(("kind", "block"), [(None, 0), ("diagonal", 1), ("block", 2)])
@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_factored_constraints_give_the_direction_of_their_matrices(kind: str | None, block: int, mode: str) -> None:
    kfac = fit(wide_mlp(), batch(1), batch(2), **({"wide_layer": kind, "wide_block": block} if kind else {}))
    g = vector(kfac, 1)
    hs = [factored(kfac, 1, 2), factored(kfac, 2, 3), factored(kfac, 60, 4)]  # the last: too many rows to pay
    plain = kfac.constrained_inverse(g, [dict(h) for h in hs], 0.05, mode=mode)
    close(kfac.constrained_inverse(g, hs, 0.05, mode=mode), plain, rtol=1e-9, atol=1e-12)
    # the factors are what is read where they are cheaper, the matrix where not: pair each with another matrix
    other = vector(kfac, 9)
    swapped = [FactoredGradient(other, h.factors) for h in hs]
    close(kfac.constrained_inverse(g, swapped[:2], 0.05, mode=mode),
          kfac.constrained_inverse(g, [dict(h) for h in hs[:2]], 0.05, mode=mode), rtol=1e-9, atol=1e-12)
    close(kfac.constrained_inverse(g, swapped[2:], 0.05, mode=mode),
          kfac.constrained_inverse(g, [other], 0.05, mode=mode), rtol=1e-9, atol=1e-12)


def test_restricted_keeps_the_factors() -> None:
    kfac = fit(wide_mlp(), batch(1))
    h = factored(kfac, 1, 2)
    kept = restricted(h, kfac.param_names)
    assert isinstance(kept, FactoredGradient) and kept.factors.keys() == h.factors.keys()
    assert not hasattr(restricted(dict(h), kfac.param_names), "factors")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_group_gradients_carry_factors_whose_product_is_the_gradient(arch: str) -> None:
    model = small_causal_lm(arch, seed=1, tie_embeddings=False, hidden=128, heads=4).eval()
    u = build_unlearner("newton", model)
    batches = _batches(2)
    u.fit_curvature(batches)
    params = u.named_params()
    dtypes = {n: p.dtype for n, p in params.items()}
    grads = grouped_nll_gradients(model, u.curvature.layers, batches, 4, lambda t: t, dtypes)
    assert grads is not None and not any(hasattr(h, "factors") for h in grads)  # a cross-process reduce: none
    fast = u.group_gradients(batches, 4)
    # each example's last position (and its padding) predicts no label: no output gradient, no row
    predicting = sum(int(b["attention_mask"].sum()) - b["input_ids"].shape[0] for b in batches)
    rows = dict.fromkeys((layer.name for layer in u.curvature.layers), 0)
    for h, plain in zip(fast, grads):
        assert isinstance(h, FactoredGradient)
        assert h.factors  # 128 wide, groups of 2 examples: the factors pay on some layers
        for layer in u.curvature.layers:
            if layer_factors(h, layer.name) is None:
                continue
            g, a = layer_factors(h, layer.name)
            rows[layer.name] += g.shape[0]
            for n, t in layer.from_matrix(g.T @ a).items():
                torch.testing.assert_close(t, plain[n], rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(h[n], plain[n], rtol=0, atol=0)
    assert all(r <= predicting for r in rows.values()) and any(rows.values()), (rows, predicting)
    # the direction the unlearner takes is the one the matrices give
    forget = u.forget_gradient(batches[:1])
    got, want = (torch.cat([t.flatten() for t in u.protected_direction(forget, hs).values()])
                 for hs in (fast, [dict(h) for h in fast]))
    assert float((got - want).norm()) <= 1e-4 * float(want.norm())  # float32 rounding
