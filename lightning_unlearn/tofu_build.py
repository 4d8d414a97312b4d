"""Build the TOFU-faithful benchmark's models: train (or load) every model of several seeds in parallel processes of
one thread each, and measure them (`python -m lightning_unlearn.tofu_build`, or `build(...)`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .tofu_experiment import MODELS, TofuConfig, TofuExperiment


def _build_one(args: tuple[dict[str, Any], str, str, str]) -> tuple[int, str, Any]:
    """One job of `build`, in a worker of one thread: train (or load) a model, or `measure` a seed."""
    config, output, name, accelerator = args
    torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    exp = TofuExperiment(TofuConfig(**config), output, accelerator=accelerator)
    if name == "measure":
        return exp.config.seed, name, exp.measure()
    exp._load(name)
    record = exp.training_record(name)
    return exp.config.seed, name, {"seconds": record["seconds"], "cpu_seconds": record.get("cpu_seconds")}


def build(config: TofuConfig | None = None, output_dir: str | Path = "runs/tofu_experiment",
          seeds: Sequence[int] = (0, 1, 2), *, workers: int = 1, accelerator: str = "cpu") -> dict[str, Any]:
    """Train (or load) the shared base, then each seed's original and 3 retain models (`workers` processes of one
    thread), then measure every seed. Returns {"wall_seconds_training", "wall_seconds", "train_seconds": {"base" |
    "seed<k>": ...} (wall and CPU seconds of each model's training, as recorded when it was trained), "flatness" (the
    base's check), "measurements": {seed: `TofuExperiment.measure()`}}."""
    config = config or TofuConfig()
    start = time.perf_counter()
    torch.set_num_threads(1)
    first = TofuExperiment(config, output_dir, accelerator=accelerator)
    first.base_model()
    base = first.training_record("base")
    jobs = [(dataclasses.asdict(dataclasses.replace(config, seed=s)), str(output_dir), name, accelerator)
            for s in seeds for name in MODELS[1:]]
    checks = [(dataclasses.asdict(dataclasses.replace(config, seed=s)), str(output_dir), "measure", accelerator)
              for s in seeds]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            done = pool.map(_build_one, jobs, chunksize=1)
            trained = time.perf_counter() - start
            measured = pool.map(_build_one, checks, chunksize=1)
    else:
        done = [_build_one(job) for job in jobs]
        trained = time.perf_counter() - start
        measured = [_build_one(job) for job in checks]
    seconds: dict[str, Any] = {"base": {"seconds": base["seconds"], "cpu_seconds": base.get("cpu_seconds")}}
    for seed, name, s in done:
        seconds.setdefault(f"seed{seed}", {})[name] = s
    return {"wall_seconds_training": trained, "wall_seconds": time.perf_counter() - start, "train_seconds": seconds,
            "flatness": base["flatness"], "measurements": {seed: m for seed, _, m in measured}}


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build (train and cache) the TOFU-style benchmark's models.")
    parser.add_argument("--output", default="runs/tofu_experiment")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="the tiny test configuration")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override config fields")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = TofuConfig.smoke() if args.smoke else TofuConfig()
    types = {f.name: f.type for f in dataclasses.fields(TofuConfig)}
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in types:
            raise SystemExit(f"unknown config field {key!r}")
        cast = float if "float" in str(types[key]) else int if "int" in str(types[key]) else str
        config = dataclasses.replace(config, **{key: cast(value)})
    result = build(config, args.output, args.seeds, workers=args.workers)
    path = Path(args.output) / "build.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "measurements"}, indent=1))
    print(f"measurements: {path}")


if __name__ == "__main__":
    main()
