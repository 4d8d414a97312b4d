"""The retain repair's line, measured (`docs/recipe.md` §10): on one seed and split of the TOFU-faithful benchmark, the
default request with the repair turned off, then the repair's direction at fixed lengths ‖Δθ‖/‖θ‖ (over all retain
batches, over the 4 the recipe uses, and with the holdout's groups added to the constraints), and plain retain
descent (Adam) for comparison; each point evaluated as the benchmark evaluates (forget quality, model utility,
retain-answer probability and ROUGE-L) with the held retain loss and the forget score.

    python -m benchmarks.retain_repair --seed 1 --split forget10     # ~5 min on one core from the cached models

Writes `benchmarks/results/retain-repair/<split>-seed<seed>.json` (numbers only).
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.tofu import SplitBench, plan
from lightning_unlearn.methods.repair import REPAIR_BATCHES
from lightning_unlearn.methods.trust_region import largest_trusted_step
from lightning_unlearn.report import atomic_write
from lightning_unlearn.request import serve_request
from lightning_unlearn.settings import UnlearnSettings
from lightning_unlearn.tofu_experiment import TofuConfig, TofuExperiment

LENGTHS = (0.01, 0.02, 0.04, 0.08)
KEYS = ("forget_quality", "model_utility", "retain_probability", "retain_rouge")


def measure(seed: int, split: str, cache: Path) -> tuple[dict[str, Any], list[bytes]]:
    """The numbers of one seed and split, and the forget answers (no file may hold one)."""
    torch.set_num_threads(1)
    p = plan("cpu-small")
    exp = TofuExperiment(TofuConfig(**{**asdict(p.config), "seed": seed}), cache)
    bench = SplitBench(exp, split, p.eval_retain)
    held = bench.retain[-1]  # the default request's held retain batch

    def row(model: torch.nn.Module, **extra: Any) -> dict[str, Any]:
        scores = bench.evaluate(model)
        return {**{k: scores[k] for k in KEYS}, **extra}

    model = copy.deepcopy(bench.original)
    result = serve_request(model, bench.forget, bench.retain, bench.holdout,
                           settings=UnlearnSettings(method_kwargs={"retain_repair": False}))
    u = result.unlearner

    def on_line(**extra: Any) -> dict[str, Any]:
        return row(model, **extra, held_loss=u.measure(held), forget_score=u.forget_score(bench.forget)[0])

    out: dict[str, Any] = {"seed": seed, "split": split, "status": result.status, "steps_end": on_line()}
    params = u.named_params()
    start = {n: q.detach().clone() for n, q in params.items()}
    forget_groups = u.group_gradients(bench.forget, u.protect_groups)
    variants = {"all_retain_batches": (bench.retain[:-1], forget_groups),
                "repair_batches": (bench.retain[:REPAIR_BATCHES], forget_groups),  # the recipe's direction
                "with_holdout_groups": (bench.retain[:REPAIR_BATCHES], forget_groups + u.holdout_gradients())}
    for label, (batches, constraints) in variants.items():
        u._restore(start)  # each direction from the weights the steps left
        descent = {n: -g for n, g in u.forget_gradient(batches, kind="nll").items()}
        direction = u.protected_direction(descent, constraints)
        unit = largest_trusted_step(params, direction, 1.0, None, None)  # η with ‖η d‖ = ‖θ‖
        points = []
        for length in LENGTHS:
            u._apply_step(start, direction, None, length * unit)
            points.append(on_line(length=length))
        out[label] = {"direction_over_weights": 1.0 / unit, "points": points}  # ‖d‖ / ‖θ‖: the length of η = 1
    u._restore(start)
    plain = []
    for lr in (1e-4, 3e-4):  # plain retain descent from the same weights
        m = copy.deepcopy(model)
        opt = torch.optim.Adam(m.parameters(), lr=lr)
        for i in range(10):
            opt.zero_grad()
            m(**bench.retain[i % (len(bench.retain) - 1)]).loss.backward()
            opt.step()
            if i + 1 in (3, 10):
                plain.append(row(m, lr=lr, steps=i + 1))
    out["plain_adam"] = plain
    return out, [r["answer"].encode() for r in bench.parts["forget"]]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--split", default="forget10", choices=("forget01", "forget05", "forget10"))
    ap.add_argument("--cache", default="runs/tofu_experiment")
    ap.add_argument("--out", default="benchmarks/results/retain-repair")
    args = ap.parse_args(argv)
    out, secrets = measure(args.seed, args.split, Path(args.cache))
    path = Path(args.out) / f"{args.split}-seed{args.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(out, indent=1) + "\n").encode(), secrets)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
