"""How much the default request's outcome depends on the exact weights it starts from: the demo's canary request
on copies of the original model perturbed far below any change a user would notice, and on its bfloat16 cast.

    python -m benchmarks.perturbation                         # ~10 min on 2 cores from cached models
    python -m benchmarks.perturbation --method-kwargs '{"stall_ratio": 0.25}' --out DIR   # one knob changed
    python -m benchmarks.perturbation --config '{"arch": "llama"}' --out DIR   # another model: trains its own first

Each draw `k` of scale `s` adds `s · |θ| · z` to every weight (z standard normal, seeded by `k`): at s = 1e-4 the
perturbed original's test perplexity moves by far less than 0.1 %, a smaller change than casting it to bfloat16
(about 4e-3 relative per weight). Draw 0 is the original itself; `bfloat16` runs the request on the cast model (its
weights and its arithmetic). Every row is the default request (`demo.DEFAULT_SETTINGS`) with the experiment's forget,
holdout, curvature and held retain batches, evaluated as `benchmarks.canary_default` evaluates it (exposure, MIA AUC,
test perplexity against the same start's own perplexity).

A request whose utility depends on the draw is a recipe whose benchmark numbers are one sample: the summary gives,
per scale, the median, the spread and the worst draw of Δ test perplexity, MIA AUC and the exposure gap to the
retrained model, and how many draws meet the canary bars (MIA AUC ≤ 0.55, Δ test perplexity ≤ 1 %).

Writes `<out>/results.json` (numbers only) and `<out>/perturbation.md`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: the canary bars of the default recipe (README): MIA AUC and Δ test perplexity (%)
MIA_BAR, DPPL_BAR = 0.55, 1.0


def perturbed(model: nn.Module, scale: float, draw: int) -> nn.Module:
    """A copy of `model` with `scale · |θ| · z` added to every floating-point weight (z ~ N(0, 1) from a generator
    seeded by `draw`); draw 0 or scale 0 gives an unchanged copy. The model itself is not modified."""
    out = copy.deepcopy(model)
    if scale == 0 or draw == 0:
        return out
    gen = torch.Generator().manual_seed(int(draw))
    with torch.no_grad():
        for p in out.parameters():
            if p.is_floating_point():
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device)
                p.add_((noise * scale * p.detach().float().abs()).to(p.dtype))
    return out


def experiment(cache: str, config_changes: dict[str, Any]) -> Any:
    """The demo's canary experiment (seed 0) with `config_changes` (fields of `ExperimentConfig`), cached under
    `<cache>/canaries` as `benchmarks.canary_default` caches it."""
    from benchmarks.frontier_bench import make_experiment
    from lightning_unlearn.experiment import ExperimentConfig

    return make_experiment("canaries", dataclasses.replace(ExperimentConfig(), **config_changes), cache)


def references(exp: Any) -> dict[str, float]:
    """What every draw is compared with, evaluated once: the original's test perplexity and the retrained model's
    exposure."""
    original, retrained = exp.train("full").eval(), exp.train("retain").eval()
    return {"original_perplexity": float(exp.evaluate(original, reference=retrained)["test/perplexity"]),
            "retrain_exposure": float(exp.evaluate(retrained, reference=retrained)["exposure/mean"])}


def draw_row(case: tuple[str, float, int], cache: str, method_kwargs: dict[str, Any],
             config_changes: dict[str, Any], reference: dict[str, float]) -> dict[str, Any]:
    """One request: `case` = (kind, scale, draw), kind "perturbed" or "bfloat16", against `reference`
    (`references`); one torch thread (two run side by side; the models are trained beforehand, by `main`)."""
    torch.set_num_threads(1)
    from benchmarks.frontier_bench import privacy_row
    from lightning_unlearn.demo import DEFAULT_SETTINGS, quiet_libraries
    from lightning_unlearn.request import serve_request

    quiet_libraries()
    kind, scale, draw = case
    exp = experiment(cache, config_changes)
    original, retrained = exp.train("full").eval(), exp.train("retain").eval()
    start = original.to(torch.bfloat16) if kind == "bfloat16" else perturbed(original, scale, draw)
    before = exp.evaluate(start, reference=retrained)
    ppl = float(before["test/perplexity"])
    model = copy.deepcopy(start)
    settings = dataclasses.replace(DEFAULT_SETTINGS, method_kwargs=dict(method_kwargs))
    result = serve_request(model, exp.forget_batches(), exp.retain_batches(settings.curvature_batches),
                           exp.holdout_batches(), settings=settings, held_retain=exp.held_retain_batch())
    after = privacy_row("canaries", exp.evaluate(model, reference=retrained), ppl)
    s = result.summary
    return {"kind": kind, "scale": scale, "draw": draw, "start_perplexity": ppl,
            "original_dppl_percent": 100.0 * (ppl / reference["original_perplexity"] - 1.0),
            "dppl_percent": after["dppl_percent"], "mia_auc": after["mia_auc"],
            "exposure_gap_bits": after["exposure"] - reference["retrain_exposure"], "status": s["status"],
            "steps_accepted": s["steps_accepted"], "forget_score_after": s["forget_score_after"],
            "step_lengths": [r.scale for r in result if r.accepted]}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per group (`kind` and `scale`): the draws, their statuses, the median, quartiles and worst of Δ test
    perplexity, MIA AUC and the exposure gap, and how many draws meet the canary bars."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault("bfloat16" if r["kind"] == "bfloat16" else f"scale {r['scale']:g}", []).append(r)
    out: dict[str, Any] = {}
    for name, rs in groups.items():
        entry: dict[str, Any] = {"draws": [r["draw"] for r in rs], "status": [r["status"] for r in rs],
                                 "meets_bars": sum(r["mia_auc"] <= MIA_BAR and r["dppl_percent"] <= DPPL_BAR
                                                   for r in rs)}
        for key in ("dppl_percent", "mia_auc", "exposure_gap_bits"):
            vals = sorted(float(r[key]) for r in rs)
            q = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else [vals[0]] * 3
            entry[key] = {"median": statistics.median(vals), "q1": q[0], "q3": q[2], "min": vals[0],
                          "max": vals[-1], "per_draw": [float(r[key]) for r in rs]}
        out[name] = entry
    return out


def markdown(summary: dict[str, Any], method_kwargs: dict[str, Any], config: dict[str, Any] | None = None
             ) -> list[str]:
    knob = f" with `{json.dumps(method_kwargs)}`" if method_kwargs else ""
    model = f", `{json.dumps(config)}`" if config else ""
    lines = [f"# The default request{knob} from perturbed starts (the demo's canaries, seed 0{model})", "",
             "| start | draws | statuses | Δ test perplexity %: median [q1, q3], worst | MIA AUC: median, worst | "
             "exposure gap (bits): median | draws meeting both bars |", "|---|---|---|---|---|---|---|"]
    for name, e in summary.items():
        statuses = ", ".join(f"{e['status'].count(s)} {s}" for s in sorted(set(e["status"])))
        d, m = e["dppl_percent"], e["mia_auc"]
        lines.append(f"| {name} | {len(e['draws'])} | {statuses} | {d['median']:+.2f} [{d['q1']:+.2f}, "
                     f"{d['q3']:+.2f}], {d['max']:+.2f} | {m['median']:.3f}, {m['max']:.3f} | "
                     f"{e['exposure_gap_bits']['median']:+.2f} | {e['meets_bars']} of {len(e['draws'])} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="runs/benchmarks")
    parser.add_argument("--scales", type=float, nargs="*", default=[1e-4, 1e-3])
    parser.add_argument("--draws", type=int, default=8, help="perturbed draws per scale (1..N; draw 0 is added)")
    parser.add_argument("--out", default="benchmarks/results/perturbation")
    parser.add_argument("--method-kwargs", type=json.loads, default={},
                        help='one knob changed from the default, as JSON (e.g. \'{"stall_ratio": 0.25}\')')
    parser.add_argument("--config", type=json.loads, default={},
                        help='ExperimentConfig fields changed, as JSON (e.g. \'{"arch": "llama"}\')')
    args = parser.parse_args(argv)
    from lightning_unlearn.demo import quiet_libraries

    quiet_libraries()
    exp = experiment(args.cache, args.config)
    reference = references(exp)  # the models trained (or loaded) once, before the workers load them
    cases = [("perturbed", 0.0, 0)] + [("perturbed", s, k) for s in args.scales for k in range(1, args.draws + 1)]
    cases.append(("bfloat16", 0.0, 0))
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        rows = list(pool.map(draw_row, cases, [args.cache] * len(cases), [args.method_kwargs] * len(cases),
                             [args.config] * len(cases), [reference] * len(cases)))
    summary = summarize(rows)
    results = {"summary": summary, "method_kwargs": args.method_kwargs, "config": args.config, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks.run import secrets_of
    from lightning_unlearn.report import atomic_write

    secrets = secrets_of(exp)
    table = "\n".join(markdown(summary, args.method_kwargs, args.config)) + "\n"
    atomic_write(out / "results.json", json.dumps(results, indent=1, default=float).encode(), secrets)
    atomic_write(out / "perturbation.md", table.encode(), secrets)
    print(table)


if __name__ == "__main__":
    main()
