"""How the curvatures' time and memory grow with the model and the forget set, and K-FAC's memory on GPT-2-small
shapes (the scaling and memory sections of `benchmarks.run`'s results)."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import PeakRSS, param_bytes
from benchmarks.passes import fwd_bwd_seconds
from benchmarks.presets import Preset
from benchmarks.request_cost import request_scaling


def _random_batches(n: int, batch_size: int, seq_len: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (batch_size, seq_len), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _curvature_kwargs(backend: str) -> dict:
    return {"max_iter": 10} if backend == "cg" else {}


def time_curvature(model: torch.nn.Module, backend: str, batches: list[dict], forget: list[dict],
                   damping: float = 1.0) -> dict[str, float]:
    """Seconds to accumulate+finalize on `batches` (fit) and to apply `(C + λI)^-1` to the forget gradient (solve),
    and the curvature's `memory_footprint()['total']`."""
    from lightning_unlearn.methods import build_curvature

    torch.manual_seed(0)
    curv = build_curvature(backend, model, **_curvature_kwargs(backend))
    with PeakRSS() as mem, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CG's "not converged after max_iter": a fixed budget here, by design
        start = time.perf_counter()
        for b in batches:
            curv.accumulate(b)
        curv.finalize()
        fit = time.perf_counter() - start
    g = _forget_gradient(model, forget, curv.param_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        curv.apply(g, damping, -1.0)
        solve = time.perf_counter() - start
    total = curv.memory_footprint()["total"]
    return {"fit_seconds": fit, "solve_seconds": solve, "seconds": fit + solve, "memory_mb": total / 2**20,
            "memory_over_params": total / param_bytes(model, curv.param_names), "peak_rss_delta_mb": mem.delta_mb}


def _forget_gradient(model: torch.nn.Module, forget: list[dict], names: Sequence[str]) -> dict[str, torch.Tensor]:
    from lightning_unlearn.methods.losses import mean_nll

    named = dict(model.named_parameters())
    plist = [named[n] for n in names]
    grads = [torch.zeros_like(p) for p in plist]
    for b in forget:
        s, n = mean_nll(model, b)
        for acc, gr in zip(grads, torch.autograd.grad(s / max(n, 1), plist)):
            acc += gr / len(forget)
    return dict(zip(names, grads))


def scaling(preset: Preset, say: Callable[[str], None]) -> dict[str, Any]:
    """Curvature time and memory of K-FAC, CG, Woodbury and diagonal against model size and forget-set size, and the
    default request's time against both (`request`: `benchmarks.request_cost.request_scaling`)."""
    from lightning_unlearn.models import small_causal_lm

    backends = ("kfac", "cg", "woodfisher", "diagonal")
    p = preset
    by_model, by_forget = [], []
    for hidden, layers in p.scaling_sizes:
        model = small_causal_lm("gpt2", vocab_size=p.scaling_vocab, hidden=hidden, layers=layers,
                                heads=max(1, hidden // 32), max_positions=p.scaling_seq_len, seed=0)
        batches = _random_batches(p.scaling_batches, p.scaling_batch_size, p.scaling_seq_len, p.scaling_vocab, 1)
        forget = _random_batches(1, p.scaling_batch_size, p.scaling_seq_len, p.scaling_vocab, 2)
        n_params = sum(q.numel() for q in model.parameters())
        fb = fwd_bwd_seconds(model, batches + forget)
        for backend in backends:
            r = time_curvature(model, backend, batches, forget)
            by_model.append({"backend": backend, "hidden": hidden, "layers": layers, "params": n_params,
                             "fwd_bwd_seconds": fb, **r})
        say(f"scaling: {hidden}x{layers} ({n_params / 1e6:.2f}M params) done")
    hidden, layers = p.scaling_forget_model
    model = small_causal_lm("gpt2", vocab_size=p.scaling_vocab, hidden=hidden, layers=layers,
                            heads=max(1, hidden // 32), max_positions=p.scaling_seq_len, seed=0)
    for n_forget in p.scaling_forget:
        bs = min(p.scaling_batch_size, n_forget)
        forget = _random_batches(max(1, n_forget // bs), bs, p.scaling_seq_len, p.scaling_vocab, 3)
        for backend in backends:
            # curvature_data="forget": the curvature is fitted on the forget set itself
            r = time_curvature(model, backend, forget, forget)
            by_forget.append({"backend": backend, "n_forget": n_forget, "hidden": hidden, "layers": layers, **r})
        say(f"scaling: forget set of {n_forget} sequences done")
    return {"model_size": by_model, "forget_size": by_forget, "request": request_scaling(preset, say)}


def gpt2_small_kfac_memory(preset: Preset, say: Callable[[str], None]) -> dict[str, Any]:
    """K-FAC state over parameter memory on GPT-2-small shapes (embeddings and head skipped).

    Exact from the shapes of the 12 blocks (factors A [in+1]^2 and G out^2, their eigenvectors and eigenvalues),
    checked against a real `KFAC.memory_footprint()` of one accumulated block at `gpt2_measure_hidden` width, in
    fp32 and in bf16 storage. "as implemented" keeps the factors (for `subtract` and checkpoints) next to the
    eigenbasis; "eigenbasis only" is what `apply` needs.
    """
    from lightning_unlearn.curvature.kfac import KFAC
    from lightning_unlearn.models import small_causal_lm

    def shapes(hidden: int, blocks: int) -> list[tuple[int, int, bool]]:
        per_block = [(hidden, 3 * hidden), (hidden, hidden), (hidden, 4 * hidden), (4 * hidden, hidden)]
        return [(i, o, True) for _ in range(blocks) for i, o in per_block]

    def formula(layer_shapes: list[tuple[int, int, bool]], elem: int) -> dict[str, float]:
        params = sum(i * o + o * b for i, o, b in layer_shapes) * 4  # fp32 parameters
        factors = sum((i + b) ** 2 + o**2 for i, o, b in layer_shapes)
        eigvals = sum((i + b) + o for i, o, b in layer_shapes)
        return {"as_implemented": (2 * factors + eigvals) * elem / params, "eigenbasis_only":
                (factors + eigvals) * elem / params, "params_bytes": params}

    out: dict[str, Any] = {"shape": "GPT-2 small: 768 wide, 12 blocks, c_attn/c_proj/c_fc/mlp.c_proj"}
    small = shapes(768, 12)
    out["fp32"] = formula(small, 4)
    out["bf16"] = formula(small, 2)
    out["params_tracked"] = sum(i * o + o for i, o, _ in small)
    # check the formula against the real footprint of one block at the measured width
    h = preset.gpt2_measure_hidden
    model = small_causal_lm("gpt2", vocab_size=1024, hidden=h, layers=1, heads=max(1, h // 64), max_positions=64)
    batch = _random_batches(1, 2, 32, 1024, 0)[0]
    measured = {}
    start = time.perf_counter()
    for name, dtype, elem in (("fp32", None, 4), ("bf16", torch.bfloat16, 2)):
        kfac = KFAC(model, storage_dtype=dtype)
        kfac.accumulate(batch)
        kfac.finalize()
        fp = kfac.memory_footprint()
        pbytes = param_bytes(model, kfac.param_names)
        measured[name] = {"as_implemented": fp["total"] / pbytes,
                          "eigenbasis_only": (fp["eigenvectors"] + fp["eigenvalues"]) / pbytes,
                          "formula_as_implemented": formula(shapes(h, 1), elem)["as_implemented"]}
        del kfac
    out["measured_one_block"] = {"hidden": h, "seconds": time.perf_counter() - start, **measured}
    say(f"GPT-2-small K-FAC memory: fp32 {out['fp32']['as_implemented']:.2f}x "
        f"(eigenbasis only {out['fp32']['eigenbasis_only']:.2f}x), bf16 {out['bf16']['as_implemented']:.2f}x")
    return out


def scaling_part(preset: Preset, output: Path, say: Callable[[str], None], reuse: bool,
                 do_scaling: bool) -> tuple[dict, dict, str]:
    """(GPT-2-small K-FAC memory, scaling curves, where they came from): measured now or taken from scaling.json."""
    if reuse and (output / "scaling.json").exists():
        part = json.loads((output / "scaling.json").read_text())
        return (part["gpt2_small_kfac_memory"], part["scaling"],
                f"scaling.json (--scaling-only, {part['seconds']:.0f} s, run separately)")
    gpt2 = gpt2_small_kfac_memory(preset, say)
    scale = scaling(preset, say) if do_scaling else {"model_size": [], "forget_size": []}
    return gpt2, scale, "this run"
