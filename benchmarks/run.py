"""Every unlearning method against retraining: privacy, utility, time, memory, scaling.

    python -m benchmarks.run                    # preset cpu-small (default), ~30 min on 2 cores incl. training
    python -m benchmarks.run --preset smoke     # tiny, a few tens of seconds (CI)
    python -m benchmarks.run --preset gpu       # GPT-2-small shapes (documented; see benchmarks/README.md)

A run trains (or loads from `--cache`) the original model with canaries and the retrained gold standard without
the forget set, runs every method of the preset's sweep on a copy of the original, evaluates every metric with the
retrained model as the reference (KS forget quality, privleak), and writes `benchmarks/results/<preset>/`:
`results.json` ({"methods": [rows], ...}), `results.md` and PNG plots. Files are written atomically and checked
for canary secrets and forget texts (`report.atomic_write`); rows hold numbers and settings only.

Definitions (also in results.md):
- `time_over_fwd_bwd`: unlearn_seconds / the seconds of one forward+backward pass over the forget set plus the
  method's curvature batches (none for first-order methods), fastest of 3, measured in the same process just
  before the run.
- `time_over_retrain`: unlearn_seconds / the seconds it took to train the retrained model.
- forgotten ("level"): mean inserted-canary exposure within `level_bits` (1 bit) of the retrained model's.
- time to forget: per method, the smallest unlearn_seconds of a setting that reached the level, else "not reached".

The parts: `sweep` (the method rows, time to forget, targets), `measure` (time and memory), `scaling` (curvature
cost against model and forget-set size, K-FAC memory), `plots`, `results_markdown` (results.md and the writing);
the frontier presets run `frontier_bench`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.plots import plot_frontier, plot_scaling, plot_time_to_forget
from benchmarks.presets import PRESETS, Preset
from benchmarks.request_cost import plot_request_scaling
from benchmarks.results_markdown import markdown, markdown_memory_scaling, write_results
from benchmarks.scaling import gpt2_small_kfac_memory, scaling, scaling_part
from benchmarks.sweep import method_rows, targets, time_to_forget
from lightning_unlearn.experiment import Experiment

ROOT = Path(__file__).resolve().parent


def secrets_of(exp: Experiment) -> list[bytes]:
    reg = exp.registry
    texts = [c.secret for c in reg.inserted + reg.references] + [c.text for c in reg.inserted + reg.references]
    return [t.encode("utf-8") for t in texts if t]


def run_benchmark(preset_name: str = "cpu-small", output: str | Path | None = None,
                  cache: str | Path = "runs/benchmarks", *, progress: bool = True,
                  do_scaling: bool = True, scaling_only: bool = False, reuse_scaling: bool = False,
                  workers: int = 2, resume: bool = False,
                  kinds: Sequence[str] = ("canaries", "qa")) -> dict[str, Any]:
    """Run a preset end to end and write its results; returns the results dict. `kinds`: the frontier presets'
    benchmarks to run (canaries, qa).

    `scaling_only`: measure the GPT-2-small K-FAC memory and the scaling curves only, into `scaling.json` (no model is
    trained); `reuse_scaling`: take them from that file instead of measuring them again (so that the two parts can run
    at the same time)."""
    from lightning_unlearn.demo import quiet_libraries
    from lightning_unlearn.report import atomic_write, json_safe

    preset = PRESETS[preset_name]
    output = Path(output) if output is not None else ROOT / "results" / preset_name
    start = time.perf_counter()
    quiet_libraries()

    def say(msg: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    if scaling_only:
        part = {"preset": preset_name, "gpt2_small_kfac_memory": gpt2_small_kfac_memory(preset, say),
                "scaling": scaling(preset, say), "environment": {"torch_threads": torch.get_num_threads()}}
        part["seconds"] = time.perf_counter() - start
        output.mkdir(parents=True, exist_ok=True)
        atomic_write(output / "scaling.json", json.dumps(json_safe(part), indent=1).encode(), [])
        plots = {"scaling.png": plot_scaling(part["scaling"]),
                 "request_scaling.png": plot_request_scaling(part["scaling"]["request"])}
        for name, data in plots.items():
            atomic_write(output / name, data, [])
        shown = {**part, "scaling_source": "this run (--scaling-only)", "plots": list(plots)}
        md = "\n".join([f"# Scaling: preset {preset_name}, {part['seconds']:.0f} s", "",
                        *markdown_memory_scaling(shown)]) + "\n"
        atomic_write(output / "scaling.md", md.encode(), [])
        say(f"wrote {output / 'scaling.json'}, scaling.md and its plots in {part['seconds']:.0f} s")
        return part
    if preset.frontier:
        return frontier_benchmark(preset, output, cache, say, start, reuse_scaling=reuse_scaling,
                                  do_scaling=do_scaling, workers=workers, resume=resume, kinds=kinds)
    exp = Experiment(preset.experiment, cache, progress=False)
    say(f"preset {preset_name}: training or loading the original and retrained models (cache {exp.cache})")
    secrets = secrets_of(exp)
    output.mkdir(parents=True, exist_ok=True)
    partial = output / "results.partial.json"

    def on_row(rows: list[dict]) -> None:  # rows so far, in case the run is interrupted
        atomic_write(partial, json.dumps(json_safe({"preset": preset_name, "methods": rows}), indent=1).encode(),
                      secrets)

    rows, context = method_rows(exp, preset, say, on_row)
    ttf = time_to_forget(rows, context["level_exposure"])
    scaling_source = "this run"
    if reuse_scaling and (output / "scaling.json").exists():
        part = json.loads((output / "scaling.json").read_text())
        gpt2, scale = part["gpt2_small_kfac_memory"], part["scaling"]
        scaling_source = f"scaling.json (--scaling-only, {part['seconds']:.0f} s, run alongside)"
    else:
        gpt2 = gpt2_small_kfac_memory(preset, say)
        scale = scaling(preset, say) if do_scaling else {"model_size": [], "forget_size": []}
    command = "python -m benchmarks.run" + ("" if preset_name == "cpu-small" else f" --preset {preset_name}")
    result = {
        "preset": preset_name, "description": preset.description, "command": command,
        "experiment": dataclasses.asdict(preset.experiment), "context": context, "methods": rows,
        "time_to_forget": ttf, "gpt2_small_kfac_memory": gpt2, "scaling": scale, "scaling_source": scaling_source,
        "targets": targets(rows, ttf, gpt2),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }
    result["runtime_seconds"] = time.perf_counter() - start
    plots = {"privacy_utility.png": plot_frontier(rows, context),
             "time_to_forget.png": plot_time_to_forget(ttf, context)}
    if do_scaling:
        plots["scaling.png"] = plot_scaling(scale)
    if scale.get("request"):
        plots["request_scaling.png"] = plot_request_scaling(scale["request"])
    result["plots"] = list(plots)
    write_results(output, result, plots, markdown(result), secrets)
    partial.unlink(missing_ok=True)
    say(f"wrote {output} in {result['runtime_seconds']:.0f} s")
    return result


def frontier_benchmark(preset: Preset, output: Path, cache: str | Path, say: Callable[[str], None], start: float,
                       *, reuse_scaling: bool, do_scaling: bool, workers: int, resume: bool = False,
                       kinds: Sequence[str] = ("canaries", "qa")) -> dict[str, Any]:
    """The frontier presets: every method's curve on canaries and QA over the preset's seeds (see
    `benchmarks/frontier_bench.py`), the default recipe and its targets, plus K-FAC memory and scaling."""
    from benchmarks import frontier_bench

    every = {"canaries": [dataclasses.replace(preset.experiment, seed=s) for s in preset.seeds],
             "qa": [dataclasses.replace(preset.qa, seed=s) for s in preset.seeds]}
    configs = {kind: every[kind] for kind in kinds}
    say(f"preset {preset.name}: {len(preset.seeds)} seeds x ({', '.join(configs)}), {workers} worker(s); "
        f"cache {cache}")
    fr = frontier_bench.run_frontier(configs, str(cache), small=preset.name == "smoke", workers=workers, say=say,
                                     resume=resume)
    gpt2, scale, scaling_source = scaling_part(preset, output, say, reuse_scaling, do_scaling)
    command = ("python -m benchmarks.run" + ("" if preset.name == "cpu-small" else f" --preset {preset.name}")
               + ("" if set(kinds) == {"canaries", "qa"} else f" --benchmarks {' '.join(kinds)}"))
    analysis = fr["analysis"]
    result = {
        "preset": preset.name, "description": preset.description, "command": command, "seeds": list(preset.seeds),
        "default_recipe": {kind: a["default_recipe"] for kind, a in analysis.items()},
        "frontier_wins": {kind: a["frontier_wins"] for kind, a in analysis.items()},
        "targets": {kind: a["targets"] for kind, a in analysis.items()},
        "frontier": {kind: {k: v for k, v in a.items() if k not in ("default_recipe", "frontier_wins", "targets")}
                     for kind, a in analysis.items()},
        "rows": fr["rows"],
        "experiments": {kind: [dataclasses.asdict(c) for c in cfgs] for kind, cfgs in configs.items()},
        "gpt2_small_kfac_memory": gpt2, "scaling": scale, "scaling_source": scaling_source,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu_count": os.cpu_count(), "workers": workers,
                        "torch_threads_per_worker": 1 if workers > 1 else torch.get_num_threads()},
    }
    result["runtime_seconds"] = time.perf_counter() - start
    result["resumed"] = resume  # runtime_seconds is then the writing's, not the measuring's
    plots = dict(fr["plots"])
    if scale["model_size"]:
        plots["scaling.png"] = plot_scaling(scale)
    if scale.get("request"):
        plots["request_scaling.png"] = plot_request_scaling(scale["request"])
    result["plots"] = list(plots)
    secrets = []
    for cfg in configs.get("canaries", ()):
        secrets += secrets_of(Experiment(cfg, Path(cache) / "canaries", progress=False))
    took = (f"{result['runtime_seconds']:.0f} s on {os.cpu_count()} CPU cores, {workers} worker process(es)"
            if not resume else "written with `--resume` from the points of finished tasks cached by an earlier run, "
            "whose time this is not")
    header = [f"# Benchmark results: preset `{preset.name}`", "",
              f"{preset.description}" + ("" if set(kinds) == {"canaries", "qa"} else f" (this run: {', '.join(kinds)})")
              + f". Reproduce: `{command}` ({took}; trained models cached under `--cache`).", ""]
    md = "\n".join(header) + "\n" + frontier_bench.markdown(fr) + "\n" + "\n".join(
        markdown_memory_scaling(result)) + "\n"
    output.mkdir(parents=True, exist_ok=True)
    write_results(output, result, plots, md, secrets)
    say(f"wrote {output} in {result['runtime_seconds']:.0f} s")
    return result


def finalize_partial(preset_name: str, output: str | Path | None = None, cache: str | Path = "runs/benchmarks",
                     ) -> dict[str, Any]:
    """Write results.json/md and plots from `results.partial.json` (+ `scaling.json`) of an interrupted run: the rows
    measured so far, marked as partial. Nothing is re-measured."""

    preset = PRESETS[preset_name]
    output = Path(output) if output is not None else ROOT / "results" / preset_name
    rows = json.loads((output / "results.partial.json").read_text())["methods"]
    part = json.loads((output / "scaling.json").read_text())
    gpt2, scale = part["gpt2_small_kfac_memory"], part["scaling"]
    retrain = next(r for r in rows if r["method"] == "retrain")
    runs = [r for r in rows if r["method"] not in ("original", "retrain")]
    target = next((r["hyperparameters"]["forget_target"] for r in runs if r["hyperparameters"].get("forget_target")),
                  float("nan"))
    same = next((r["unlearn_seconds"] / r["time_over_retrain_same_process"] for r in runs), float("nan"))
    level = retrain["exposure_inserted"] + preset.level_bits
    context = {"retrain_seconds": retrain["unlearn_seconds"], "retrain_same_process_seconds": same,
               "forget_target_nll": target, "level_bits": preset.level_bits, "level_exposure": level,
               "retrain_exposure": retrain["exposure_inserted"]}
    ttf = time_to_forget(rows, level)
    exp = Experiment(preset.experiment, cache, progress=False)
    result = {
        "preset": preset_name, "command": "python -m benchmarks.run" + (
            "" if preset_name == "cpu-small" else f" --preset {preset_name}"),
        "description": f"{preset.description}. PARTIAL: {len(runs)} of {len(preset.runs)} runs of the sweep were "
                       "measured before the run was stopped (the time budget); the missing ones are not in the tables",
        "experiment": dataclasses.asdict(preset.experiment), "context": context, "methods": rows,
        "time_to_forget": ttf, "gpt2_small_kfac_memory": gpt2, "scaling": scale,
        "scaling_source": f"scaling.json (--scaling-only, {part['seconds']:.0f} s, run alongside)",
        "targets": targets(rows, ttf, gpt2), "partial": {"measured_runs": len(runs), "planned_runs": len(preset.runs)},
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads()},
        "runtime_seconds": float("nan"),
    }
    secrets = secrets_of(exp)
    plots = {"privacy_utility.png": plot_frontier(rows, context),
             "time_to_forget.png": plot_time_to_forget(ttf, context), "scaling.png": plot_scaling(scale)}
    result["plots"] = list(plots)
    write_results(output, result, plots, markdown(result), secrets)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--output", default=None, help="default: benchmarks/results/<preset>")
    parser.add_argument("--cache", default="runs/benchmarks", help="trained models are cached here (per config)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling curves")
    parser.add_argument("--scaling-only", action="store_true",
                        help="measure the K-FAC GPT-2-small memory and the scaling curves only, into scaling.json")
    parser.add_argument("--reuse-scaling", action="store_true",
                        help="take the memory and scaling numbers from scaling.json (written by --scaling-only)")
    parser.add_argument("--workers", type=int, default=2,
                        help="processes for the frontier presets (1 torch thread each when > 1)")
    parser.add_argument("--resume", action="store_true",
                        help="frontier presets: take the points of finished (benchmark, seed) tasks from the cache")
    parser.add_argument("--benchmarks", nargs="+", choices=("canaries", "qa"), default=("canaries", "qa"),
                        help="frontier presets: the benchmarks to run (default both)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    run_benchmark(args.preset, args.output, args.cache, progress=not args.quiet, do_scaling=not args.no_scaling,
                  scaling_only=args.scaling_only, reuse_scaling=args.reuse_scaling, workers=args.workers,
                  resume=args.resume, kinds=args.benchmarks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
