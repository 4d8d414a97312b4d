"""K-FAC backend: exact against brute force where K-FAC is exact, against curvlinops' KFACLinearOperator, and
the engine contract (padding, Conv1D, multi-process reduce, powers, persistence, subtraction, errors)."""

from __future__ import annotations

import io
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from lightning_unlearn.curvature import KFAC, CrossEntropyObjective, MSEObjective, gradient
from lightning_unlearn.curvature.objective import IGNORE_INDEX
from lightning_unlearn.errors import UserInputError
from lightning_unlearn.models import ARCHITECTURES, small_causal_lm

D64 = torch.float64


def _mlp(d_in=4, hidden=5, d_out=3, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, d_out, bias=bias)).to(D64)


def _flat(kfac: KFAC, vec: dict) -> torch.Tensor:
    return torch.cat([vec[n].reshape(-1) for n in kfac.param_names])


def _unflat(kfac: KFAC, flat: torch.Tensor) -> dict:
    params = dict(kfac.model.named_parameters())
    out, i = {}, 0
    for n in kfac.param_names:
        k = params[n].numel()
        out[n] = flat[i:i + k].reshape(params[n].shape)
        i += k
    return out


def _random_vector(kfac: KFAC, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    params = dict(kfac.model.named_parameters())
    return {n: torch.randn(params[n].shape, generator=g, dtype=params[n].dtype) for n in kfac.param_names}


def _dense_kron(kfac: KFAC, layer_name: str) -> torch.Tensor:
    """K-FAC block of one layer as a dense matrix acting on the row-major flattened [out, in+1] matrix."""
    a, g = kfac.factor(layer_name)
    return torch.kron(g.to(D64), a.to(D64))


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("bias", [True, False])
def test_single_linear_type2_mse_equals_exact_ggn(bias):
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=bias).to(D64)
    x = torch.randn(2, 5, 4, dtype=D64)  # sequence input: every position a sample (expand)
    y = torch.randn(2, 5, 3, dtype=D64)
    kfac = KFAC(layer, objective=MSEObjective(), fisher_type="type2")
    kfac.accumulate({"inputs": x, "labels": y})
    kfac.finalize()

    # brute force: J of the outputs w.r.t. the [out, in(+1)] matrix, GGN = J^T H J / N with H = (2/C) I
    xs = x.reshape(-1, 4)
    n, c = xs.shape[0], 3
    mat = layer.weight.detach() if not bias else torch.cat([layer.weight, layer.bias[:, None]], 1).detach()

    def outputs(m):
        return xs @ m[:, :4].T + (m[:, 4] if bias else 0)

    jac = torch.autograd.functional.jacobian(outputs, mat).reshape(n * c, -1)
    ggn = jac.T @ jac * (2.0 / c) / n
    torch.testing.assert_close(_dense_kron(kfac, ""), ggn, rtol=1e-10, atol=1e-12)

    v = _random_vector(kfac)
    lam = 0.1
    direction = kfac.apply(v, lam, -1.0)
    vmat = kfac.layers[0].to_matrix(v).reshape(-1)
    dense = torch.linalg.solve(ggn + lam * torch.eye(ggn.shape[0], dtype=D64), vmat)
    torch.testing.assert_close(kfac.layers[0].to_matrix(direction).reshape(-1), dense, rtol=1e-9, atol=1e-10)


def test_fractional_power_matches_dense_and_composes():
    model = _mlp(d_in=3, hidden=2, d_out=2)
    kfac = KFAC(model, objective=CrossEntropyObjective(shift=False), fisher_type="empirical")
    torch.manual_seed(3)
    kfac.accumulate({"inputs": torch.randn(16, 3, dtype=D64), "labels": torch.randint(0, 2, (16,))})
    kfac.finalize()
    lam = 0.05
    v = _random_vector(kfac)
    w = v
    for _ in range(4):
        w = kfac.apply(w, lam, -0.25)
    inv = kfac.apply(v, lam, -1.0)
    for n in kfac.param_names:
        torch.testing.assert_close(w[n], inv[n], rtol=1e-9, atol=1e-10)
    quarter = kfac.apply(v, lam, -0.25)
    for layer in kfac.layers:
        dense = _dense_kron(kfac, layer.name)
        s, u = torch.linalg.eigh(dense)
        root = (u * (s.clamp_min(0) + lam).pow(-0.25)) @ u.T
        expected = root @ layer.to_matrix(v).reshape(-1)
        torch.testing.assert_close(layer.to_matrix(quarter).reshape(-1), expected, rtol=1e-8, atol=1e-10)
    # p = 1: (C + λI) v, i.e. the dense Kronecker product plus damping
    fwd = kfac.apply(v, lam, 1.0)
    layer = kfac.layers[1]
    dense = _dense_kron(kfac, layer.name) + lam * torch.eye(layer.out_features * (layer.in_features + 1), dtype=D64)
    torch.testing.assert_close(layer.to_matrix(fwd).reshape(-1), dense @ layer.to_matrix(v).reshape(-1))


def test_eigenvalue_correction_equals_per_position_moments_in_the_kronecker_eigenbasis():
    torch.manual_seed(0)
    layer = nn.Linear(3, 4).to(D64)
    x, y = torch.randn(10, 3, dtype=D64), torch.randint(0, 4, (10,))
    batch = {"inputs": x, "labels": y}
    kfac = KFAC(layer, objective=CrossEntropyObjective(shift=False), fisher_type="empirical")
    kfac.accumulate(batch)
    kfac.finalize()
    kfac.correct_eigenvalues([batch])
    # brute force: per-example gradients of the [out, in+1] matrix, their second moment, in the eigenbasis
    rows = []
    for i in range(10):
        loss = nn.functional.cross_entropy(layer(x[i:i + 1]), y[i:i + 1])
        gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
        rows.append(torch.cat([gw, gb[:, None]], 1).reshape(-1))
    grads = torch.stack(rows)
    fisher = grads.T @ grads / 10
    u_a, _, u_g, _ = kfac.eigen[""]
    q = torch.kron(u_g, u_a)
    expected = torch.diagonal(q.T @ fisher @ q).reshape(4, 4)
    torch.testing.assert_close(kfac.corrected[""], expected, rtol=1e-9, atol=1e-12)
    # and the corrected inverse is the dense one in that eigenbasis
    v = _random_vector(kfac)
    d = kfac.apply(v, 0.1, -1.0)
    dense = q @ torch.diag(1.0 / (expected.reshape(-1) + 0.1)) @ q.T @ kfac.layers[0].to_matrix(v).reshape(-1)
    torch.testing.assert_close(kfac.layers[0].to_matrix(d).reshape(-1), dense)


def test_mc_fisher_converges_to_type2():
    """The sampled-label (true) Fisher is an unbiased estimate of the type-2 one: many draws get close."""
    model = _mlp(d_in=3, hidden=4, d_out=3)
    torch.manual_seed(0)
    batch = {"inputs": torch.randn(3, 5, 3, dtype=D64), "labels": torch.randint(0, 3, (3, 5))}
    found = {}
    for fisher_type, samples in (("type2", 1), ("mc", 400)):
        kfac = KFAC(model, objective=CrossEntropyObjective(shift=False), fisher_type=fisher_type, mc_samples=samples)
        kfac.accumulate(batch)
        kfac.finalize()
        found[fisher_type] = kfac.factor("2")[1]
    err = (found["mc"] - found["type2"]).norm() / found["type2"].norm()
    assert err < 0.1, err


# ---------------------------------------------------------------------------------------------- curvlinops
class _ChannelsSecond(nn.Module):
    """curvlinops' CrossEntropyLoss wants logits [B, C, T]; ours are [B, T, C]."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        return out.transpose(1, 2) if out.dim() == 3 else out


def _curvlinops_kfac(model, loss, data, fisher_type, approx="expand", seq_ce=False):
    from curvlinops import KFACLinearOperator

    func = _ChannelsSecond(model) if seq_ce else model
    params = [p for p in func.parameters()]
    op = KFACLinearOperator(func, loss, params, data, fisher_type=fisher_type, kfac_approx=approx,
                            separate_weight_and_bias=False, check_deterministic=False)
    op.compute_kronecker_factors()
    prefix = "net." if seq_ce else ""
    return op, prefix


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
@pytest.mark.parametrize("fisher_type", ["type2", "empirical"])
@pytest.mark.parametrize("shape", ["flat", "seq-expand", "seq-reduce"])
def test_matches_curvlinops(loss_name, fisher_type, shape):
    model = _mlp(d_in=4, hidden=5, d_out=3)
    torch.manual_seed(1)
    b, t = 6, 4
    x_shape = (b, 4) if shape == "flat" else (b, t, 4)
    batches = []
    for _ in range(2):
        x = torch.randn(*x_shape, dtype=D64)
        y = torch.randn(*x_shape[:-1], 3, dtype=D64) if loss_name == "mse" else torch.randint(0, 3, x_shape[:-1])
        batches.append((x, y))
    seq = shape != "flat"
    approx = "reduce" if shape == "seq-reduce" else "expand"
    loss = nn.MSELoss() if loss_name == "mse" else nn.CrossEntropyLoss()
    op, prefix = _curvlinops_kfac(model, loss, batches, {"type2": "type-2"}.get(fisher_type, fisher_type),
                                  approx, seq_ce=seq and loss_name == "ce")
    objective = MSEObjective() if loss_name == "mse" else CrossEntropyObjective(shift=False)
    kfac = KFAC(model, objective=objective, fisher_type=fisher_type, kfac_approx=approx)
    for x, y in batches:
        kfac.accumulate({"inputs": x, "labels": y})
    kfac.finalize()
    # curvlinops scales the MSE loss by sqrt(C) for its sampled/empirical gradients (so that its MC Fisher
    # matches N(s, I/2)); our empirical Fisher is that of the loss itself, l_n = ||s_n - y_n||^2 / C: C times less
    scale = 3.0 if (loss_name, fisher_type) == ("mse", "empirical") else 1.0
    for layer in kfac.layers:
        a, g = kfac.factor(layer.name)
        torch.testing.assert_close(a, op._input_covariances[prefix + layer.name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g * scale, op._gradient_covariances[prefix + layer.name], rtol=1e-10, atol=1e-12)
    # the whole K-FAC matrix times a vector: (C + λI) v - λ v == curvlinops' KFAC @ v
    v = _random_vector(kfac)
    lam = 1e-2
    ours = _flat(kfac, kfac.apply(v, lam, 1.0)) - lam * _flat(kfac, v)
    theirs = (op @ _flat(kfac, v)) / scale
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- contract
def _lm_batch(vocab, b=2, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (b, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize(("fisher_type", "approx"), [("empirical", "expand"), ("mc", "expand"), ("mc", "reduce")])
def test_padding_positions_change_nothing(fisher_type, approx):
    model = small_causal_lm("gpt2", dtype=D64, hidden=16, layers=1, vocab_size=32)
    batch = _lm_batch(32)
    padded = {k: torch.cat([v, torch.full((2, 3), 0 if k == "attention_mask" else 7)], 1) for k, v in batch.items()}
    padded["labels"][:, 6:] = IGNORE_INDEX
    # a span-level label mask: a -100 in the middle removes the same position from both
    batch["labels"][0, 2] = padded["labels"][0, 2] = IGNORE_INDEX
    results = []
    for b in (batch, padded):
        kfac = KFAC(model, fisher_type=fisher_type, kfac_approx=approx, seed=5)
        kfac.accumulate(b)
        kfac.finalize()
        results.append(kfac)
    assert float(results[0].count) == float(results[1].count) == 2 * 5 - 1
    for layer in results[0].layers:
        for f0, f1 in zip(results[0].factor(layer.name), results[1].factor(layer.name)):
            torch.testing.assert_close(f0, f1, rtol=1e-9, atol=1e-12)
    # and the padding really was garbage: different tokens in the padded part
    assert not torch.equal(padded["input_ids"][:, 6:], batch["input_ids"][:, :3])


def test_conv1d_gives_the_direction_of_the_equivalent_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(5, 4), nn.Tanh(), Conv1D(3, 5)).to(D64)
    lin = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D64)
    with torch.no_grad():
        for i in (0, 2):
            lin[i].weight.copy_(conv[i].weight.T)
            lin[i].bias.copy_(conv[i].bias)
    batch = {"inputs": torch.randn(3, 4, 4, dtype=D64), "labels": torch.randint(0, 3, (3, 4))}
    dirs = []
    for model in (conv, lin):
        kfac = KFAC(model, objective=CrossEntropyObjective(shift=False), fisher_type="empirical")
        kfac.accumulate(batch)
        kfac.finalize()
        grad = gradient(model, kfac.objective.loss(kfac.logits(batch), batch), kfac.param_names)
        dirs.append(kfac.inverse(grad, 1e-3))
    assert [layer.transposed for layer in KFAC(conv).layers] == [True, True]
    for name in ("0.weight", "2.weight"):
        torch.testing.assert_close(dirs[0][name], dirs[1][name].T, rtol=1e-9, atol=1e-12)
    for name in ("0.bias", "2.bias"):
        torch.testing.assert_close(dirs[0][name], dirs[1][name], rtol=1e-9, atol=1e-12)


def _ddp_data():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(8, 3, 4, dtype=D64, generator=g)
    y = torch.randint(0, 3, (8, 3), generator=g)
    y[1, 0] = y[6, 2] = IGNORE_INDEX
    return x, y


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _mlp(d_in=4, hidden=5, d_out=3)
        x, y = _ddp_data()
        rows = slice(0, 3) if rank == 0 else slice(3, 8)  # unequal shares: the counts must be reduced too

        def reduce(t):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t

        kfac = KFAC(model, objective=CrossEntropyObjective(shift=False), fisher_type="empirical", reduce=reduce)
        kfac.accumulate({"inputs": x[rows], "labels": y[rows]})
        kfac.finalize()
        if rank == 0:
            torch.save({"count": kfac.count, "factors": kfac.factors}, out_file)
    finally:
        from lightning_unlearn.distributed import leave_process_group

        leave_process_group()  # together, after gloo's threads released their work


def test_two_processes_sum_to_the_whole_batch():
    model = _mlp(d_in=4, hidden=5, d_out=3)
    x, y = _ddp_data()
    whole = KFAC(model, objective=CrossEntropyObjective(shift=False), fisher_type="empirical")
    whole.accumulate({"inputs": x, "labels": y})
    whole.finalize()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), out), nprocs=2, join=True)
        got = torch.load(out)
    assert float(got["count"]) == float(whole.count) == 8 * 3 - 2
    for name, (a, g) in whole.factors.items():
        torch.testing.assert_close(got["factors"][name][0], a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["factors"][name][1], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_lms_give_finite_newton_directions(arch, tied):
    model = small_causal_lm(arch, tie_embeddings=tied)
    kfac = KFAC(model)
    skipped = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    skipped.add(id(model.get_output_embeddings().weight))
    assert kfac.layers and all(id(layer.module.weight) not in skipped for layer in kfac.layers)
    assert not any("embed" in n or "wte" in n or "lm_head" in n for n in kfac.param_names)
    kfac.accumulate(_lm_batch(128, b=2, t=8, seed=0))
    kfac.finalize()
    forget = _lm_batch(128, b=1, t=8, seed=1)
    grad = gradient(model, kfac.objective.loss(kfac.logits(forget), forget), kfac.param_names)
    direction = kfac.inverse(grad, 1e-3)
    flat = _flat(kfac, direction)
    assert torch.isfinite(flat).all() and flat.norm() > 0
    # a descent-compatible direction: <g, (C + λI)^-1 g> > 0
    assert float(flat @ _flat(kfac, grad)) > 0
    footprint = kfac.memory_footprint()
    assert footprint["total"] == footprint["factors"] + footprint["eigenvectors"] + footprint["eigenvalues"] > 0
    print(f"kfac memory footprint on tiny {arch} (tied={tied}): {footprint}")


def test_state_dict_round_trip_and_subtract_after_reload():
    model = _mlp()
    torch.manual_seed(2)
    b1 = {"inputs": torch.randn(10, 4, dtype=D64), "labels": torch.randint(0, 3, (10,))}
    b2 = {"inputs": torch.randn(14, 4, dtype=D64), "labels": torch.randint(0, 3, (14,))}

    def build(*batches, eigen_batches=None):
        k = KFAC(model, objective=CrossEntropyObjective(shift=False), fisher_type="empirical")
        for b in batches:
            k.accumulate(b)
        k.finalize()
        if eigen_batches:
            k.correct_eigenvalues(eigen_batches)
        return k

    full = build(b1, b2, eigen_batches=[b1])
    buf = io.BytesIO()
    torch.save(full.state_dict(), buf)
    buf.seek(0)
    loaded = KFAC(model, objective=CrossEntropyObjective(shift=False))
    loaded.load_state_dict(torch.load(buf))
    v = _random_vector(full)
    for p in (-1.0, -0.25):
        a, b = full.apply(v, 1e-2, p), loaded.apply(v, 1e-2, p)
        for n in full.param_names:
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    # full minus first half == second half (factor-wise), also after the reload
    half, other = build(b1), build(b2)
    with pytest.warns(UserWarning, match="drops the EK-FAC"):
        loaded.subtract(half)
    assert float(loaded.count) == float(other.count) == 14
    for name in other.factors:
        for f0, f1 in zip(loaded.factor(name), other.factor(name)):
            torch.testing.assert_close(f0, f1, rtol=1e-9, atol=1e-10)
    a, b = loaded.apply(v, 1e-2, -1.0), other.apply(v, 1e-2, -1.0)
    for n in full.param_names:
        torch.testing.assert_close(a[n], b[n], rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="cannot remove"):
        build(b1).subtract(build(b1, b2))


def test_deepcopy_shares_or_copies_the_model_consistently():
    import copy

    model = _mlp()
    kfac, batch = _fitted(model)
    kfac.accumulate(batch)
    kfac.finalize()
    shared = copy.deepcopy(kfac, {id(model): model})
    assert shared.model is model and all(a.module is b.module for a, b in zip(shared.layers, kfac.layers))
    assert shared.factor("0")[0] is not kfac.factor("0")[0]
    shared.reset()
    shared.accumulate(batch)  # hooks land on the shared model's modules
    shared.finalize()
    torch.testing.assert_close(shared.factor("0")[0], kfac.factor("0")[0])
    own = copy.deepcopy(kfac)
    assert own.model is not model and own.layers[0].module is own.model.get_submodule("0")


def test_subtract_clamps_to_psd():
    model = _mlp()
    torch.manual_seed(4)
    big = {"inputs": torch.randn(8, 4, dtype=D64), "labels": torch.randint(0, 3, (8,))}
    small = {"inputs": 10 * torch.randn(4, 4, dtype=D64), "labels": torch.randint(0, 3, (4,))}
    full = KFAC(model, objective=CrossEntropyObjective(shift=False), fisher_type="empirical")
    full.accumulate(big)
    full.finalize()
    sub = KFAC(model, objective=CrossEntropyObjective(shift=False), fisher_type="empirical")
    sub.accumulate(small)
    sub.finalize()
    full.subtract(sub)  # not a subset: the raw difference is indefinite
    for name, (_, s_a, _, s_g) in full.eigen.items():
        assert (s_a >= 0).all() and (s_g >= 0).all()
        a, _ = full.factor(name)
        assert torch.linalg.eigvalsh(a).min() > -1e-9


def test_bf16_storage_is_close_to_fp32():
    model = small_causal_lm("llama")
    batch = _lm_batch(128, b=2, t=8)
    res = []
    for dtype in (None, torch.bfloat16):
        kfac = KFAC(model, fisher_type="empirical", storage_dtype=dtype)
        kfac.accumulate(batch)
        kfac.finalize()
        grad = gradient(model, kfac.objective.loss(kfac.logits(batch), batch), kfac.param_names)
        res.append((kfac, _flat(kfac, kfac.inverse(grad, 1e-2))))
    (k32, d32), (k16, d16) = res
    assert k16.eigen[k16.layers[0].name][0].dtype == torch.bfloat16
    assert k16.memory_footprint()["total"] * 2 == k32.memory_footprint()["total"]
    cos = float(d32 @ d16 / (d32.norm() * d16.norm()))
    assert cos > 0.99 and float((d32 - d16).norm() / d32.norm()) < 0.1


# ---------------------------------------------------------------------------------------------- errors
def _fitted(model=None):
    model = model if model is not None else _mlp()
    kfac = KFAC(model, objective=CrossEntropyObjective(shift=False), fisher_type="empirical")
    return kfac, {"inputs": torch.randn(4, 4, dtype=D64), "labels": torch.randint(0, 3, (4,))}


def test_errors_are_clear():
    kfac, batch = _fitted()
    v = _random_vector(kfac)
    with pytest.raises(RuntimeError, match="before finalize"):
        kfac.apply(v, 1e-3)
    kfac.accumulate(batch)
    kfac.finalize()
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        kfac.apply(v, 0.0)
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        kfac.apply(v, -1.0)
    bad = dict(v)
    bad["0.weight"] = torch.zeros(4, 5, dtype=D64)
    with pytest.raises(ValueError, match=r"vector\['0.weight'\] has shape"):
        kfac.apply(bad, 1e-3)
    ek = KFAC(_mlp(), objective=CrossEntropyObjective(shift=False), eigenvalue_correction=True)
    ek.accumulate(batch)
    ek.finalize()
    with pytest.raises(RuntimeError, match=r"call correct_eigenvalues\(batches\)"):
        ek.apply(v, 1e-3)
    ek.correct_eigenvalues([batch])
    assert all(torch.isfinite(t).all() for t in ek.apply(v, 1e-3).values())
    with pytest.raises(ValueError, match="fisher_type must be one of"):
        KFAC(_mlp(), fisher_type="fisher")
    with pytest.raises(ValueError, match="kfac_approx must be one of"):
        KFAC(_mlp(), kfac_approx="sum")


def test_nan_statistics_name_the_layer():
    kfac, batch = _fitted()
    batch["inputs"][0, 0] = float("nan")
    kfac.accumulate(batch)
    with pytest.raises(FloatingPointError, match="layer '0'"):
        kfac.finalize()


class _Unused(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3).to(D64)
        self.side = nn.Linear(4, 2).to(D64)
        self.mode = mode

    def forward(self, x):
        if self.mode == "forward-only":
            self.side(x)  # computed, never reaches the loss
        return self.used(x)


def test_layer_without_forward_or_backward_is_named():
    kfac, batch = _fitted(_Unused("none"))
    with pytest.raises(UserInputError, match=r"\['side'\] saw no forward.*exclude=\['\^side\$'\]"):
        kfac.accumulate(batch)
    kfac, batch = _fitted(_Unused("forward-only"))
    with pytest.raises(UserInputError, match="'side' saw a forward but no backward"):
        kfac.accumulate(batch)
    kfac = KFAC(_Unused("none"), objective=CrossEntropyObjective(shift=False), exclude="side")
    kfac.accumulate(batch)  # excluding it fixes it


def test_no_trackable_layer_and_type2_on_large_outputs():
    with pytest.raises(ValueError, match="no trackable layer"):
        KFAC(nn.Sequential(nn.Embedding(10, 4)))
    with pytest.raises(ValueError, match="no trackable layer"):
        KFAC(_mlp(), include="nothing-matches")
    model = small_causal_lm("gpt2", vocab_size=600)
    kfac = KFAC(model, fisher_type="type2")
    with pytest.raises(ValueError, match="type2.*600"):
        kfac.accumulate(_lm_batch(600, b=1, t=4))


@pytest.mark.parametrize("columns,leaf", [(1, 1), (7, 2), (129, 16), (300, 128)])
def test_symmetric_gram_equals_the_plain_product(columns, leaf):
    from lightning_unlearn.curvature.kfac_statistics import symmetric_gram

    x = torch.randn(50, columns + 3, dtype=torch.float64)[:, 3:]  # a non-contiguous view, as the layers' rows are
    gram = symmetric_gram(x, leaf)
    torch.testing.assert_close(gram, x.T @ x, rtol=1e-12, atol=1e-12)
    h = columns // 2
    assert columns <= leaf or torch.equal(gram[:h, h:], gram[h:, :h].T)  # the cross block computed once, mirrored


@pytest.mark.parametrize("kind", ["every", "shifted", "random", "none"])
def test_the_rows_at_valid_positions_are_those_of_boolean_indexing(kind):
    """K-FAC's statistics take the rows at the valid positions by slicing where the mask is every position or every
    one but the last (the causal shift on unpadded text): the same rows, in the same order, as `x[mask]`."""
    from lightning_unlearn.curvature.kfac_statistics import _rows

    g = torch.Generator().manual_seed(0)
    for shape in ((3, 5), (2, 3, 5), (4, 1)):
        x = torch.randn(*shape, 6, generator=g)
        mask = torch.ones(shape, dtype=torch.bool)
        if kind == "shifted":
            mask[..., -1] = False
        elif kind == "random":
            mask = torch.rand(shape, generator=g) > 0.5
        elif kind == "none":
            mask[:] = False
        assert torch.equal(_rows(x, mask), x[mask]), (shape, kind)


class _Branches(nn.Module):
    """Linear branches summed into the logits, each scaled by its gain: a branch's curvature is gain² times that of
    a gain of 1 (the way a norm after a layer whose output is ~0 at some position amplifies its gradient); a gain of 0
    leaves its branch no curvature at all."""

    def __init__(self, gains: tuple[float, ...]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.branches = nn.ModuleList(nn.Linear(4, 3).to(D64) for _ in gains)
        self.gains = gains

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return sum(gain * branch(inputs) for gain, branch in zip(self.gains, self.branches))


def test_one_layer_of_outsized_curvature_leaves_the_others_damping_alone():
    """Relative damping floors a block's scale so that a block with no curvature still gets a finite step; the floor
    is 1e-6 × the median block's scale. It was 1e-6 × the mean: on a tiny Gemma 3 whose padding token is a real token
    three blocks' scales reached 3e18-9e18 against a median 0.028, the floor lifted 11 of 14 blocks, their directions
    came out ~7e-12 × their gradients and the request ended with the forget loss unmoved."""
    torch.manual_seed(1)
    batch = {"inputs": torch.randn(32, 4, dtype=D64), "labels": torch.randint(0, 3, (32,))}
    model = _Branches(gains=(1.0, 1.0, 1e8, 0.0))
    kwargs = {"objective": CrossEntropyObjective(shift=False), "fisher_type": "empirical"}
    full = KFAC(model, **kwargs).fit([batch])
    alone = KFAC(model, exclude=r"^branches\.[23]$", **kwargs).fit([batch])  # without the outsized and the empty
    raw = {k: float(v) for k, v in full._damping_scales().items()}
    normal, outsized, empty = ("branches.0", "branches.1"), "branches.2", "branches.3"
    assert raw[outsized] > 1e14 * max(raw[n] for n in normal) and raw[empty] == 0
    scales = full.damping_scales()
    assert all(scales[n] == raw[n] for n in (*normal, outsized))  # each is damped on its own scale
    assert scales[empty] == 1e-6 * sorted(raw[n] for n in (*normal, outsized))[1]  # the floor: 1e-6 × the median
    assert full.uncurved_parameters() == ("branches.3.weight", "branches.3.bias")  # the Newton steps leave it still
    grad = gradient(model, full.objective.loss(full.logits(batch), batch), full.param_names)
    mine, reference = full.inverse(grad, 0.1, mode="relative"), alone.inverse(
        {n: grad[n] for n in alone.param_names}, 0.1, mode="relative")
    for name in alone.param_names:  # K-FAC's blocks are per layer, so the normal layers' directions are unchanged
        torch.testing.assert_close(mine[name], reference[name], rtol=1e-10, atol=0)
    assert all(float(mine[n].norm()) > 1e-3 * float(grad[n].norm()) for n in alone.param_names)
    assert all(torch.isfinite(v).all() for v in mine.values())


class _SideCall(_Branches):
    """`_Branches` whose first branch also runs on an identity matrix, its output detached (DoRA measures the norm of
    its adapted weight so); with `dead`, the second branch runs only that way."""

    def __init__(self, gains: tuple[float, ...], dead: bool = False) -> None:
        super().__init__(gains)
        self.dead = dead

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.branches[0](torch.eye(4, dtype=D64)).detach()
        if self.dead:
            self.branches[1](torch.eye(4, dtype=D64)).detach()
            return self.branches[0](inputs)
        return super().forward(inputs)


def test_a_call_whose_output_does_not_reach_the_loss_adds_nothing():
    """A layer called once more on something that never reaches the loss (DoRA's detached identity pass) has the
    statistics of its other calls; it was refused ("saw a forward but no backward"), so K-FAC could not run on DoRA
    adapters. A layer none of whose calls reaches the loss is still refused, naming the fix."""
    torch.manual_seed(1)
    batch = {"inputs": torch.randn(32, 4, dtype=D64), "labels": torch.randint(0, 3, (32,))}
    kwargs = {"objective": CrossEntropyObjective(shift=False), "fisher_type": "empirical"}
    plain, side = _Branches(gains=(1.0, 2.0)), _SideCall(gains=(1.0, 2.0))
    side.load_state_dict(plain.state_dict())
    expected, got = KFAC(plain, **kwargs).fit([batch]), KFAC(side, **kwargs).fit([batch])
    for name in ("branches.0", "branches.1"):
        for a, b in zip(expected.factor(name), got.factor(name)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert got.factor_counts["branches.0"] == 32
    with pytest.raises(UserInputError, match=r"branches\.1.*saw a forward but no backward.*exclude"):
        KFAC(_SideCall(gains=(1.0, 2.0), dead=True), **kwargs).fit([batch])
