"""The protected Newton step's constraints rotated as factors (`curvature/carried.py`) against as matrices: per
protected solve (`KFAC.constrained_inverse`) and per computation of the 8 holdout groups' gradients, one thread, on
the demo's canaries and on the request-scaling benchmark's briefly trained GPT-2 models. The matrices are the same
gradients with their factors dropped (`dict(h)`), which is what K-FAC received before the factors existed.

    python -m benchmarks.factored_constraints [--demo-cache runs/demo_cache] [--repeats 5]

Writes `benchmarks/results/factored_constraints/factored_constraints.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.presets import PRESETS
from benchmarks.request_cost import scaling_data, train_briefly
from lightning_unlearn.methods import build_unlearner
from lightning_unlearn.methods.group_gradients import grouped_nll_gradients
from lightning_unlearn.models import small_causal_lm


def milliseconds(fn: Callable[[], Any], repeats: int) -> float:
    """The median of `repeats` timed calls, after one untimed."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(name: str, model: torch.nn.Module, curvature_batches: list, holdout: list, forget: list,
            repeats: int) -> dict[str, Any]:
    u = build_unlearner("newton", model)
    u.fit_curvature(curvature_batches)
    dtypes = {n: p.dtype for n, p in u.named_params().items()}
    factored = u.group_gradients(holdout, 8)
    plain = [dict(h) for h in factored]
    gradient = u.forget_gradient(forget)
    got, want = (torch.cat([t.flatten() for t in u.protected_direction(gradient, hs).values()])
                 for hs in (factored, plain))

    def solve(hs: list) -> Callable[[], Any]:
        return lambda: u.curvature.constrained_inverse(gradient, hs, 1e-3, mode="relative")

    return {
        "model": name, "params": sum(p.numel() for p in model.parameters()),
        "factored_layers": sorted({layer for h in factored for layer in getattr(h, "factors", {})}),
        "layers": len(u.curvature.layers),
        "solve_ms_matrices": milliseconds(solve(plain), repeats),
        "solve_ms_factors": milliseconds(solve(factored), repeats),
        "group_gradients_ms_matrices": milliseconds(  # a reduce that is not the identity: no factors kept
            lambda: grouped_nll_gradients(model, u.curvature.layers, holdout, 8, lambda t: t, dtypes), repeats),
        "group_gradients_ms_factors": milliseconds(lambda: u.group_gradients(holdout, 8), repeats),
        "direction_relative_difference": float((got - want).norm() / want.norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-cache", default="runs/demo_cache")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/factored_constraints")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    rows = []
    from lightning_unlearn.experiment import Experiment, ExperimentConfig

    exp = Experiment(ExperimentConfig(), args.demo_cache, progress=False)
    rows.append(measure("demo (canaries)", exp.train("full").eval(), exp.retain_batches(8), exp.holdout_batches(),
                        exp.forget_batches(), args.repeats))
    p = PRESETS["cpu-small"]
    data = scaling_data(max(p.scaling_forget), p.scaling_batches, p.scaling_batch_size, p.scaling_seq_len,
                        p.scaling_vocab)
    for hidden, layers in p.scaling_sizes:
        model = small_causal_lm("gpt2", vocab_size=p.scaling_vocab, hidden=hidden, layers=layers,
                                heads=max(1, hidden // 32), max_positions=p.scaling_seq_len, seed=0)
        rows.append(measure(f"scaling {hidden}x{layers}", train_briefly(model, data, p.scaling_train_epochs),
                            data.retain, data.holdout, data.forget(8), args.repeats))
    for r in rows:
        print({k: (round(v, 1) if isinstance(v, float) and k.endswith("ms_matrices") or k.endswith("ms_factors")
                   else v) for k, v in r.items() if k != "factored_layers"}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "factored_constraints.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Protection constraints as factors or as matrices (one thread, median of "
             f"{args.repeats} calls)", "",
             "| model | params | layers with factors | protected solve ms: matrices → factors | 8 group gradients ms: "
             "matrices → factors | direction's relative difference |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['params'] / 1e6:.2f}M | {len(r['factored_layers'])} of {r['layers']} | "
              f"{r['solve_ms_matrices']:.0f} → {r['solve_ms_factors']:.0f} | {r['group_gradients_ms_matrices']:.0f} → "
              f"{r['group_gradients_ms_factors']:.0f} | {r['direction_relative_difference']:.1e} |" for r in rows]
    (out / "factored_constraints.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
