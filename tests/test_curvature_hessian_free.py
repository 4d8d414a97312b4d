"""Hessian-free CG backend: products and solves against dense float64 brute force and curvlinops."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dense_models import DT, lm_batch, mlp, mlp_batch, tiny_gpt2
from torch import nn
from torch.func import functional_call

from lightning_unlearn.curvature import (
    CrossEntropyObjective,
    HessianFree,
    MSEObjective,
    NegativeCurvatureError,
    WoodFisher,
)
from lightning_unlearn.curvature.base import gradient
from lightning_unlearn.models import small_causal_lm

CASES = {
    "mlp-mse": (mlp, MSEObjective, lambda: [mlp_batch("mse"), mlp_batch("mse", b=3, seed=5)]),
    "mlp-ce": (mlp, lambda: CrossEntropyObjective(shift=False),
               lambda: [mlp_batch("ce"), mlp_batch("ce", b=3, seed=5)]),
    "gpt2": (tiny_gpt2, CrossEntropyObjective, lambda: [lm_batch(), lm_batch(b=1, t=4, seed=3)]),
}


# ---------------------------------------------------------------------------- dense brute force
def dense_curvatures(model, objective, batches, names):
    """Dense GGN and Hessian of the mean loss over all valid positions of `batches`, over flattened `names`."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    fixed = {n: p.detach() for n, p in params.items() if n not in names}

    def unflat(flat):
        out, o = {}, 0
        for n, s in zip(names, shapes):
            out[n] = flat[o: o + s.numel()].reshape(s)
            o += s.numel()
        return out

    def outputs(flat, batch):
        p = {**fixed, **unflat(flat)}
        if "input_ids" in batch:
            logits = functional_call(model, p, (), {"input_ids": batch["input_ids"],
                                                    "attention_mask": batch["attention_mask"]}).logits
        else:
            logits = functional_call(model, p, (batch["inputs"],))
        return objective.positions(logits, batch)

    total = sum(outputs(theta, b).count for b in batches)

    def loss(flat):
        out = 0.0
        for b in batches:
            pos = outputs(flat, b)
            out = out + objective.per_position_loss(pos.outputs, pos.targets).sum()
        return out / total

    hessian = torch.autograd.functional.hessian(loss, theta)
    ggn = torch.zeros_like(hessian)
    for b in batches:
        out = outputs(theta, b).outputs.detach()
        jac = torch.autograd.functional.jacobian(lambda f, b=b: outputs(f, b).outputs, theta)  # [N, C, d]
        c = out.shape[-1]
        eye = torch.eye(c, dtype=DT)
        h = torch.stack([objective.hessian_vector(out, eye[j].expand_as(out)) for j in range(c)], -1)  # [N, C, C]
        ggn += torch.einsum("nad,nab,nbe->de", jac, h, jac) / total
    return ggn, hessian


def flat(vec, names):
    return torch.cat([vec[n].reshape(-1) for n in names])


def random_vector(cur, seed=7):
    g = torch.Generator().manual_seed(seed)
    params = dict(cur.model.named_parameters())
    return {n: torch.randn(params[n].shape, generator=g, dtype=params[n].dtype) for n in cur.param_names}


def build(case, product="ggn", **kw):
    make_model, make_objective, make_batches = CASES[case]
    model, objective, batches = make_model(), make_objective(), make_batches()
    cg = HessianFree(model, objective=objective, product=product, **kw)
    for b in batches:
        cg.accumulate(b)
    return cg.finalize(), model, objective, batches


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("case", list(CASES))
def test_products_and_cg_match_dense(case):
    cg, model, objective, batches = build(case, max_iter=500, rtol=1e-12, progress_tol=0)
    hcg = HessianFree(model, objective=objective, product="hessian", max_iter=500, rtol=1e-12, progress_tol=0)
    for b in batches:
        hcg.accumulate(b)
    hcg.finalize()
    names = cg.param_names
    ggn, hess = dense_curvatures(model, objective, batches, names)
    assert not torch.allclose(ggn, hess, atol=1e-6)  # the two products are really different matrices here
    v = random_vector(cg)
    torch.testing.assert_close(flat(cg.matvec(v), names), ggn @ flat(v, names), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(flat(hcg.matvec(v), names), hess @ flat(v, names), rtol=1e-9, atol=1e-11)

    eye = torch.eye(len(ggn), dtype=DT)
    lam = 1e-2
    x = cg.inverse(v, damping=lam)
    torch.testing.assert_close(flat(x, names), torch.linalg.solve(ggn + lam * eye, flat(v, names)),
                               rtol=1e-7, atol=1e-9)
    assert cg.last_solve["converged"] and not cg.last_solve["negative_curvature"]
    assert cg.last_solve["relative_residual"] <= 1e-12
    # Hessian CG with damping above the most negative eigenvalue: positive definite, CG is exact too
    lam_h = max(1e-2, -float(torch.linalg.eigvalsh(hess)[0]) + 0.5)
    xh = hcg.inverse(v, damping=lam_h)
    torch.testing.assert_close(flat(xh, names), torch.linalg.solve(hess + lam_h * eye, flat(v, names)),
                               rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kind", ["mse", "ce"])
def test_ggn_products_match_curvlinops(kind):
    from curvlinops import GGNLinearOperator

    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    batches = [mlp_batch(kind, b=5), mlp_batch(kind, b=4, seed=9)]
    objective = MSEObjective() if kind == "mse" else CrossEntropyObjective(shift=False)
    loss_func = nn.MSELoss() if kind == "mse" else nn.CrossEntropyLoss()
    cg = HessianFree(model, objective=objective)
    for b in batches:
        cg.accumulate(b)
    cg.finalize()
    params = [p for p in model.parameters()]
    op = GGNLinearOperator(model, loss_func, params, [(b["inputs"], b["labels"]) for b in batches],
                           check_deterministic=False)
    v = random_vector(cg)
    ours = cg.matvec(v)
    theirs = op @ [v[n] for n, _ in model.named_parameters()]
    for (n, _), t in zip(model.named_parameters(), theirs):
        torch.testing.assert_close(ours[n], t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("product", ["ggn", "hessian"])
def test_padding_positions_change_nothing(product):
    model = tiny_gpt2()
    results = []
    for pad in (0, 3):
        cg = HessianFree(model, product=product, max_iter=200, rtol=1e-12, progress_tol=0)
        cg.accumulate(lm_batch(pad=pad))
        cg.finalize()
        assert float(cg.count) == 2 * 4 - 1
        v = random_vector(cg)
        results.append((cg.matvec(v), cg.inverse(v, damping=5.0 if product == "ggn" else 1e4)))
    for a, b in zip(results[0], results[1]):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=1e-12)


def test_two_halves_equal_whole_batch_and_subtract_removes_batches():
    model = mlp()
    whole = mlp_batch("ce", b=8)
    half1 = {k: v[:4] for k, v in whole.items()}
    half2 = {k: v[4:] for k, v in whole.items()}
    obj = CrossEntropyObjective(shift=False)
    a = HessianFree(model, objective=obj)
    a.accumulate(whole)
    a.finalize()
    b = HessianFree(model, objective=obj)
    b.accumulate(half1)
    b.accumulate(half2)
    b.finalize()
    forget = HessianFree(model, objective=obj)
    forget.accumulate(half2)
    forget.finalize()
    retain = HessianFree(model, objective=obj)
    retain.accumulate(half1)
    retain.finalize()
    v = random_vector(a)
    va, vb = a.matvec(v), b.matvec(v)
    b.subtract(forget)
    assert float(b.count) == 4
    vr, vd = retain.matvec(v), b.matvec(v)
    for n in v:
        torch.testing.assert_close(va[n], vb[n])
        torch.testing.assert_close(vr[n], vd[n])


def test_negative_curvature_is_detected_with_hessian_products():
    model = mlp(seed=3)
    objective = CrossEntropyObjective(shift=False)
    batch = mlp_batch("ce", b=6)
    cg = HessianFree(model, objective=objective, product="hessian")
    cg.accumulate(batch)
    cg.finalize()
    _, hess = dense_curvatures(model, objective, [batch], cg.param_names)
    evals, evecs = torch.linalg.eigh(hess)
    assert evals[0] < -1e-4, "the test model must have negative curvature"
    lam = -float(evals[0]) / 2
    sizes = [p.numel() for p in (dict(model.named_parameters())[n] for n in cg.param_names)]
    v = dict(zip(cg.param_names, (t.reshape(dict(model.named_parameters())[n].shape)
                                  for n, t in zip(cg.param_names, evecs[:, 0].split(sizes)))))
    with pytest.raises(NegativeCurvatureError, match="negative curvature .* raise the damping"):
        cg.inverse(v, damping=lam)
    assert cg.last_solve == {} or cg.last_solve.get("negative_curvature", True)
    stop = HessianFree(model, objective=objective, product="hessian", on_negative_curvature="stop")
    stop.accumulate(batch)
    stop.finalize()
    x = stop.inverse(v, damping=lam)
    info = stop.last_solve
    assert info["negative_curvature"] and info["iterations"] == 1 and not info["converged"]
    torch.testing.assert_close(flat(x, cg.param_names), evecs[:, 0] / lam)
    # the GGN of the same model is PSD: no negative curvature, CG converges
    ggn = HessianFree(model, objective=objective, product="ggn", rtol=1e-10, max_iter=200, progress_tol=0)
    ggn.accumulate(batch)
    ggn.finalize()
    ggn.inverse(v, damping=lam)
    assert ggn.last_solve["converged"] and not ggn.last_solve["negative_curvature"]


# ---------------------------------------------------------------------------- real models
@pytest.mark.filterwarnings("ignore:cg. not converged:RuntimeWarning")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tiny_llms_give_finite_newton_directions(arch, capsys):
    model = small_causal_lm(arch)
    vocab = model.config.vocab_size
    retain = [lm_batch(b=2, t=12, seed=s, vocab=vocab, pad=2) for s in (10, 11)]
    forget = lm_batch(b=2, t=12, seed=12, vocab=vocab)
    names = None
    for backend in (HessianFree(model, max_iter=20, rtol=1e-3), WoodFisher(model)):
        for b in retain:
            backend.accumulate(b)
        backend.finalize()
        names = backend.param_names
        loss = backend.objective.loss(backend.logits(forget), forget)
        g = gradient(model, loss, names)
        with torch.no_grad():
            d = backend.inverse(g, damping=1e-2)
        assert set(d) == set(names)
        assert all(torch.isfinite(t).all() for t in d.values())
        assert sum(float((d[n] * g[n]).sum()) for n in names) > 0  # a descent-compatible direction
        fp = backend.memory_footprint()
        assert fp["total"] == sum(v for k, v in fp.items() if k != "total") > 0
        with capsys.disabled():
            extra = f" last_solve={backend.last_solve}" if isinstance(backend, HessianFree) else ""
            print(f"\n[{arch}] {backend.name} memory footprint (bytes): {fp}{extra}")


# ---------------------------------------------------------------------------- errors and state
def test_clear_errors():
    model = mlp()
    obj = CrossEntropyObjective(shift=False)
    cg = HessianFree(model, objective=obj)
    v = random_vector(cg)
    with pytest.raises(RuntimeError, match="apply\\(\\) before finalize"):
        cg.inverse(v, damping=1e-2)
    cg.accumulate(mlp_batch("ce"))
    cg.finalize()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="damping must be a finite number > 0"):
            cg.inverse(v, damping=bad)
    with pytest.raises(ValueError, match="cg supports power in \\(-1.0,\\), got -0.25"):
        cg.apply(v, damping=1e-2, power=-0.25)
    wrong = dict(v)
    wrong["0.weight"] = torch.zeros(3, 3, dtype=DT)
    with pytest.raises(ValueError, match="vector\\['0.weight'\\] has shape \\(3, 3\\)"):
        cg.inverse(wrong, damping=1e-2)
    with pytest.raises(ValueError, match="vector keys do not match"):
        cg.inverse({"0.weight": v["0.weight"]}, damping=1e-2)
    with pytest.raises(ValueError, match="product must be one of"):
        HessianFree(model, product="fisher")
    with pytest.raises(ValueError, match="unknown parameter names"):
        HessianFree(model, params=["nope"])
    # NaN statistics name the parameter
    nan_inputs = mlp_batch("ce")
    nan_inputs["inputs"][0, 0] = float("nan")
    bad = HessianFree(model, objective=obj)
    bad.accumulate(nan_inputs)
    bad.finalize()
    with pytest.raises(FloatingPointError, match="parameter '0.weight' \\(ggn-vector product\\)"):
        bad.inverse(v, damping=1e-2)
    broken = mlp()
    with torch.no_grad():
        broken[2].bias[1] = float("inf")
    cgb = HessianFree(broken, objective=obj)
    cgb.accumulate(mlp_batch("ce"))
    with pytest.raises(FloatingPointError, match="parameter '2.bias'"):
        cgb.finalize()


def test_state_dict_keeps_config_not_batches():
    model = mlp()
    obj = CrossEntropyObjective(shift=False)
    cg = HessianFree(model, objective=obj, product="hessian", max_iter=7, rtol=1e-3)
    cg.accumulate(mlp_batch("ce"))
    cg.finalize()
    state = cg.state_dict()
    assert "batches" not in state and state["max_iter"] == 7 and float(state["count"]) == 6
    fresh = HessianFree(model, objective=obj)
    fresh.load_state_dict(state)
    assert fresh.product == "hessian" and fresh.rtol == 1e-3
    with pytest.raises(RuntimeError, match="keeps no batches"):
        fresh.inverse(random_vector(fresh), damping=1e-2)
    fresh.reset()
    fresh.accumulate(mlp_batch("ce"))
    fresh.finalize()
    fresh.inverse(random_vector(fresh), damping=1.0)


# ---------------------------------------------------------------------------- two real processes (gloo)
def _gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate rows of uneven size across ranks (what a strategy's all_gather plus unpadding gives)."""
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]]))
    top = int(max(s.item() for s in sizes))
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


def _reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def _worker(rank: int, port: int, halves: list, expected: dict, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = mlp()
        obj = CrossEntropyObjective(shift=False)
        v = expected["v"]
        for backend in (HessianFree(model, objective=obj, rtol=1e-12, max_iter=200, progress_tol=0, reduce=_reduce),
                        WoodFisher(model, objective=obj, reduce=_reduce, gather=_gather)):
            for b in halves[rank]:
                backend.accumulate(b)
            backend.finalize()
            got = backend.inverse(v, damping=1e-2)
            for n in got:
                torch.testing.assert_close(got[n], expected[backend.name][n], rtol=1e-8, atol=1e-10)
        open(os.path.join(result_dir, f"ok{rank}"), "w").close()
    finally:
        from lightning_unlearn.distributed import leave_process_group

        leave_process_group()  # together, after gloo's threads released their work


def test_two_gloo_processes_equal_whole_batch(tmp_path):
    model = mlp()
    obj = CrossEntropyObjective(shift=False)
    whole = mlp_batch("ce", b=7)
    # uneven shares: rank 0 gets two batches (3 + 1 rows), rank 1 one batch (3 rows)
    halves = [[{k: t[:3] for k, t in whole.items()}, {k: t[3:4] for k, t in whole.items()}],
              [{k: t[4:] for k, t in whole.items()}]]
    expected = {}
    for backend in (HessianFree(model, objective=obj, rtol=1e-12, max_iter=200, progress_tol=0),
                    WoodFisher(model, objective=obj)):
        backend.accumulate(whole)
        backend.finalize()
        v = random_vector(backend)
        expected["v"] = v
        expected[backend.name] = backend.inverse(v, damping=1e-2)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork (Linux) reuses the imported, warmed-up parent: ~0.1 s instead of ~12 s for spawn on 2 cores
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(port, halves, expected, str(tmp_path)), nprocs=2, join=True,
                       start_method=method)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


def test_warm_start_reuses_the_previous_solution():
    model = mlp()
    obj = CrossEntropyObjective(shift=False)
    cg = HessianFree(model, objective=obj, warm_start=True, rtol=1e-10, max_iter=200, progress_tol=0)
    cg.accumulate(mlp_batch("ce"))
    cg.finalize()
    v = random_vector(cg)
    x1 = cg.inverse(v, damping=1e-2)
    first = cg.last_solve["iterations"]
    x2 = cg.inverse(v, damping=1e-2)
    assert first > 1 and cg.last_solve["iterations"] <= 1 and cg.last_solve["converged"]
    for n in v:
        torch.testing.assert_close(x1[n], x2[n])


# ---------------------------------------------------------------------------- attention implementations
def _tiny_lm(arch: str, attn: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from lightning_unlearn.models import small_config

    torch.manual_seed(0)
    config = small_config(arch, vocab_size=16, hidden=8, layers=1, heads=2, max_positions=16)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


@pytest.mark.filterwarnings("ignore:cg. not converged")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_products_under_sdpa_attention_equal_eager(arch):
    """transformers' default attention (sdpa) has no forward-mode AD: CG switches the model to eager for its
    products, gets the eager model's numbers, and hands the model back on sdpa."""
    eager, sdpa = _tiny_lm(arch, "eager"), _tiny_lm(arch, "sdpa")
    sdpa.load_state_dict(eager.state_dict())
    assert sdpa.config._attn_implementation == "sdpa"
    batches = [lm_batch(pad=2), lm_batch(b=1, t=4, seed=3)]  # padded rows: the attention mask path too
    for product in ("ggn", "hessian"):
        out = {}
        for name, model in (("eager", eager), ("sdpa", sdpa)):
            cg = HessianFree(model, product=product, max_iter=5)  # a short solve: the same 5 steps on both
            for b in batches:
                cg.accumulate(b)
            cg.finalize()
            v = random_vector(cg)
            out[name] = (cg.matvec(v),) + ((cg.inverse(v, damping=0.1),) if product == "ggn" else ())
            assert model.config._attn_implementation == name  # restored after the products
        for got, want in zip(out["sdpa"], out["eager"]):
            for n in want:
                torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-5)
    sdpa(input_ids=batches[0]["input_ids"])  # still runs on its own kernel afterwards


def test_eager_attention_restores_on_error_and_refuses_models_that_cannot_switch():
    from types import SimpleNamespace

    from lightning_unlearn.curvature.hessian_free import eager_attention
    from lightning_unlearn.errors import UserInputError

    model = _tiny_lm("llama", "sdpa")
    with pytest.raises(KeyError), eager_attention(model):
        assert model.config._attn_implementation == "eager"
        raise KeyError("boom")
    assert model.config._attn_implementation == "sdpa"

    class Fused(nn.Module):  # an HF-like model without set_attn_implementation
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(_attn_implementation="flash_attention_2")
            self.proj = nn.Linear(2, 2)

    with pytest.raises(UserInputError, match=r"'flash_attention_2' attention, which has no forward-mode AD.*load the "
                                             r'model with attn_implementation="eager"'), eager_attention(Fused()):
        pass


def test_fused_attention_outside_transformers_gets_a_clear_error():
    """A plain module calling the fused kernel itself cannot be switched: the error says to use eager attention."""
    from lightning_unlearn.errors import UserInputError

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.q, self.out = nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 16)

        def forward(self, ids):
            h = self.emb(ids)[:, None]
            return self.out(torch.nn.functional.scaled_dot_product_attention(self.q(h), h, h, is_causal=True)[:, 0])

    ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))
    for product in ("ggn", "hessian"):
        cg = HessianFree(Attn(), product=product)
        cg.accumulate({"input_ids": ids, "labels": ids})
        cg.finalize()
        with pytest.raises(UserInputError, match=r"attention kernel has no forward-mode AD or double backward.*"
                                                 r'attn_implementation="eager"'):
            cg.matvec(random_vector(cg))


# ---------------------------------------------------------------------------- defaults that finish, one solve
def test_constrained_inverse_is_the_protected_newton_direction():
    """One projected CG solve gives the holdout-protected direction `A⁻¹v - A⁻¹H α` (HᵀA⁻¹H α = HᵀA⁻¹v) that
    other backends get from k + 1 solves, and it satisfies the constraints Hᵀx = 0."""
    cg, model, objective, batches = build("gpt2", max_iter=500, rtol=1e-12, progress_tol=0)
    names = cg.param_names
    ggn, _ = dense_curvatures(model, objective, batches, names)
    v, hs = random_vector(cg, seed=1), [random_vector(cg, seed=2), random_vector(cg, seed=3)]
    lam = 1e-2
    x = flat(cg.constrained_inverse(v, hs, damping=lam), names)
    a = ggn + lam * torch.eye(len(ggn), dtype=DT)
    h = torch.stack([flat(c, names) for c in hs], 1)
    d, dh = torch.linalg.solve(a, flat(v, names)), torch.linalg.solve(a, h)
    expected = d - dh @ torch.linalg.solve(h.T @ dh, h.T @ d)
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-8)
    assert float((h.T @ x).abs().max()) < 1e-8 * float(h.norm() * x.norm())
    assert cg.last_solve["converged"] and cg.last_solve["constrained"] == 2
    # relative damping reads damping like apply() does
    torch.testing.assert_close(cg.constrained_inverse(v, hs, damping=0.1, mode="relative")[names[0]],
                               cg.constrained_inverse(v, hs, damping=0.1 * cg.damping_scales()["all"])[names[0]])


@pytest.fixture(scope="module")
def memorised_qwen2():
    from canary_corpus import memorise

    return memorise("qwen2")  # 4 memorised digit canaries, 8 never-seen ones


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_default_cg_finishes_its_solves_within_max_iter_with_one_solve_per_direction(memorised_qwen2, attn):
    """The default recipe on CG (no knob set) on a tiny memorising Qwen2: each direction, holdout protection
    included, is one solve (not 1 + 8), each solve ends within max_iter (50) iterations, at most one warning
    says what to set, and the step forgets within the retain budget. Before: 9 solves of 50 iterations per
    direction, each warned "not converged" with residuals above the starting one."""
    import copy
    import warnings

    from lightning_unlearn.methods import build_unlearner
    from lightning_unlearn.methods.target import retain_budget_nats

    base, forget, retain, held, holdout = memorised_qwen2
    model = copy.deepcopy(base)
    if attn == "sdpa":
        model.set_attn_implementation("sdpa")
    u = build_unlearner("newton", model, curvature_backend="cg")
    u.fit_curvature(retain[:1])
    cg = u.curvature
    solves, products = [], []
    solve, product = cg.solve, cg._matvec_flat

    def counted_solve(*args, **kwargs):
        x, info = solve(*args, **kwargs)
        solves.append(dict(info))
        return x, info

    def counted_product(v):
        products.append(1)
        return product(v)

    cg.solve, cg._matvec_flat = counted_solve, counted_product
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = u.fit([forget], retain[:1], held_retain_batch=held, holdout_batches=[holdout])
    said = [str(w.message) for w in caught if str(w.message).startswith("cg:")]
    summary = u.summary()
    assert u.status in ("target_reached", "budget_exhausted"), summary
    assert len(solves) == len(records) and all(s["constrained"] == u.protect_groups for s in solves), solves
    assert all(s["iterations"] <= cg.max_iter and s["stopped"] in ("converged", "progress", "max_iter")
               for s in solves), solves
    assert len(products) <= len(solves) * (cg.max_iter + 1) + cg.trace_probes + 2 * len(records)
    assert len(said) <= 1 and all("raise max_iter" in m for m in said), said
    assert summary["forget_loss_after"] > summary["forget_loss_before"] + 1.0, summary
    assert summary["retain_loss_after"] <= summary["retain_loss_before"] + retain_budget_nats(
        u.max_retain_increase, summary["retain_loss_before"]) + 1e-9, summary
    assert model.config._attn_implementation == attn
