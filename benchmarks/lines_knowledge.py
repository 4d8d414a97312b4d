"""Whole lines about people, forgotten with the budget on held-out prose (`docs/recipe.md` §9, the knowledge regime's
second trigger): the default request against the secret recipe (`knowledge=False`) on tiny untied models that
memorised every line (`tests/line_corpus.py`, the corpus of `tests/test_default_recipe_lines.py`).

For each architecture and seed: the status, the forget score after (0.5: the forget lines at the never-trained
lines' median), the forget lines' loss before and after (the never-trained lines' loss beside it), the held-out
prose's relative change (the budget's data), and the loss of the other people's lines, which the unlearner never
sees in full (what a retrained model keeps, and what the budget on prose cannot see).

    python -m benchmarks.lines_knowledge          # ~5 min on one core
    python -m benchmarks.lines_knowledge --archs phi3 gemma3_text --out DIR   # other tiny architectures

Writes `benchmarks/results/lines-knowledge/results.json` and `results.md` (numbers only: the lines are token ids).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch

from lightning_unlearn.methods import build_unlearner
from lightning_unlearn.models import ARCHITECTURES
from lightning_unlearn.report import atomic_write

ARCHS = ("llama", "qwen2", "gpt_neox", "opt", "gpt2", "stablelm")
CORPUS = Path(__file__).resolve().parents[1] / "tests" / "line_corpus.py"


def _corpus() -> Any:
    spec = importlib.util.spec_from_file_location("line_corpus", CORPUS)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def run(model: torch.nn.Module, data: tuple, **kwargs: Any) -> dict[str, Any]:
    """One request on a copy of `model` and what it did to each kind of data."""
    forget, retain, held, (prose, lines), holdout = data
    u = build_unlearner("newton", copy.deepcopy(model), **kwargs)
    f0, h0, p0, l0 = u.measure(forget), u.measure(holdout), u.measure(prose), u.measure(lines)
    start = time.perf_counter()
    records = u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    seconds = time.perf_counter() - start
    return {"status": u.status, "knowledge_regime": u.knowledge_regime, "budget": u.max_retain_increase,
            "steps": sum(r.accepted for r in records), "forget_score": u.summary()["forget_score_after"],
            "forget_before": f0, "forget_after": u.measure(forget),
            "holdout": h0, "prose_change_percent": 100 * (u.measure(prose) / p0 - 1), "other_lines_before": l0,
            "other_lines_after": u.measure(lines), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHITECTURES,
                        help="the tiny architectures to train and unlearn (default: the six of the committed run)")
    parser.add_argument("--out", default="benchmarks/results/lines-knowledge")
    args = parser.parse_args()
    torch.set_num_threads(1)
    corpus = _corpus()
    rows = []
    for arch in args.archs:
        for seed in args.seeds:
            torch.manual_seed(seed)
            model, *data = corpus.memorise_lines(arch, seed=seed)
            for name, kwargs in (("default", {}), ("secret recipe", {"knowledge": False})):
                row = {"arch": arch, "seed": seed, "request": name, **run(model, tuple(data), **kwargs)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"seeds": args.seeds, "archs": args.archs, "rows": rows}
    atomic_write(out / "results.json", json.dumps(summary, indent=1).encode(), ())
    lines = ["# Whole lines about people, budget on held-out prose", "",
             "| arch | seed | request | status | steps | forget score | forget lines | never-trained lines | "
             "held-out prose | other people's lines | seconds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['seed']} | {r['request']} | {r['status']} | {r['steps']} | "
                     f"{r['forget_score']:.2f} | {r['forget_before']:.2f} → {r['forget_after']:.2f} | "
                     f"{r['holdout']:.2f} | "
                     f"{r['prose_change_percent']:+.1f} % | {r['other_lines_before']:.2f} → "
                     f"{r['other_lines_after']:.2f} | {r['seconds']:.1f} |")
    atomic_write(out / "results.md", ("\n".join(lines) + "\n").encode(), ())  # token ids only: no text


if __name__ == "__main__":
    main()
