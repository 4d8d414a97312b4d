"""WoodFisher backend: Woodbury/thin-SVD powers against dense float64 eigendecompositions of brute-force Fishers."""

from __future__ import annotations

import pytest
import torch
from dense_models import DT, mlp, mlp_batch, tiny_gpt2
from dense_models import lm_batch as _lm_batch
from torch.func import functional_call

from lightning_unlearn.curvature import CrossEntropyObjective, DiagonalFisher, MSEObjective, WoodFisher


def lm_batch(b: int = 3, **kw) -> dict:
    return _lm_batch(b=b, **kw)


CASES = {
    "mlp-mse": (mlp, MSEObjective, lambda: [mlp_batch("mse"), mlp_batch("mse", b=3, seed=5)]),
    "mlp-ce": (mlp, lambda: CrossEntropyObjective(shift=False),
               lambda: [mlp_batch("ce"), mlp_batch("ce", b=3, seed=5)]),
    "gpt2": (tiny_gpt2, CrossEntropyObjective, lambda: [lm_batch(), lm_batch(b=2, t=4, seed=3)]),
}


def brute_force_fisher(model, objective, batches, names):
    """(1/N) Σ_i g_i g_iᵀ with g_i the gradient of example i's summed token loss, by a plain loop."""
    params = dict(model.named_parameters())
    rows, count = [], 0
    for batch in batches:
        for i in range(next(iter(batch.values())).shape[0]):
            row = {k: v[i: i + 1] for k, v in batch.items()}
            p = {n: params[n] for n in params}
            if "input_ids" in row:
                logits = functional_call(model, p, (), {"input_ids": row["input_ids"],
                                                        "attention_mask": row["attention_mask"]}).logits
            else:
                logits = functional_call(model, p, (row["inputs"],))
            pos = objective.positions(logits, row)
            if pos.count == 0:
                continue
            count += pos.count
            loss = objective.per_position_loss(pos.outputs, pos.targets).sum()
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    g = torch.stack(rows)  # [m, d]
    return g.T @ g / count


def layer_mask(wf):
    """1 inside the per-layer diagonal blocks, 0 across layers (the `blocks="layer"` approximation)."""
    params = dict(wf.model.named_parameters())
    ids = torch.cat([torch.full((params[n].numel(),), i) for i, grp in enumerate(wf._layer_groups) for n in grp])
    return (ids[:, None] == ids[None, :]).to(DT)


def dense_power(f, lam, p, v):
    e, u = torch.linalg.eigh(f)
    return u @ (((e + lam) ** p) * (u.T @ v))


def flat(vec, names):
    return torch.cat([vec[n].reshape(-1) for n in names])


def random_vector(cur, seed=7):
    g = torch.Generator().manual_seed(seed)
    params = dict(cur.model.named_parameters())
    return {n: torch.randn(params[n].shape, generator=g, dtype=params[n].dtype) for n in cur.param_names}


def build(case, batches=None, **kw):
    make_model, make_objective, make_batches = CASES[case]
    model, objective = make_model(), make_objective()
    batches = make_batches() if batches is None else batches
    wf = WoodFisher(model, objective=objective, **kw)
    for b in batches:
        wf.accumulate(b)
    return wf.finalize(), model, objective, batches


@pytest.mark.parametrize("blocks", ["full", "layer"])
@pytest.mark.parametrize("case", list(CASES))
def test_powers_match_dense_eigendecomposition(case, blocks):
    wf, model, objective, batches = build(case, blocks=blocks)
    names = wf.param_names
    fisher = brute_force_fisher(model, objective, batches, names)
    if blocks == "layer":
        fisher = fisher * layer_mask(wf)
        assert len(wf.groups) == len(wf._layer_groups) > 1
    torch.testing.assert_close(wf.dense(), fisher, rtol=1e-9, atol=1e-12)
    v = random_vector(wf)
    for lam in (1e-3, 0.3):
        for p in (-1.0, -0.25, 0.5, 1.0):
            got = flat(wf.apply(v, damping=lam, power=p), names)
            torch.testing.assert_close(got, dense_power(fisher, lam, p, flat(v, names)), rtol=1e-8, atol=1e-10)


def test_scale_matches_diagonal_empirical_fisher():
    model = tiny_gpt2()
    batches = [lm_batch(), lm_batch(b=2, t=4, seed=3)]
    wf = WoodFisher(model)
    diag = DiagonalFisher(model, fisher_type="empirical", params=wf.param_names)
    for b in batches:
        wf.accumulate(b)
        diag.accumulate(b)
    wf.finalize()
    diag.finalize()
    assert float(wf.count) == float(diag.count) == 3 * 4 - 1 + 2 * 3 - 1
    assert wf.examples == 5
    torch.testing.assert_close(torch.diagonal(wf.dense()), flat(diag.diagonal, wf.param_names).double(),
                               rtol=1e-5, atol=1e-8)


def test_padding_positions_change_nothing():
    model = tiny_gpt2()
    out = []
    for pad in (0, 3):
        wf = WoodFisher(model)
        wf.accumulate(lm_batch(pad=pad))
        wf.finalize()
        v = random_vector(wf)
        out.append((wf.inverse(v, damping=1e-2), wf.apply(v, damping=1e-2, power=-0.25)))
    for a, b in zip(*out):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=1e-12)


def test_halves_equal_whole_and_woodbury_downdate_equals_retain():
    whole = mlp_batch("ce", b=8)
    retain_b = {k: v[:5] for k, v in whole.items()}
    forget_b = {k: v[5:] for k, v in whole.items()}
    full, model, obj, _ = build("mlp-ce", batches=[whole])
    halves, *_ = build("mlp-ce", batches=[retain_b, forget_b])
    forget, *_ = build("mlp-ce", batches=[forget_b])
    retain, *_ = build("mlp-ce", batches=[retain_b])
    torch.testing.assert_close(halves.dense(), full.dense())
    halves.subtract(forget)
    assert float(halves.count) == 5 and halves.examples == 5
    torch.testing.assert_close(halves.dense(), retain.dense(), rtol=1e-9, atol=1e-12)
    v = random_vector(full)
    for p in (-1.0, -0.25):
        a, b = halves.apply(v, 1e-2, p), retain.apply(v, 1e-2, p)
        for n in v:
            torch.testing.assert_close(a[n], b[n], rtol=1e-8, atol=1e-10)
    # a downdate by rows that were never added leaves an indefinite form: clamped to PSD
    other, *_ = build("mlp-ce", batches=[mlp_batch("ce", b=3, seed=11)])
    retain.subtract(other)
    assert bool((retain._decomp[0]["eig"] >= 0).all())
    assert all(torch.isfinite(t).all() for t in retain.apply(v, 1e-2, -0.25).values())
    # a downdated curvature survives a state_dict round trip
    state = halves.state_dict()
    fresh = WoodFisher(model, objective=obj)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.dense(), halves.dense())


def test_auto_blocks_and_mc_fisher():
    small, *_ = build("mlp-ce")
    assert small.resolved_blocks() == "full" and len(small.groups) == 1
    tight, *_ = build("mlp-ce", max_full_elements=10)
    assert tight.resolved_blocks() == "layer" and len(tight.groups) == 2
    mc, model, obj, batches = build("mlp-ce", fisher_type="mc", seed=3)
    emp, *_ = build("mlp-ce")
    assert torch.isfinite(mc.dense()).all() and not torch.allclose(mc.dense(), emp.dense())
    mc2, *_ = build("mlp-ce", fisher_type="mc", seed=3)
    torch.testing.assert_close(mc.dense(), mc2.dense())  # seeded sampling is reproducible


def test_clear_errors():
    model = mlp()
    obj = CrossEntropyObjective(shift=False)
    wf = WoodFisher(model, objective=obj)
    v = random_vector(wf)
    with pytest.raises(RuntimeError, match="apply\\(\\) before finalize"):
        wf.inverse(v, damping=1e-2)
    wf.accumulate(mlp_batch("ce"))
    wf.finalize()
    for bad in (0.0, -0.5):
        with pytest.raises(ValueError, match="damping must be a finite number > 0"):
            wf.apply(v, damping=bad, power=-0.25)
    wrong = dict(v)
    wrong["2.bias"] = torch.zeros(4, dtype=DT)
    with pytest.raises(ValueError, match="vector\\['2.bias'\\] has shape \\(4,\\)"):
        wf.inverse(wrong, damping=1e-2)
    with pytest.raises(ValueError, match="blocks must be one of"):
        WoodFisher(model, blocks="diag")
    with pytest.raises(ValueError, match="fisher_type must be one of"):
        WoodFisher(model, fisher_type="true")
    with pytest.raises(ValueError, match="no trackable layer"):
        WoodFisher(model, include="nothing-matches")
    empty = WoodFisher(model, objective=obj)
    batch = mlp_batch("ce")
    batch["labels"][:] = -100
    empty.accumulate(batch)
    with pytest.raises(RuntimeError, match="no valid position"):
        empty.finalize()
    nan = WoodFisher(model, objective=obj)
    batch = mlp_batch("ce")
    batch["inputs"][2, 1] = float("inf")
    nan.accumulate(batch)
    with pytest.raises(FloatingPointError, match="parameter '0.weight' \\(per-example gradients\\)"):
        nan.finalize()
