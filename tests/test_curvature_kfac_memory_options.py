"""K-FAC memory options: `keep_factors=False` (eigendecompositions only), bf16 storage and a diagonal or
block-diagonal G for wide layers, each against the dense brute force, through subtract and the checkpoint format."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_unlearn.checkpoint import load_curvature_state, save_curvature
from lightning_unlearn.curvature import KFAC, CrossEntropyObjective
from lightning_unlearn.curvature.carried import SolvedVector, quadratic_of
from lightning_unlearn.models import small_causal_lm

D64 = torch.float64


def wide_mlp(seed: int = 0) -> nn.Module:
    """Layer "0": 2 -> 8 outputs (8 > 2 × (2+1): wide); layer "2": 8 -> 4 (not wide)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 4)).to(D64)


def batch(seed: int, n: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.randn(n, 2, dtype=D64, generator=g), "labels": torch.randint(0, 4, (n,), generator=g)}


def fit(model: nn.Module, *batches: dict, **kw) -> KFAC:
    kfac = KFAC(model, objective=CrossEntropyObjective(shift=False), fisher_type="empirical", **kw)
    for b in batches:
        kfac.accumulate(b)
    return kfac.finalize()


def vector(kfac: KFAC, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = dict(kfac.model.named_parameters())
    return {n: torch.randn(params[n].shape, generator=g, dtype=D64) for n in kfac.param_names}


def close(a: dict, b: dict, **tol) -> None:
    for n in a:
        torch.testing.assert_close(a[n], b[n], **tol)


# ---------------------------------------------------------------------------------------------- keep_factors
def test_without_factors_apply_is_identical_and_factors_are_rebuilt() -> None:
    model = wide_mlp()
    kept, lean = fit(model, batch(1), batch(2)), fit(model, batch(1), batch(2), keep_factors=False)
    assert not lean.factors and lean.memory_footprint()["factors"] == 0
    assert lean.memory_footprint()["total"] < kept.memory_footprint()["total"]
    v = vector(kept)
    for power in (-1.0, -0.25, 1.0):
        close(lean.apply(v, 1e-2, power), kept.apply(v, 1e-2, power), rtol=0, atol=0)
    for layer in kept.layers:  # U diag(s) Uᵀ: the factor up to float error
        for rebuilt, stored in zip(lean.factor(layer.name), kept.factor(layer.name)):
            torch.testing.assert_close(rebuilt, stored, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("wide_layer", [None, "diagonal", "block"])
def test_subtract_without_stored_factors_equals_the_retain_curvature(wide_layer: str | None) -> None:
    model = wide_mlp()
    opts = {"wide_layer": wide_layer, "wide_block": 2}
    for keep in (True, False):
        full = fit(model, batch(1), batch(2), keep_factors=keep, **opts)
        full.subtract(fit(model, batch(1), keep_factors=keep, **opts))  # full_minus_forget
        retain = fit(model, batch(2), **opts)
        assert float(full.count) == float(retain.count)
        assert bool(full.factors) == keep
        for layer in retain.layers:
            for f0, f1 in zip(full.factor(layer.name), retain.factor(layer.name)):
                torch.testing.assert_close(f0, f1, rtol=1e-9, atol=1e-11)
        v = vector(retain)
        close(full.apply(v, 1e-2, -1.0), retain.apply(v, 1e-2, -1.0), rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="another form"):
        fit(model, batch(1), batch(2)).subtract(fit(model, batch(1), wide_layer="diagonal"))


@pytest.mark.parametrize("saved_keep", [True, False])
@pytest.mark.parametrize("loaded_keep", [True, False])
def test_state_round_trips_between_kept_and_dropped_factors(tmp_path: Path, saved_keep: bool,
                                                            loaded_keep: bool) -> None:
    model = wide_mlp()
    saved = fit(model, batch(1), batch(2), keep_factors=saved_keep, wide_layer="block", wide_block=4)
    state = saved.state_dict()
    assert ("A" in state["layers"]["0"]) == saved_keep
    path = save_curvature(saved, tmp_path / "curvature.safetensors")
    loaded = KFAC(model, objective=CrossEntropyObjective(shift=False), keep_factors=loaded_keep)
    loaded.load_state_dict(load_curvature_state(path, model=model, backend="kfac"))
    assert bool(loaded.factors) == loaded_keep and loaded.g_block == saved.g_block == {"0": 4, "2": 4}
    v = vector(saved)
    close(loaded.apply(v, 1e-2, -1.0), saved.apply(v, 1e-2, -1.0), rtol=0, atol=0)
    for layer in saved.layers:
        for f0, f1 in zip(loaded.factor(layer.name), saved.factor(layer.name)):
            torch.testing.assert_close(f0, f1, rtol=1e-10, atol=1e-12)
    again = loaded.state_dict()  # and back: what the loaded one saves, loads
    assert ("A" in again["layers"]["0"]) == loaded_keep
    other = KFAC(model, objective=CrossEntropyObjective(shift=False))
    other.load_state_dict(again)
    close(other.apply(v, 1e-2, -1.0), saved.apply(v, 1e-2, -1.0), rtol=0, atol=0)


def test_diagonal_g_in_bf16_round_trips_through_the_checkpoint_file(tmp_path: Path) -> None:
    """A diagonal G has no eigenbasis (None in the state): the safetensors format keeps it."""
    model = wide_mlp()
    saved = fit(model, batch(1), batch(2), keep_factors=False, wide_layer="diagonal", storage_dtype=torch.bfloat16)
    path = save_curvature(saved, tmp_path / "curvature.safetensors")
    state = load_curvature_state(path, model=model, backend="kfac")
    assert state["layers"]["0"]["eigen"][2] is None and state["layers"]["0"]["eigen"][0].dtype == torch.bfloat16
    loaded = KFAC(model, objective=CrossEntropyObjective(shift=False), keep_factors=False,
                  storage_dtype=torch.bfloat16)
    loaded.load_state_dict(state)
    assert loaded.g_block == {"0": 1, "2": 4}
    assert loaded.memory_footprint() == saved.memory_footprint()
    v = vector(saved)
    close(loaded.apply(v, 1e-2, -1.0), saved.apply(v, 1e-2, -1.0), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- wide layers
def dense_structured(dense: KFAC, name: str, kind: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, G with its off-structure entries zeroed) from a dense K-FAC: what a wide-layer K-FAC must hold."""
    a, g = dense.factor(name)
    if kind == "diagonal":
        return a, torch.diag(torch.diagonal(g))
    keep = torch.block_diag(*[torch.ones(block, block, dtype=D64)] * (g.shape[0] // block))
    return a, g * keep


@pytest.mark.parametrize(("kind", "block"), [("diagonal", 1), ("block", 2), ("block", 4)])
def test_wide_layer_apply_equals_dense_brute_force(kind: str, block: int) -> None:
    model = wide_mlp()
    dense = fit(model, batch(1), batch(2))
    wide = fit(model, batch(1), batch(2), wide_layer=kind, wide_block=block)
    assert wide.g_block == {"0": block, "2": 4}  # only the 2 -> 8 layer is wide
    u_g = wide.eigen["0"][2]
    assert (u_g is None) if kind == "diagonal" else tuple(u_g.shape) == (8 // block, block, block)
    lam, v = 0.05, vector(wide)
    layer = wide.layers[0]
    a, g = dense_structured(dense, "0", kind, block)
    torch.testing.assert_close(wide.factor("0")[1], g, rtol=1e-12, atol=1e-14)  # accumulated blocks = dense blocks
    torch.testing.assert_close(wide.factor("0")[0], a, rtol=1e-12, atol=1e-14)
    c = torch.kron(g, a)  # acts on the row-major flattened [out, in+1] matrix
    x = layer.to_matrix(v).reshape(-1)
    eye = torch.eye(c.shape[0], dtype=D64)
    torch.testing.assert_close(layer.to_matrix(wide.apply(v, lam, -1.0)).reshape(-1),
                               torch.linalg.solve(c + lam * eye, x), rtol=1e-9, atol=1e-11)
    s, u = torch.linalg.eigh(c)
    root = (u * (s.clamp_min(0) + lam).pow(-0.25)) @ u.T
    torch.testing.assert_close(layer.to_matrix(wide.apply(v, lam, -0.25)).reshape(-1), root @ x,
                               rtol=1e-8, atol=1e-10)
    assert wide.quadratic(v) == pytest.approx(float(x @ c @ x) + dense_rest(dense, wide, v), rel=1e-9)
    # the narrow layer is untouched: the same as the dense K-FAC
    close({n: t for n, t in wide.apply(v, lam, -1.0).items() if n.startswith("2.")},
          {n: t for n, t in dense.apply(v, lam, -1.0).items() if n.startswith("2.")}, rtol=1e-12, atol=1e-14)


def dense_rest(dense: KFAC, wide: KFAC, v: dict) -> float:
    """vᵀ C v of the layers other than "0" (dense in both)."""
    layer = dense.layers[1]
    x = layer.to_matrix(v).reshape(-1)
    a, g = dense.factor(layer.name)
    return float(x @ torch.kron(g, a) @ x)


def test_wide_layer_eigenvalue_correction_matches_brute_force() -> None:
    model = wide_mlp()
    b = batch(3, n=10)
    wide = fit(model, b, wide_layer="block", wide_block=4)
    wide.correct_eigenvalues([b])
    layer = model[0]
    rows = []
    for i in range(10):  # per-example gradients of the first layer's [out, in+1] matrix
        loss = nn.functional.cross_entropy(model(b["inputs"][i:i + 1]), b["labels"][i:i + 1])
        gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
        rows.append(torch.cat([gw, gb[:, None]], 1).reshape(-1))
    grads = torch.stack(rows)
    u_a, _, u_g, _ = wide.eigen["0"]
    q = torch.kron(torch.block_diag(*u_g.unbind(0)).contiguous(), u_a.contiguous())
    expected = torch.diagonal(q.T @ (grads.T @ grads / 10) @ q).reshape(8, 3)
    torch.testing.assert_close(wide.corrected["0"], expected, rtol=1e-9, atol=1e-12)


def test_options_are_checked() -> None:
    model = wide_mlp()
    with pytest.raises(ValueError, match="wide_layer"):
        KFAC(model, wide_layer="diag")
    with pytest.raises(ValueError, match="wide_block"):
        KFAC(model, wide_layer="block", wide_block=0)
    with pytest.raises(ValueError, match="storage_dtype"):
        KFAC(model, storage_dtype="int8")
    assert KFAC(model, storage_dtype="bf16").storage_dtype == torch.bfloat16
    # a block size that does not divide the outputs: the largest divisor below it
    assert KFAC(model, wide_layer="block", wide_block=3).g_block["0"] == 2


def test_gpt2_shapes_wide_layers_and_lean_bf16_footprint() -> None:
    """On a small GPT-2 (64 wide): c_attn and c_fc are wide; the lean options shrink the state as computed."""
    model = small_causal_lm("gpt2", vocab_size=64, hidden=64, layers=1, heads=2, max_positions=16)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    wide = KFAC(model, keep_factors=False, storage_dtype=torch.bfloat16, wide_layer="block").fit(data)
    blocks = {layer.name.split(".", 3)[-1]: wide.g_block[layer.name] for layer in wide.layers}
    assert blocks == {"attn.c_attn": 64, "attn.c_proj": 64, "mlp.c_fc": 64, "mlp.c_proj": 64}
    assert g_kinds(wide) == {"attn.c_attn": "block", "attn.c_proj": "dense", "mlp.c_fc": "block",
                             "mlp.c_proj": "dense"}
    expected = 0
    for layer in wide.layers:
        d_in, d_out, k = layer.in_features + 1, layer.out_features, wide.g_block[layer.name]
        expected += (d_in * d_in + d_in + d_out * k + d_out) * 2  # bf16 U_A, s_A, U_G blocks, s_G
    footprint = wide.memory_footprint()
    assert footprint["factors"] == 0 and footprint["total"] == expected


def g_kinds(kfac: KFAC) -> dict[str, str]:
    from lightning_unlearn.curvature.kfac import g_structure

    return {layer.name.split(".", 3)[-1]: g_structure(kfac.eigen[layer.name][2]) for layer in kfac.layers}


def test_memory_benchmark_measures_the_closed_form_and_keeps_results_md(tmp_path: Path) -> None:
    from benchmarks import kfac_memory

    result = kfac_memory.measure(blocks=1, hidden=32, say=lambda m: None)
    for row in result["rows"]:
        for storage in ("fp32", "bf16"):
            assert row[storage]["measured"] == pytest.approx(row[storage]["closed_form"], rel=1e-12)
    rows = {r["option"]: r for r in result["rows"]}
    assert rows["default: A, G and their eigendecompositions"]["fp32"]["direction_cosine"] == pytest.approx(1.0)
    (tmp_path / "results.md").write_text("# Results\n\n## K-FAC memory on GPT-2-small shapes\n\nold\n\n## Plots\n\nx\n")
    for _ in range(2):  # the section is inserted once, then replaced
        kfac_memory.write(result, tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert text.count(kfac_memory.SECTION) == 1 and "old" in text and text.index("old") < text.index(
        kfac_memory.SECTION) < text.index("## Plots")


@pytest.mark.parametrize(("kind", "block"), [(None, 0), ("diagonal", 1), ("block", 2)])
@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_apply_many_equals_apply_one_by_one(kind: str | None, block: int, mode: str) -> None:
    """The batched solve of a protected Newton step (`apply_many`) is `apply` per vector, for every form of G."""
    model = wide_mlp()
    kw = {"wide_layer": kind, "wide_block": block} if kind else {}
    kfac = fit(model, batch(1), batch(2), **kw)
    vectors = [vector(kfac, seed) for seed in (1, 2, 3)]
    for power in (-1.0, -0.25):
        many = kfac.apply_many(vectors, 0.05, power, mode=mode)
        assert len(many) == 3
        for v, got in zip(vectors, many):
            close(got, kfac.apply(v, 0.05, power, mode=mode), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("kind", "block"), [(None, 0), ("diagonal", 1), ("block", 2)])
@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_constrained_inverse_is_the_constrained_direction_of_its_solves(kind: str | None, block: int,
                                                                        mode: str) -> None:
    """K-FAC's constrained solve in the eigenbasis equals `constrained_direction` of the k + 1 solves of
    `apply_many`, and the step it gives leaves every constraint's loss in place to first order (hᵀd = 0)."""
    from lightning_unlearn.methods.protection import constrained_direction

    model = wide_mlp()
    kw = {"wide_layer": kind, "wide_block": block} if kind else {}
    kfac = fit(model, batch(1), batch(2), **kw)
    g, *hs = (vector(kfac, seed) for seed in (1, 2, 3, 4))
    solve = lambda v: kfac.apply(v, 0.05, mode=mode)  # noqa: E731
    solved = kfac.apply_many([g, *hs], 0.05, mode=mode)
    expected = constrained_direction(solved[0], hs, solve, solved=solved[1:])
    got = kfac.constrained_inverse(g, hs, 0.05, mode=mode)
    close(got, expected, rtol=1e-9, atol=1e-12)
    # its dᵀCd, summed in the eigenbasis, is the product `quadratic` computes, which the Newton step then skips
    assert isinstance(got, SolvedVector) and math.isclose(quadratic_of(kfac, got), kfac.quadratic(dict(got)),
                                                          rel_tol=1e-9)
    for h in hs:
        assert abs(sum(float((h[n] * got[n]).sum()) for n in got)) < 1e-9 * sum(float(h[n].norm() * got[n].norm())
                                                                              for n in got)
    close(kfac.constrained_inverse(g, [], 0.05, mode=mode), solved[0], rtol=1e-12, atol=1e-14)
