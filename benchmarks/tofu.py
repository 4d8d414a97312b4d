"""The TOFU-faithful benchmark: forget quality and model utility as TOFU computes them, every method's curve.

For each seed and each forget split (forget01, forget05, forget10) of `lightning_unlearn.tofu_experiment`
(a pretrained base, the original = base finetuned on every author, the retain model = base finetuned on the retain
authors only), every method is evaluated with `lightning_unlearn.metrics.tofu_evaluation` (forget quality = KS
p-value of the forget truth ratios against the retain model's; model utility = harmonic mean of the 9 scores;
privleak of the Min-K% attack against the retain model's AUC):

- the **default recipe**: `serve_request` with `UnlearnSettings()` (no knob set), holdout authors as the target;
- the **second-order curve** (`newton_kfac`): the default recipe with the target score τ swept;
- **first-order baselines** tuned as the field tunes them: gradient ascent, gradient difference, NPO and SimNPO,
  learning rate × steps (checkpoints along each run), no retain budget.

`frontier_wins.tofu[baseline]` is true when, at every forget-quality level ≥ 0.05 that the baseline reaches
(median over seeds of the best model utility among the points at or above the level, per split), the default
recipe's curve has model utility at least the baseline's. Rows hold numbers only: no question or answer text.

    python -m benchmarks.tofu                       # 3 seeds x 3 splits; models cached under runs/tofu_experiment
    python -m benchmarks.tofu --preset smoke        # tiny sizes, a minute (what the tests run)
    python -m benchmarks.tofu --config '{"arch": "llama"}' --recipe-only --cache runs/tofu_llama --out DIR
                                                    # the default recipe alone, on a configuration of your choice
    python -m benchmarks.tofu --recipe-only --method-kwargs '{"focus_unforgotten": true}' --out DIR
                                                    # one knob changed on the default recipe
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.frontier import fastest_rivals, rival_cell
from benchmarks.passes import fwd_bwd_seconds
from benchmarks.request_cost import count_request_passes
from lightning_unlearn.errors import UserInputError
from lightning_unlearn.methods import build_unlearner
from lightning_unlearn.methods.registry import check_method_settings
from lightning_unlearn.metrics.model_utility import MODEL_UTILITY_KEYS
from lightning_unlearn.metrics.qa_scoring import reference_statistics, tofu_evaluation
from lightning_unlearn.metrics.utility_interval import model_utility_interval
from lightning_unlearn.report import atomic_write
from lightning_unlearn.request import serve_request
from lightning_unlearn.settings import UnlearnSettings
from lightning_unlearn.tofu_experiment import TofuConfig, TofuExperiment

SPLITS = ("forget01", "forget05", "forget10")
BASELINES = ("gradient_ascent", "gradient_difference", "npo", "simnpo")
#: the forget-quality levels at which curves are compared (KS p-values; 0.05 is "not distinguishable")
FQ_LEVELS = (0.05, 0.1, 0.2, 0.5)
OURS = "newton_kfac"


@dataclass
class TofuPlan:
    """What one benchmark run sweeps."""

    name: str
    config: TofuConfig
    seeds: Sequence[int] = (0, 1, 2)
    splits: Sequence[str] = SPLITS
    taus: Sequence[float] = (0.35, 0.65)
    lrs: Sequence[float] = (3e-4, 1e-3)
    checkpoints: Sequence[int] = (5, 10, 20, 40)
    baselines: Sequence[str] = BASELINES
    eval_retain: int = 100  # retain questions scored per evaluation (a seeded sample)
    retain_weight: float = 1.0  # the retain term of gradient difference (and of NPO/SimNPO: 0, as the papers' plain)
    #: second-order variants of the default recipe, each one point: label -> `method_kwargs` (or settings fields)
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "newton_kfac_secret_recipe": {"knowledge": False}})
    #: knobs set on the default recipe and its τ points (`--method-kwargs`: one change measured against the default)
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def plan(name: str) -> TofuPlan:
    if name == "smoke":
        return TofuPlan("smoke", TofuConfig.smoke(), seeds=(0,), splits=("forget10",), taus=(), lrs=(1e-3,),
                        checkpoints=(2,), baselines=("gradient_ascent",), eval_retain=16, variants={})
    if name == "cpu-small":
        return TofuPlan("cpu-small", TofuConfig(), taus=(0.35, 0.65), lrs=(1e-4, 3e-4, 1e-3),
                        checkpoints=(5, 10, 20))
    raise ValueError(f"unknown preset {name!r}; choose smoke or cpu-small")


def _sample(rows: Sequence[dict], n: int, salt: str) -> list[dict]:
    if len(rows) <= n:
        return list(rows)
    keep = sorted(random.Random(salt).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


class SplitBench:
    """One seed and one split: the data, the models, the reference statistics and `evaluate(model)`."""

    def __init__(self, exp: TofuExperiment, split: str, eval_retain: int) -> None:
        self.exp, self.split = exp, split
        self.tokenizer = exp.tokenizer
        seed = exp.config.seed
        self.parts = {"forget": exp.rows("forget", split),
                      "retain": _sample(exp.rows("retain", split), eval_retain, f"tofu-eval:{seed}:{split}"),
                      "real_authors": exp.rows("real_authors"), "world_facts": exp.rows("world_facts")}
        self.holdout_rows = exp.rows("holdout")
        self.original = exp.original_model().eval()
        retain_model = exp.retain_model(split).eval()
        self.reference = reference_statistics(retain_model, self.tokenizer, self.parts, holdout_rows=self.holdout_rows)
        self.retain_model = retain_model
        self.forget = exp.forget_batches(split)
        self.holdout = exp.holdout_batches(split)
        self.held = exp.held_retain_batch(split)
        self.retain = exp.retain_batches(split, 16)
        self.retrain_seconds = float(exp.training_record(f"retain_{split}")["seconds"])
        #: one forward+backward over the forget set (first order) and over forget + curvature batches (second order;
        #: the default request holds the last retain batch out of the curvature for the budget)
        self.fwd_bwd = {"first": fwd_bwd_seconds(self.original, self.forget),
                        "second": fwd_bwd_seconds(self.original, self.forget + self.retain[:-1])}

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return self.evaluate_with_items(model)[0]

    def evaluate_with_items(self, model: torch.nn.Module) -> tuple[dict[str, float], dict[str, list[float]]]:
        """The numbers, and the per-row values of the nine utility components (`model_utility_interval`)."""
        result = tofu_evaluation(model, self.tokenizer, self.parts,
                                 retain_model_truth_ratios=self.reference["forget_truth_ratios"],
                                 retain_model_privleak_auc=self.reference["privleak_auc"],
                                 holdout_rows=self.holdout_rows)
        return {k: float(v) for k, v in result.items()}, {k: result.per_item[k] for k in MODEL_UTILITY_KEYS}


def split_rows(bench: SplitBench, p: TofuPlan, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every point of every method on one seed and split."""
    base = {"seed": bench.exp.config.seed, "split": bench.split}
    rows: list[dict[str, Any]] = []
    items: dict[str, dict[str, list[float]]] = {}  # the reference models' per-row utility components

    def point(method: str, knob: str, model: torch.nn.Module, **extra: Any) -> dict[str, Any]:
        start = time.perf_counter()
        numbers, per_row = bench.evaluate_with_items(model)
        row = {**base, "method": method, "knob": knob, **numbers, **extra,
               "eval_seconds": time.perf_counter() - start}
        if method in ("retain", "original"):
            items[method] = per_row
        elif extra.get("default"):  # the default's utility over each reference's, with the questions' bootstrap
            for ref in ("retain", "original"):
                ci = model_utility_interval(per_row, items[ref], seed=base["seed"])
                finite = math.isfinite(ci["low"]) and math.isfinite(ci["high"])
                row[f"utility_over_{ref}_interval"] = [ci["low"], ci["high"]] if finite else None
        rows.append(row)
        say(f"  {bench.split} seed {base['seed']} {method} {knob}: FQ {row['forget_quality']:.3g}, MU "
            f"{row['model_utility']:.3f}, privleak {row['privleak']:+.1f}")
        return row

    point("retain", "-", bench.retain_model)
    point("original", "-", bench.original)

    def costs(seconds: float, passes: dict[str, int], order: str) -> dict[str, Any]:
        unit = bench.fwd_bwd[order]
        return {"seconds": seconds, "fwd_bwd_seconds": unit, "time_over_fwd_bwd": seconds / unit,
                "time_over_retrain": seconds / bench.retrain_seconds, **passes}

    def newton(knob: str, settings: UnlearnSettings, default: bool = False, label: str = OURS) -> None:
        model = copy.deepcopy(bench.original)
        with count_request_passes(model) as passes:
            start = time.perf_counter()
            result = serve_request(model, bench.forget, bench.retain, bench.holdout, settings=settings)
            seconds = time.perf_counter() - start
        s = result.summary
        point(label, knob, model, default=default, status=s["status"], steps_accepted=s["steps_accepted"],
              forget_score=s["forget_score_after"], **costs(seconds, passes.snapshot(), "second"))

    newton("default", UnlearnSettings(method_kwargs=dict(p.method_kwargs)), default=True)
    for tau in p.taus:
        newton(f"tau={tau:g}", UnlearnSettings(method_kwargs={**p.method_kwargs, "target_score": tau}))
    for label, fields in p.variants.items():
        newton("default", UnlearnSettings(**fields), label=label)

    for method in p.baselines:
        for lr in p.lrs:
            model = copy.deepcopy(bench.original)
            kwargs: dict[str, Any] = dict(lr=lr, steps=1, max_retain_increase=None)
            if method in ("gradient_ascent", "gradient_difference"):
                kwargs["forget_loss"] = "nll"  # the field's GA / GradDiff ascend the NLL
            if method == "gradient_difference":
                kwargs["retain_weight"] = p.retain_weight
            if method == "npo":
                kwargs["reference"] = copy.deepcopy(bench.original)
            unlearner = build_unlearner(method, model, **kwargs)
            torch.manual_seed(base["seed"])
            done, seconds, spent = 0, 0.0, {}
            for checkpoint in p.checkpoints:  # the evaluations between checkpoints are neither timed nor counted
                with count_request_passes(model) as passes:
                    start = time.perf_counter()
                    for i in range(done, checkpoint):
                        unlearner.step(bench.forget, [bench.retain[i % len(bench.retain)]], bench.held)
                    seconds += time.perf_counter() - start
                spent = {k: spent.get(k, 0) + v for k, v in passes.snapshot().items()}
                done = checkpoint
                point(method, f"lr={lr:g} steps={checkpoint}", model, lr=lr, steps=checkpoint,
                      **costs(seconds, spent, "first"))
    return rows


# ------------------------------------------------------------------------------------------------------ analysis
def _median(values: Sequence[float]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def _utility_ratios(rows: Sequence[dict], refs: dict[int, dict]) -> list[float | None]:
    """Each row's model utility over that of its seed's reference row in `refs` (None: no reference, or one at 0)."""
    return [r["model_utility"] / refs[r["seed"]]["model_utility"]
            if r["seed"] in refs and refs[r["seed"]]["model_utility"] > 0 else None for r in rows]


def _paired_utility(rows: Sequence[dict], refs: dict[int, dict]) -> float | None:
    """The median over `rows` of each row's model utility over that of its seed's reference row in `refs`."""
    return _median([v for v in _utility_ratios(rows, refs) if v is not None])


def default_recipe(rows: Sequence[dict]) -> dict[str, Any]:
    """`default_recipe.tofu`: per split the seeds, the medians of forget quality, model utility (and the retain
    model's), privleak, seconds and its ratios to one forward+backward and to retraining, and each seed's status.
    `model_utility_over_retain` is the median over seeds of each seed's utility over its own retain model's (paired:
    the retain models' utilities differ by seed more than unlearning moves it), beside the ratio of the medians;
    `model_utility_over_original` the same against the model the request started from (the original's own utility
    differs from the retain model's by as much: they are two finetunes of one base)."""
    out: dict[str, Any] = {}
    for split in sorted({r["split"] for r in rows}):
        mine = sorted((r for r in rows if r["split"] == split and r.get("default")), key=lambda r: r["seed"])
        ref = {r["seed"]: r for r in rows if r["split"] == split and r["method"] == "retain"}
        start = {r["seed"]: r for r in rows if r["split"] == split and r["method"] == "original"}
        out[split] = {
            "seeds": [r["seed"] for r in mine],
            "forget_quality": _median([r["forget_quality"] for r in mine]),
            "model_utility": _median([r["model_utility"] for r in mine]),
            "model_utility_retain": _median([ref[r["seed"]]["model_utility"] for r in mine]),
            "model_utility_over_retain": _paired_utility(mine, ref),
            "model_utility_over_original": _paired_utility(mine, start),
            "privleak": _median([r["privleak"] for r in mine]),
            "status": [r["status"] for r in mine],
            "steps_accepted": [r["steps_accepted"] for r in mine],
            "seconds": _median([r["seconds"] for r in mine]),
            "time_over_fwd_bwd": _median([r["time_over_fwd_bwd"] for r in mine]),
            "time_over_retrain": _median([r["time_over_retrain"] for r in mine]),
            "forget_quality_per_seed": [r["forget_quality"] for r in mine],
            "model_utility_per_seed": [r["model_utility"] for r in mine],
            # each seed's utility over its retain model's, and the 95 % paired bootstrap interval over the questions
            "model_utility_over_retain_per_seed": _utility_ratios(mine, ref),
            "model_utility_over_retain_interval_per_seed": [r.get("utility_over_retain_interval") for r in mine],
        }
    return out


def best_utility(rows: Sequence[dict], method: str, split: str, seed: int, level: float) -> float | None:
    """The best model utility among `method`'s points with forget quality ≥ `level` (None: none reaches it)."""
    vals = [r["model_utility"] for r in rows if r["method"] == method and r["split"] == split and r["seed"] == seed
            and r["forget_quality"] >= level]
    return max(vals) if vals else None


def matched(rows: Sequence[dict], methods: Sequence[str]) -> dict[str, Any]:
    """Per split and forget-quality level: each method's median over seeds of its best model utility there (over the
    seeds where every compared method ran: the baselines may run on fewer seeds than the recipe)."""
    table: dict[str, Any] = {}
    for split in sorted({r["split"] for r in rows}):
        ran = [{r["seed"] for r in rows if r["split"] == split and r["method"] == m} for m in methods]
        seeds = sorted(set.intersection(*ran) if ran else set())
        table[split] = {}
        for level in FQ_LEVELS:
            entry = {}
            for method in methods:
                best = [best_utility(rows, method, split, s, level) for s in seeds]
                reached = [b for b in best if b is not None]
                # a seed that does not reach the level counts as utility 0 at it (the median decides)
                entry[method] = (statistics.median([b if b is not None else 0.0 for b in best])
                                 if len(reached) * 2 > len(seeds) else None)
            table[split][str(level)] = entry
    return table


def frontier_wins(table: dict[str, Any], baselines: Sequence[str]) -> dict[str, bool]:
    """True for a baseline when at every level it reaches (median over seeds), ours has at least its utility."""
    wins = {}
    for b in baselines:
        ok, compared = True, 0
        for levels in table.values():
            for entry in levels.values():
                theirs, ours = entry.get(b), entry.get(OURS)
                if theirs is None:
                    continue
                compared += 1
                ok = ok and ours is not None and ours >= theirs
        wins[b] = bool(ok and compared > 0) if compared else True
    return wins


def reached_level(forget_quality: float) -> float | None:
    """The highest of `FQ_LEVELS` that `forget_quality` reaches (None: below 0.05, not forgotten)."""
    levels = [level for level in FQ_LEVELS if forget_quality >= level]
    return max(levels) if levels else None


def time_against_first_order(rows: Sequence[dict], baselines: Sequence[str]) -> dict[str, Any]:
    """Per split and seed: the default request's seconds against the fastest first-order point that reaches the
    same privacy at the same or better utility (forget quality at least the level the default reached, model
    utility at least the default's; first-order checkpoints are timed from the run's start;
    `frontier.fastest_rivals`). `fastest` is None where no baseline point does: there no first-order run of the grid
    buys what the request bought, at any price. Only the seeds where the baselines ran are compared;
    `default_faster` counts those where the request reached forget quality ≥ 0.05 and is faster than that point, or
    it has none."""

    def matches(mine: dict, r: dict) -> bool:
        level = reached_level(mine["forget_quality"])
        return level is not None and r["forget_quality"] >= level and r["model_utility"] >= mine["model_utility"]

    out: dict[str, Any] = {}
    for split in sorted({r["split"] for r in rows}):
        here = [r for r in rows if r["split"] == split]
        ran = {r["seed"] for r in here if r["method"] in baselines}
        mine = {r["seed"]: r for r in here if r.get("default") and r["seed"] in ran}
        per_seed = [{"seed": e["seed"], "level": reached_level(mine[e["seed"]]["forget_quality"]), **e}
                    for e in fastest_rivals(mine.values(), here, baselines, matches, own=("model_utility",),
                                            theirs=("forget_quality", "model_utility"))]
        faster = [e for e in per_seed if e["level"] is not None
                  and (e["fastest"] is None or e["seconds"] < e["fastest"]["seconds"])]
        out[split] = {"per_seed": per_seed, "default_faster": len(faster), "seeds": len(per_seed)}
    return out


def markdown(recipe: dict[str, Any], table: dict[str, Any], wins: dict[str, bool], p: TofuPlan,
             rows: Sequence[dict] = (), timing: dict[str, Any] | None = None) -> str:
    lines = [f"# TOFU-faithful benchmark ({p.name}): seeds {list(p.seeds)}", "",
             "Forget quality (KS p of forget truth ratios vs the retain model), model utility (harmonic mean of 9),",
             "privleak (Min-K% AUC vs the retain model's), medians over seeds (\"per seed\": the median of each seed's",
             "utility over its own retain model's, or its own original's).", "",
             "| split | forget quality | model utility | retain model's utility | × retain model's, per seed | "
             "× original's, per seed | privleak | status |",
             "|---|---|---|---|---|---|---|---|"]
    for split, r in recipe.items():
        def f(x: Any, d: int = 3) -> str:
            return "-" if x is None else f"{x:.{d}g}"
        lines.append(f"| {split} | {f(r['forget_quality'])} | {f(r['model_utility'])} | "
                     f"{f(r['model_utility_retain'])} | {f(r.get('model_utility_over_retain'))} | "
                     f"{f(r.get('model_utility_over_original'))} | {f(r['privleak'])} | {', '.join(r['status'])} |")
    intervals = [(split, seed, ratio, ci) for split, r in recipe.items()
                 for seed, ratio, ci in zip(r["seeds"], r.get("model_utility_over_retain_per_seed", ()),
                                            r.get("model_utility_over_retain_interval_per_seed", ()))
                 if ratio is not None and ci is not None]
    if intervals:
        lines += ["", "Per seed: the default's model utility over its retain model's, with the 95 % paired bootstrap "
                  "interval over the evaluation's questions (`model_utility_interval`: how much of the ratio is the "
                  "choice of questions):", "", "| split | seed | × retain model's | 95 % interval |",
                  "|---|---|---|---|"]
        lines += [f"| {split} | {seed} | {ratio:.3f} | {ci[0]:.3f} - {ci[1]:.3f} |"
                  for split, seed, ratio, ci in intervals]
    lines += ["", "Single points (medians over seeds): the reference models, the default recipe and its variants:", "",
              "| split | model | forget quality | model utility | privleak | seconds | time / fwd+bwd |",
              "|---|---|---|---|---|---|---|"]
    for split in recipe:
        for method, knob in (("retain", "-"), ("original", "-"), (OURS, "default"),
                             *((label, "default") for label in p.variants)):
            pts = [r for r in rows if r["split"] == split and r["method"] == method and r["knob"] == knob]
            if not pts:
                continue
            cells = [_median([r.get(k, math.nan) for r in pts]) for k in
                     ("forget_quality", "model_utility", "privleak", "seconds", "time_over_fwd_bwd")]
            text = " | ".join("-" if c is None else f"{c:.3g}" for c in cells)
            lines.append(f"| {split} | {method if method != OURS else 'default recipe'} | {text} |")
    lines += ["", "Best model utility at forget quality ≥ level (median over seeds; - = not reached):", ""]
    methods = [OURS, *p.baselines]
    lines += ["| split | level | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for split, levels in table.items():
        for level, entry in levels.items():
            cells = " | ".join("-" if entry.get(m) is None else f"{entry[m]:.3f}" for m in methods)
            lines.append(f"| {split} | {level} | {cells} |")
    lines += ["", "frontier_wins.tofu: " + ", ".join(f"{k}: {v}" for k, v in wins.items()), ""]
    if timing and p.baselines:
        lines += ["Time against first order: per seed, the default request against the fastest first-order point "
                  "at the forget-quality level it reached, with at least its model utility (- = no such point):", "",
                  "| split | seed | level | default s | model utility | fastest first order (s, FQ, MU) |",
                  "|---|---|---|---|---|---|"]
        for split, entry in timing.items():
            for s in entry["per_seed"]:
                rival = rival_cell(s["fastest"], {"forget_quality": ".3g", "model_utility": ".3f"})
                lines.append(f"| {split} | {s['seed']} | {s['level'] if s['level'] is not None else '< 0.05'} | "
                             f"{s['seconds']:.3g} | {s['model_utility']:.3f} | {rival} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: Path, methods: Sequence[str], secrets: Sequence[bytes]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = sorted({r["split"] for r in rows})
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for method in [OURS, *methods]:
            pts = [r for r in rows if r["split"] == split and r["method"] == method]
            if pts:
                ax.scatter([max(r["forget_quality"], 1e-12) for r in pts], [r["model_utility"] for r in pts],
                           s=14, label=method, alpha=0.7)
        for ref, marker in (("retain", "*"), ("original", "x")):
            pts = [r for r in rows if r["split"] == split and r["method"] == ref]
            ax.scatter([max(r["forget_quality"], 1e-12) for r in pts], [r["model_utility"] for r in pts],
                       marker=marker, s=80, c="k", label=ref)
        ax.set_xscale("log")
        ax.axvline(0.05, ls=":", c="grey")
        ax.set_title(split)
        ax.set_xlabel("forget quality (KS p)")
        ax.set_ylabel("model utility")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    from lightning_unlearn.report import figure_bytes

    atomic_write(path, figure_bytes(fig), secrets)


def seed_task(p: TofuPlan, seed: int, cache: Path, out: Path, say: Callable[[str], None] = print) -> None:
    """Every split of one seed; each finished split's rows are appended to `out/rows.jsonl` (numbers only), so an
    interrupted run resumes where it stopped (`--resume`)."""
    exp = TofuExperiment(TofuConfig(**{**asdict(p.config), "seed": seed}), cache)
    done = {(r["seed"], r["split"]) for r in _load_rows(out)}
    for split in p.splits:
        if (seed, split) in done:
            continue
        bench = SplitBench(exp, split, p.eval_retain)
        rows = split_rows(bench, p, say)
        blob = "".join(json.dumps(r, default=float) + "\n" for r in rows).encode()
        secrets = [r["answer"].encode() for r in bench.parts["forget"]]
        for secret in secrets:
            if secret in blob:
                raise ValueError("refusing to write a row that contains a forget answer")
        with open(out / "rows.jsonl", "ab") as f:
            f.write(blob)


def _load_rows(out: Path) -> list[dict[str, Any]]:
    path = out / "rows.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def worker_tasks(p: TofuPlan) -> list[tuple[int, str]]:
    """(seed, split) pairs for the worker processes, the largest splits first: 9 tasks keep 2 workers busy to the end
    where 3 whole seeds left one idle for a third of the run."""
    pairs = [(seed, split) for seed in p.seeds for split in p.splits]
    return sorted(pairs, key=lambda t: -SPLITS.index(t[1]))


def _split_worker(args: tuple[TofuPlan, int, str, str, str]) -> None:
    """One seed and one split in a worker process (one thread)."""
    p, seed, split, cache, out = args
    torch.set_num_threads(1)
    seed_task(dataclasses.replace(p, splits=(split,)), seed, Path(cache), Path(out))


def run(p: TofuPlan, cache: Path, out: Path, say: Callable[[str], None] = print, *, workers: int = 1,
        resume: bool = False) -> dict[str, Any]:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / "rows.jsonl").exists():
        (out / "rows.jsonl").unlink()
    # `seconds` is the time of every pass that wrote these rows: a resumed pass adds the passes' before it
    earlier = 0.0
    if resume and (out / "results.json").exists():
        earlier = json.loads((out / "results.json").read_text()).get("seconds", 0.0)
    tasks = worker_tasks(p)
    if workers > 1 and len(tasks) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            pool.map(_split_worker, [(p, seed, split, str(cache), str(out)) for seed, split in tasks], chunksize=1)
    else:
        for seed in p.seeds:
            seed_task(p, seed, cache, out, say)
    rows = [r for r in _load_rows(out) if r["seed"] in p.seeds and r["split"] in p.splits]
    secrets: set[bytes] = set()  # the forget answers: no file written here may contain one
    for seed in p.seeds:
        exp = TofuExperiment(TofuConfig(**{**asdict(p.config), "seed": seed}), cache)
        for split in p.splits:
            secrets.update(r["answer"].encode() for r in exp.rows("forget", split))
    recipe = default_recipe(rows)
    table = matched(rows, [OURS, *p.baselines])
    wins = frontier_wins(table, p.baselines)
    timing = time_against_first_order(rows, p.baselines)
    results = {"preset": p.name, "seeds": list(p.seeds), "splits": list(p.splits), "method_kwargs": p.method_kwargs,
               "default_recipe": {"tofu": recipe}, "frontier_wins": {"tofu": wins}, "matched": table,
               "time_against_first_order": timing, "seconds": earlier + time.perf_counter() - start,
               "rows": rows}
    listed = sorted(secrets)
    atomic_write(out / "results.json", json.dumps(results, indent=1, default=float).encode(), listed)
    atomic_write(out / "results.md", markdown(recipe, table, wins, p, rows, timing).encode(), listed)
    plot(rows, out / "frontier_tofu.png", p.baselines, listed)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small", choices=("smoke", "cpu-small"))
    parser.add_argument("--cache", default="runs/tofu_experiment")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/tofu-<preset>")
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--splits", nargs="*", default=None, choices=SPLITS)
    parser.add_argument("--workers", type=int, default=1,
                        help="seeds and splits run in parallel processes (one thread each)")
    parser.add_argument("--resume", action="store_true", help="keep the splits already in <out>/rows.jsonl")
    parser.add_argument("--config", default=None, help="JSON object of TofuConfig fields to override "
                        "(e.g. '{\"arch\": \"llama\"}'; build its models first: tofu_build --set arch=llama)")
    parser.add_argument("--recipe-only", action="store_true",
                        help="the reference models and the default recipe only: no τ sweep, variant or baseline")
    parser.add_argument("--method-kwargs", default=None,
                        help="JSON object of knobs set on the default recipe and its τ points, to measure one change "
                             "against the default (e.g. '{\"focus_unforgotten\": true}')")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("LIGHTNING_UNLEARN_THREADS", "1")))
    p = plan(args.preset)
    if args.seeds:
        p.seeds = tuple(args.seeds)
    if args.splits:
        p.splits = tuple(args.splits)
    if args.config:
        overrides = json.loads(args.config)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TofuConfig)})
        if unknown:
            raise SystemExit(f"--config: unknown TofuConfig fields {unknown}")
        p.config = dataclasses.replace(p.config, **overrides)
    if args.method_kwargs:
        knobs = json.loads(args.method_kwargs)
        if not isinstance(knobs, dict):
            raise SystemExit(f"--method-kwargs: a JSON object of knobs, got {type(knobs).__name__}")
        try:  # a typo fails here, not after the reference models' evaluation
            check_method_settings(UnlearnSettings().method, knobs)
        except UserInputError as err:
            raise SystemExit(f"--method-kwargs: {err}") from None
        p.method_kwargs = knobs
    if args.recipe_only:
        p.taus, p.variants, p.baselines = (), {}, ()
    out = Path(args.out) if args.out else Path("benchmarks/results") / f"tofu-{p.name}"
    results = run(p, Path(args.cache), out, workers=args.workers, resume=args.resume)
    print(markdown(results["default_recipe"]["tofu"], results["matched"], results["frontier_wins"]["tofu"], p,
                   results["rows"], results["time_against_first_order"]))


if __name__ == "__main__":
    main()
