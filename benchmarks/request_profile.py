"""The default request's cost on the demo's canaries and on the TOFU-faithful benchmark (seed 0), per phase; and the
cached-curvature request on the canaries (`curvature_data="full_minus_forget"` with a K-FAC of the whole training
data taken beforehand, as the `CurvatureCallback` takes it during training: no retain pass at request time; its
unit is one forward+backward over the forget set alone), without and with one held retain batch for the budget.

    python -m benchmarks.request_profile [--out benchmarks/results/request_profile]

Needs the trained models: the demo's in `runs/demo_cache` (`lightning-unlearn demo --cache runs/demo_cache`) and the
TOFU benchmark's in `runs/tofu_experiment` (`python -m lightning_unlearn.tofu_build`). Writes `request_profile.json`
(seconds, `fwd_bwd_seconds`, `time_over_fwd_bwd`, `time_over_retrain`, forward/backward examples, status, the
per-phase breakdown of `benchmarks.request_cost.profiled_request`) and `request_profile.md`.
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import torch

from benchmarks.passes import fwd_bwd_seconds
from benchmarks.request_cost import breakdown_markdown, profiled_request
from lightning_unlearn.curvature.registry import build_curvature
from lightning_unlearn.experiment import Experiment, ExperimentConfig
from lightning_unlearn.settings import UnlearnSettings
from lightning_unlearn.tofu_experiment import TofuConfig, TofuExperiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/request_profile")
    parser.add_argument("--demo-cache", default="runs/demo_cache")
    parser.add_argument("--tofu-cache", default="runs/tofu_experiment")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    target = Path(args.out)
    target.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    lines: list[str] = ["# The default request's cost, per phase (one process, one thread)", ""]

    def run(name: str, model: torch.nn.Module, forget: list, retain: list | None, holdout: list, held: dict | None,
            retrain_seconds: float, settings: UnlearnSettings) -> None:
        unit = fwd_bwd_seconds(model, list(forget) + list(retain or []))
        result, cost = profiled_request(copy.deepcopy(model).eval(), forget, retain, holdout, settings=settings,
                                        held_retain=held)
        s = result.summary
        row = {"seconds": cost["seconds"], "fwd_bwd_seconds": unit, "time_over_fwd_bwd": cost["seconds"] / unit,
               "time_over_retrain": cost["seconds"] / retrain_seconds, "forward_examples": cost["forward_examples"],
               "backward_examples": cost["backward_examples"], "status": s["status"],
               "steps_accepted": s["steps_accepted"], "forget_score_after": s["forget_score_after"],
               "breakdown": cost["breakdown"]}
        out[name] = row
        unit_extra = " and the curvature batches" if retain else ""
        lines.extend([f"## {name}", "",
                      f"{row['seconds']:.1f} s = {row['time_over_fwd_bwd']:.2f} x one forward+backward over the forget "
                      f"set{unit_extra} ({unit:.2f} s); 1/{1 / row['time_over_retrain']:.0f} of "
                      f"retraining ({retrain_seconds:.0f} s); {row['forward_examples']} forward and "
                      f"{row['backward_examples']} backward examples; {s['status']}, {s['steps_accepted']} steps, "
                      f"forget score {s['forget_score_after']:.2f}", ""])
        lines.extend(breakdown_markdown(cost["breakdown"], cost["seconds"]))
        lines.append("")
        print(name, {k: v for k, v in row.items() if k != "breakdown"}, flush=True)

    exp = Experiment(ExperimentConfig(), args.demo_cache, progress=False)
    original = exp.train("full")
    exp.train("retain")
    run("canaries (the demo, seed 0)", original, exp.forget_batches(), exp.retain_batches(8), exp.holdout_batches(),
        exp.held_retain_batch(), exp.timings["retrain_seconds"], UnlearnSettings(curvature_batches=8))
    # the curvature checkpoint of the training data (not timed: it is taken during training, once for all requests)
    full = build_curvature("kfac", original).fit(exp.retain_batches(None) + exp.forget_batches())
    run("canaries, cached curvature (full_minus_forget, no retain data)", original, exp.forget_batches(), None,
        exp.holdout_batches(), None, exp.timings["retrain_seconds"],
        UnlearnSettings(curvature_data="full_minus_forget", full_curvature=full.state_dict()))
    # the same with one held retain batch for the budget (no curvature pass over it)
    run("canaries, cached curvature and one held retain batch", original, exp.forget_batches(), None,
        exp.holdout_batches(), exp.held_retain_batch(), exp.timings["retrain_seconds"],
        UnlearnSettings(curvature_data="full_minus_forget", full_curvature=full.state_dict()))
    tofu = TofuExperiment(TofuConfig(seed=0), args.tofu_cache)
    for split in ("forget01", "forget05", "forget10"):
        retain = tofu.retain_batches(split, 16)
        run(f"TOFU {split} (seed 0)", tofu.original_model().eval(), tofu.forget_batches(split), retain[:-1],
            tofu.holdout_batches(split), retain[-1], float(tofu.training_record(f"retain_{split}")["seconds"]),
            UnlearnSettings())
    (target / "request_profile.json").write_text(json.dumps(out, indent=1, default=float))
    (target / "request_profile.md").write_text("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
