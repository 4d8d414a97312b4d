"""The default request on the frontier benchmark's canary experiments, alone: seeds 0, 1, 2 of the demo's experiment
(models trained or loaded from `--cache`, as `benchmarks.run`'s frontier caches them), the request timed and counted
per phase, privacy and utility against the retrained model.

    python -m benchmarks.canary_default            # ~10 min on 2 cores with training, ~2 min from cached models
    python -m benchmarks.canary_default --method-kwargs '{"protect_groups": 1}' --out DIR   # one knob changed
    python -m benchmarks.canary_default --settings '{"curvature_kwargs": {"kfac_approx": "reduce"}}' --out DIR
    python -m benchmarks.canary_default --config '{"arch": "llama"}' --out DIR   # another model: trains its own

Writes `benchmarks/results/canary-default/results.json` (numbers only): per seed the original, retrained and default
rows (`frontier_bench.privacy_row`: exposure, MIA AUC, Δ test perplexity) with status, the default's MIA AUC against
the calibration canaries its target is scored on (`mia_auc_calibration`), steps, whether the knowledge
regime ran, seconds, `time_over_fwd_bwd` and `time_over_retrain`; and the mean ± sd of the default rows.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch


def seed_rows(seed: int, cache: str, method_kwargs: dict[str, Any] | None = None,
              settings_changes: dict[str, Any] | None = None,
              config_changes: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The original, retrained and default-request rows of one seed (`method_kwargs`: one knob changed, e.g.
    `{"protect_groups": 1}`; `settings_changes`: fields of `UnlearnSettings` changed, e.g. `curvature_kwargs`;
    `config_changes`: fields of `ExperimentConfig` changed, e.g. `arch`), and its canaries' secrets (no file may hold
    one); one torch thread: two seeds run side by side."""
    torch.set_num_threads(1)
    from benchmarks.frontier_bench import make_experiment, privacy_row
    from benchmarks.passes import fwd_bwd_seconds
    from benchmarks.request_cost import profiled_request
    from benchmarks.run import secrets_of
    from lightning_unlearn.demo import DEFAULT_SETTINGS, quiet_libraries
    from lightning_unlearn.experiment import ExperimentConfig

    quiet_libraries()
    exp = make_experiment("canaries", dataclasses.replace(ExperimentConfig(), seed=seed, **(config_changes or {})),
                          cache)
    original, retrained = exp.train("full").eval(), exp.train("retain").eval()
    forget, holdout, held = exp.forget_batches(), exp.holdout_batches(), exp.held_retain_batch()
    retain = exp.retain_batches(DEFAULT_SETTINGS.curvature_batches)
    before = exp.evaluate(original, reference=retrained)
    ppl = float(before["test/perplexity"])
    rows = [{"seed": seed, "method": "original", **privacy_row("canaries", before, ppl)},
            {"seed": seed, "method": "retrain",
             **privacy_row("canaries", exp.evaluate(retrained, reference=retrained), ppl)}]
    model = copy.deepcopy(original)
    settings = dataclasses.replace(DEFAULT_SETTINGS, method_kwargs=dict(method_kwargs or {}),
                                   **(settings_changes or {}))
    result, cost = profiled_request(model, forget, retain, holdout, settings=settings, held_retain=held)
    unit = fwd_bwd_seconds(original, forget + retain)
    summary = result.summary
    rows.append({"seed": seed, "method": "default",
                 **privacy_row("canaries", exp.evaluate(model, reference=retrained), ppl),
                 "mia_auc_calibration": calibration_auc(exp, model),
                 "status": summary["status"], "steps_accepted": summary["steps_accepted"],
                 "knowledge_regime": summary["knowledge_regime"], "seconds": cost["seconds"],
                 "fwd_bwd_seconds": unit, "time_over_fwd_bwd": cost["seconds"] / unit,
                 "time_over_retrain": cost["seconds"] / exp.timings["retrain_seconds"],
                 "breakdown": cost["breakdown"]})
    return rows, secrets_of(exp)


def calibration_auc(exp: Any, model: torch.nn.Module) -> float:
    """The loss attack's AUC of the inserted canaries against the 20 calibration canaries the request's target is
    scored on (and its holdout protection holds); the rows' `mia_auc` is against the 40 reference canaries instead."""
    from lightning_unlearn.curvature.base import identity
    from lightning_unlearn.methods.losses import example_losses
    from lightning_unlearn.metrics.privacy_leak import mia_auc

    def losses(batches: list) -> torch.Tensor:
        return example_losses(model, batches, identity)[0]

    return float(mia_auc(-losses(list(exp.canary_loader("inserted"))), -losses(exp.holdout_batches())))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± sd over seeds of the default rows; the exposure gap is against each seed's retrained model."""
    retrain = {r["seed"]: r for r in rows if r["method"] == "retrain"}
    default = [r for r in rows if r["method"] == "default"]
    values = {"mia_auc": [r["mia_auc"] for r in default],
              "mia_auc_calibration": [r["mia_auc_calibration"] for r in default],
              "dppl_percent": [r["dppl_percent"] for r in default],
              "exposure_gap_bits": [r["exposure"] - retrain[r["seed"]]["exposure"] for r in default],
              "time_over_fwd_bwd": [r["time_over_fwd_bwd"] for r in default]}
    out: dict[str, Any] = {"seeds": [r["seed"] for r in default], "status": [r["status"] for r in default]}
    for key, vals in values.items():
        out[key] = statistics.mean(vals)
        out[f"{key}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out[f"{key}_per_seed"] = vals
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="runs/benchmarks")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/canary-default")
    parser.add_argument("--method-kwargs", type=json.loads, default={},
                        help='one knob changed from the default, as JSON (e.g. \'{"protect_groups": 1}\')')
    parser.add_argument("--settings", type=json.loads, default={},
                        help='UnlearnSettings fields changed, as JSON (e.g. \'{"curvature_kwargs": {"kfac_approx": '
                             '"reduce"}}\')')
    parser.add_argument("--config", type=json.loads, default={},
                        help='ExperimentConfig fields changed, as JSON (e.g. \'{"arch": "llama"}\': the models of '
                             'another architecture, trained and cached on first use)')
    args = parser.parse_args(argv)
    n = len(args.seeds)
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        done = list(pool.map(seed_rows, args.seeds, [args.cache] * n, [args.method_kwargs] * n, [args.settings] * n,
                             [args.config] * n))
    rows = [r for seed_done, _ in done for r in seed_done]
    secrets = sorted({s for _, seed_secrets in done for s in seed_secrets})
    results = {"default_recipe": {"canaries": summarize(rows)}, "method_kwargs": args.method_kwargs,
               "settings": args.settings, "config": args.config, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from lightning_unlearn.report import atomic_write

    atomic_write(out / "results.json", json.dumps(results, indent=1, default=float).encode(), secrets)
    print(json.dumps(results["default_recipe"], indent=1, default=float))


if __name__ == "__main__":
    main()
