"""The frontier benchmark: every method's privacy–utility curve on canaries and on QA, over seeds.

For each benchmark (the demo's canaries; the TOFU-style QA set of `lightning_unlearn.qa_experiment`) and each seed
(data, canaries and initialisation), the original and the retrained model are trained (or loaded from the cache),
then every method sweeps its main knob:

- second order (K-FAC Newton, the project's default recipe; diagonal; CG; the seed paper's Fisher Removal and Fisher
  Forgetting with the Woodbury inverse): the target, as the forget score to reach against the holdout (`target_score`
  τ: 0.5 is the default rule, the forget set at the holdout's median) under the default retain budget and, for K-FAC,
  the relative damping ρ and the retain budget; plus the default recipe itself (no knob set);
- first order (gradient ascent, gradient difference, NPO): learning rate × steps (checkpoints along each run).

Every point is evaluated (privacy and utility), so each method gives a curve; `frontier.py` compares them at
matched privacy levels. Curvatures are fitted once per seed and backend and shared by that backend's runs (a run
does not modify its curvature). Numbers only: no forget text reaches a row.

Every unlearning row also carries its cost (`COST_KEYS`), evaluation excluded: `seconds`, `fwd_bwd_seconds` (one
forward+backward of the original model over the forget set plus the method's curvature batches; first order: the
forget set), `time_over_fwd_bwd`, `time_over_retrain` (over the retrained model's training seconds) and
`forward_examples`/`backward_examples` (`benchmarks.request_cost.count_request_passes`). A shared curvature fit is
added to the seconds and examples of every run that uses it and recorded on its own as `curvature_seconds`,
`curvature_forward_examples`, `curvature_backward_examples`. The default recipe's row has the per-phase `breakdown`
of its request (`benchmarks.request_cost.profiled_request`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.frontier import fastest_rivals, rival_cell
from benchmarks.passes import fwd_bwd_seconds
from benchmarks.request_cost import breakdown_markdown, count_request_passes, mean_breakdown, profiled_request
from lightning_unlearn.demo import DEFAULT_SETTINGS
from lightning_unlearn.methods import build_curvature, build_unlearner
from lightning_unlearn.methods.newton import DEFAULT_RELATIVE_DAMPING

#: the version of what a row holds (part of the key of saved points: rows of another version are measured again)
ROWS_VERSION = 2
#: the first-order baselines the default recipe's curve is compared with (`frontier_wins`)
FIRST_ORDER = ("gradient_ascent", "gradient_difference", "npo")


@dataclass
class SecondOrderPlan:
    """One second-order curve: a method, a backend, its extra knobs, and the target fractions τ to sweep."""

    label: str
    method: str
    backend: str
    taus: Sequence[float]
    batches: int = 8
    kwargs: dict[str, Any] = field(default_factory=dict)
    curvature_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class FirstOrderPlan:
    """One first-order curve: learning rates × checkpoints (steps) along each run, per forget objective."""

    label: str
    method: str
    lrs: Sequence[float]
    checkpoints: Sequence[int]
    losses: Sequence[str] = ("unlikelihood",)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    second_order: list[SecondOrderPlan]
    first_order: list[FirstOrderPlan]
    #: relative dampings ρ swept for K-FAC at τ = 0.5
    kfac_rhos: Sequence[float] = (0.01, 1.0)
    #: retain budgets (`max_retain_increase`) swept for K-FAC at τ = 0.5 (the others run with the default 0.05)
    kfac_budgets: Sequence[float] = (0.02, 0.15, 0.4)


def default_plan(small: bool = False) -> Plan:
    """The sweep of `cpu-small` (or a tiny one for the smoke test)."""
    if small:
        return Plan(
            second_order=[SecondOrderPlan("newton_kfac", "newton", "kfac", (0.35, 0.5), batches=2),
                          SecondOrderPlan("fisher_removal", "fisher_removal", "woodfisher", (0.5,), batches=1)],
            first_order=[FirstOrderPlan("gradient_ascent", "gradient_ascent", (1e-3,), (2, 4))],
            kfac_rhos=(1.0,), kfac_budgets=(0.2,))
    taus = (0.35, 0.5, 0.65)
    steps = (10, 40)
    return Plan(
        second_order=[
            SecondOrderPlan("newton_kfac", "newton", "kfac", taus),
            SecondOrderPlan("newton_kfac_nll", "newton", "kfac", (0.5,), kwargs={"forget_loss": "nll"}),
            SecondOrderPlan("newton_diagonal", "newton", "diagonal", (0.5,)),
            # CG solves one system per protected holdout group: 2 groups keep its cost within reach on 2 cores
            SecondOrderPlan("newton_cg", "newton", "cg", (0.5,), batches=2, curvature_kwargs={"max_iter": 10},
                            kwargs={"protect_groups": 2}),
            SecondOrderPlan("fisher_removal", "fisher_removal", "woodfisher", (0.5, 0.65), batches=4),
            SecondOrderPlan("fisher_forgetting", "fisher_forgetting", "woodfisher", (0.5,), batches=4,
                            kwargs={"mu": 1e-8}),
        ],
        first_order=[
            FirstOrderPlan("gradient_ascent", "gradient_ascent", (1e-4, 3e-4, 1e-3), steps,
                           losses=("unlikelihood", "nll")),
            FirstOrderPlan("gradient_difference", "gradient_difference", (3e-4, 1e-3), steps),
            FirstOrderPlan("npo", "npo", (3e-4, 1e-3), steps),
        ],
        kfac_budgets=(0.15, 0.4),
    )


# ---------------------------------------------------------------------------------------------------- metrics
def privacy_row(kind: str, result: dict[str, float], before_ppl: float) -> dict[str, Any]:
    """The numbers a frontier needs from one evaluation (canaries: `Experiment.evaluate`; qa: `QAExperiment`)."""
    ppl = float(result.get("test/perplexity", float("nan")))
    row: dict[str, Any] = {"test_perplexity": ppl, "dppl_percent": 100.0 * (ppl / before_ppl - 1.0),
                           "forget_loss": result.get("forget/loss")}
    if kind == "canaries":
        row.update(exposure=result.get("exposure/mean"), mia_auc=result.get("mia/loss/auroc"),
                   ks_p=result.get("forget_quality"))
    else:
        row.update(mia_auc=result.get("mia/auc"), ks_p=result.get("forget_quality/ks_p"),
                   paraphrase_loss=result.get("paraphrase/loss"), retain_loss=result.get("retain/loss"),
                   holdout_loss=result.get("holdout/loss"))
    return row


def _mean_loss(model: torch.nn.Module, batches: Sequence[dict]) -> float:
    from lightning_unlearn.methods.losses import mean_nll

    s, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            bs, bn = mean_nll(model, b)
            s, n = s + float(bs), n + bn
    return s / max(n, 1)


# ---------------------------------------------------------------------------------------------------- one seed
def seed_rows(kind: str, exp: Any, plan: Plan, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every point of every method for one experiment (one benchmark, one seed)."""
    seed = exp.config.seed
    original = exp.train("full").eval()
    retrained = exp.train("retain").eval()
    forget, holdout, held = exp.forget_batches(), exp.holdout_batches(), exp.held_retain_batch()
    retain = exp.retain_batches(max(p.batches for p in plan.second_order))
    f0, h0 = _mean_loss(original, forget), _mean_loss(original, holdout)
    say(f"{kind} seed {seed}: forget loss {f0:.3f}, holdout loss {h0:.3f}; evaluating original and retrained")
    before = exp.evaluate(original, reference=retrained)
    before_ppl = float(before["test/perplexity"])
    base = {"benchmark": kind, "seed": seed, "forget_examples": sum(int(b["input_ids"].shape[0]) for b in forget)}
    retrain_seconds = exp.timings.get("retrain_seconds")
    rows = [{**base, "method": "original", "knob": "-", **privacy_row(kind, before, before_ppl)},
            {**base, "method": "retrain", "knob": "-",
             **privacy_row(kind, exp.evaluate(retrained, reference=retrained), before_ppl),
             "seconds": retrain_seconds, "time_over_retrain": 1.0}]

    def point(method: str, knob: str, model: torch.nn.Module, **extra: Any) -> dict[str, Any]:
        row = {**base, "method": method, "knob": knob,
               **privacy_row(kind, exp.evaluate(model, reference=retrained), before_ppl), **extra}
        rows.append(row)
        privacy = f"exposure {row['exposure']:.2f}" if kind == "canaries" else f"ks_p {row['ks_p']:.3g}"
        say(f"  {method} {knob}: {privacy}, mia {row['mia_auc']:.3f}, ppl {row['dppl_percent']:+.2f} %")
        return row

    # the unit of `time_over_fwd_bwd`: one forward+backward over the forget set (first order) plus the method's
    # curvature batches (second order), measured here, in the process and under the load of the runs it divides
    units: dict[int, float] = {}

    def costs(seconds: float, passes: dict[str, int], curvature_batches: int) -> dict[str, Any]:
        if curvature_batches not in units:
            units[curvature_batches] = fwd_bwd_seconds(original, forget + retain[:curvature_batches])
        unit = units[curvature_batches]
        return {"seconds": seconds, "fwd_bwd_seconds": unit, "time_over_fwd_bwd": seconds / unit,
                "time_over_retrain": seconds / retrain_seconds if retrain_seconds else None,
                "forward_examples": passes["forward_examples"], "backward_examples": passes["backward_examples"]}

    # the default recipe: no knob set, the target calibrated on the holdout data; the demo's request (its settings,
    # 8 curvature batches) through the path of every driver, timed and counted per phase from outside
    model = copy.deepcopy(original)
    default_retain = retain[:8]
    result, cost = profiled_request(model, forget, default_retain, holdout, settings=DEFAULT_SETTINGS,
                                    held_retain=held)
    unlearner, summary = result.unlearner, result.summary
    curvature_phase = cost["breakdown"].get("curvature", {})
    point("newton_kfac", "default", model, default=True,
          **costs(cost["seconds"], cost, len(default_retain[:DEFAULT_SETTINGS.curvature_batches])),
          curvature_seconds=curvature_phase.get("seconds"),
          curvature_forward_examples=curvature_phase.get("forward_examples"),
          curvature_backward_examples=curvature_phase.get("backward_examples"), breakdown=cost["breakdown"],
          status=summary["status"], target=summary["target"], steps_accepted=summary["steps_accepted"],
          evaluations=summary.get("evaluations"), tau=unlearner.target_score, rho=DEFAULT_RELATIVE_DAMPING)

    for spec in plan.second_order:
        # fitted once and shared by this curve's runs: each run's seconds and passes include the fit's (also
        # recorded on its own as curvature_*)
        with count_request_passes(original) as counts:
            start = time.perf_counter()
            curvature = build_curvature(spec.backend, original, **spec.curvature_kwargs).fit(retain[:spec.batches])
            fit_seconds = time.perf_counter() - start
            fit_passes = counts.snapshot()
        budget = 0.05  # the default retain budget: without one a search can "reach" the target by wrecking the model
        knobs = [(DEFAULT_RELATIVE_DAMPING, tau, budget) for tau in spec.taus]
        if spec.label == "newton_kfac":
            knobs += [(rho, 0.5, budget) for rho in plan.kfac_rhos]
            knobs += [(DEFAULT_RELATIVE_DAMPING, 0.5, b) for b in plan.kfac_budgets]
        for rho, tau, budget in knobs:
            model = copy.deepcopy(original)
            if spec.backend == "cg":  # matrix-free: its batches are its state; products at the run's weights
                shared = curvature
                shared.model = model
            else:
                shared = build_curvature(spec.backend, model, **spec.curvature_kwargs)
                shared.load_state_dict(curvature.state_dict())
            unlearner = build_unlearner(spec.method, model, curvature=shared, damping=rho, target_score=tau,
                                        max_retain_increase=budget, **spec.kwargs)
            with count_request_passes(model) as counts:
                start = time.perf_counter()
                unlearner.fit(forget, retain[:spec.batches], held_retain_batch=held, holdout_batches=holdout)
                seconds = time.perf_counter() - start + fit_seconds
                passes = {k: v + fit_passes[k] for k, v in counts.snapshot().items()}
            summary = unlearner.summary()
            # ρ variants are their own curve: "ours" is the default recipe's ρ with the target and budget swept
            label = spec.label if rho == DEFAULT_RELATIVE_DAMPING else f"{spec.label}_rho"
            point(label, f"rho={rho:g} tau={tau:g} budget={budget:g}", model, **costs(seconds, passes, spec.batches),
                  curvature_seconds=fit_seconds, curvature_forward_examples=fit_passes["forward_examples"],
                  curvature_backward_examples=fit_passes["backward_examples"], status=summary["status"],
                  steps_accepted=summary["steps_accepted"], evaluations=summary.get("evaluations"), tau=tau,
                  rho=rho, budget=budget)

    for spec in plan.first_order:
        for loss in spec.losses:
            for lr in spec.lrs:
                model = copy.deepcopy(original)
                kwargs: dict[str, Any] = dict(lr=lr, steps=1, forget_loss=loss, max_retain_increase=None,
                                              **spec.kwargs)
                counted = [model]
                if spec.method == "npo":
                    kwargs["reference"] = copy.deepcopy(original)
                    counted.append(kwargs["reference"])  # its forward passes are part of NPO's cost
                unlearner = build_unlearner(spec.method, model, **kwargs)
                torch.manual_seed(seed)
                done, seconds, spent = 0, 0.0, dict.fromkeys(("forward_examples", "backward_examples"), 0)
                for checkpoint in spec.checkpoints:  # the evaluations between checkpoints are neither timed nor counted
                    with ExitStack() as stack:
                        counts = [stack.enter_context(count_request_passes(m)) for m in counted]
                        start = time.perf_counter()
                        for i in range(done, checkpoint):
                            unlearner.step(forget, [retain[i % len(retain)]], held)
                        seconds += time.perf_counter() - start
                        for c in counts:
                            for k in spent:
                                spent[k] += c[k]
                    done = checkpoint
                    knob = f"lr={lr:g} steps={checkpoint}" + ("" if loss == "unlikelihood" else f" {loss}")
                    point(spec.label, knob, model, **costs(seconds, spent, 0), lr=lr, steps=checkpoint,
                          forget_loss_kind=loss)
    for row in rows:
        row.setdefault("forget_loss_before", f0)
        row.setdefault("holdout_loss_before", h0)
    return rows


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))


def as_dict(plan: Plan) -> dict[str, Any]:
    return dataclasses.asdict(plan)


# ---------------------------------------------------------------------------------------------------- analysis
#: matched privacy levels: canaries in bits above the retrained model's exposure; QA in MIA AUC above the retrained
#: model's, and forget quality (KS p >= 0.05, as privacy 1 - p <= 0.95)
CANARY_LEVELS = (0.0, 0.25, 0.5)
QA_AUC_LEVELS = (0.0, 0.05)
QA_KS_LEVEL = 0.95
BUDGETS = (0.5, 1.0, 2.0)
OURS = "newton_kfac"


def _mean_sd(values: Sequence[float]) -> dict[str, float | None]:
    vals = [float(v) for v in values if finite(v)]
    if not vals:
        return {"mean": None, "sd": None}
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"mean": mean, "sd": sd}


def _retrain(rows: Sequence[dict], key: str) -> dict[Any, float]:
    return {r["seed"]: float(r[key]) for r in rows if r["method"] == "retrain"}


#: the cost fields of every unlearning row (see `seed_rows`); the default recipe's means join `default_recipe`
COST_KEYS = ("seconds", "fwd_bwd_seconds", "time_over_fwd_bwd", "time_over_retrain", "forward_examples",
             "backward_examples")


def default_recipe(kind: str, rows: Sequence[dict]) -> dict[str, Any]:
    """The default recipe's numbers per seed and their mean ± sd (the keys of `results.json`'s `default_recipe`),
    with its cost (`COST_KEYS`, means over seeds) and the per-phase `breakdown` (mean over seeds; each seed's in
    `per_seed`)."""
    retrain_exposure = _retrain(rows, "exposure") if kind == "canaries" else {}
    per_seed = []
    for r in rows:
        if not r.get("default"):
            continue
        entry = {"seed": r["seed"], "forget_examples": r.get("forget_examples"), "mia_auc": r["mia_auc"],
                 "ks_p": r["ks_p"], "dppl_percent": r["dppl_percent"],
                 "status": r.get("status"), "target": r.get("target"), "forget_loss": r.get("forget_loss"),
                 "steps_accepted": r.get("steps_accepted"), "evaluations": r.get("evaluations"),
                 **{key: r.get(key) for key in COST_KEYS}, "breakdown": r.get("breakdown")}
        if kind == "canaries":
            entry["exposure_gap_bits"] = float(r["exposure"]) - retrain_exposure[r["seed"]]
        per_seed.append(entry)
    keys = ["mia_auc", "ks_p", "dppl_percent"] + (["exposure_gap_bits"] if kind == "canaries" else []) + list(COST_KEYS)
    out: dict[str, Any] = {"seeds": [e["seed"] for e in per_seed], "per_seed": per_seed}
    for key in keys:
        stats = _mean_sd([e[key] for e in per_seed])
        out[key] = stats["mean"]
        out[f"{key}_sd"] = stats["sd"]
    breakdowns = [e["breakdown"] for e in per_seed if e.get("breakdown")]
    out["breakdown"] = mean_breakdown(breakdowns) if breakdowns else {}
    return out


def targets(kind: str, recipe: dict[str, Any], wins: dict[str, bool]) -> dict[str, dict[str, Any]]:
    """The targets for the default recipe, each with the measured value and whether it is met."""
    def check(value: Any, bound: float, lower: bool = True) -> dict[str, Any]:
        met = finite(value) and (float(value) <= bound if lower else float(value) >= bound)
        return {"value": value, "bound": bound, "met": bool(met)}

    out = {"mia_auc<=0.55": check(recipe.get("mia_auc"), 0.55),
           "ks_p>=0.05": check(recipe.get("ks_p"), 0.05, lower=False),
           "dppl_percent<=1": check(recipe.get("dppl_percent"), 1.0)}
    if kind == "canaries":
        gap = recipe.get("exposure_gap_bits")
        out["|exposure_gap_bits|<=0.25"] = check(abs(gap) if finite(gap) else gap, 0.25)
    out["frontier_wins_all"] = {"value": wins, "bound": "all true", "met": bool(wins) and all(wins.values())}
    return out


def chosen_vs_best(kind: str, rows: Sequence[dict]) -> list[dict[str, Any]]:
    """Per seed: the target score τ of the default rule (0.5) against the τ that maximises forget quality as
    measured against the retrained model (canaries: exposure closest to the retrained model's; QA: highest KS p)."""
    out = []
    retrain_exposure = _retrain(rows, "exposure") if kind == "canaries" else {}
    for seed in sorted({r["seed"] for r in rows}):
        sweep = [r for r in rows if r["seed"] == seed and r["method"] == OURS and r.get("tau") is not None
                 and not r.get("default")]
        if not sweep:
            continue
        if kind == "canaries":
            best = min(sweep, key=lambda r: abs(float(r["exposure"]) - retrain_exposure[seed]))
        else:
            best = max(sweep, key=lambda r: float(r["ks_p"]) if finite(r["ks_p"]) else -1.0)
        out.append({"seed": seed, "rule_tau": 0.5, "best_tau": best["tau"], "best_dppl_percent": best["dppl_percent"],
                    "best_mia_auc": best["mia_auc"], "best_ks_p": best["ks_p"]})
    return out


def analyse(kind: str, rows: Sequence[dict], frontier_mod: Any) -> dict[str, Any]:
    """Matched tables, wins against the first-order baselines, the default recipe and its targets."""
    methods = sorted({r["method"] for r in rows} - {"original", "retrain"})
    others = [m for m in FIRST_ORDER if m in methods]
    point_rows = [r for r in rows if r["method"] != "retrain"]
    tables: dict[str, Any] = {}
    if kind == "canaries":
        tables["exposure"] = frontier_mod.matched_table(point_rows, CANARY_LEVELS, BUDGETS, privacy_key="exposure",
                                                        reference=_retrain(rows, "exposure"), shared=("original",))
    else:
        tables["mia_auc"] = frontier_mod.matched_table(point_rows, QA_AUC_LEVELS, BUDGETS, privacy_key="mia_auc",
                                                       reference=_retrain(rows, "mia_auc"), shared=("original",))
        ks_rows = [{**r, "ks_privacy": 1.0 - float(r["ks_p"]) if finite(r.get("ks_p")) else None} for r in point_rows]
        tables["ks"] = frontier_mod.matched_table(ks_rows, (QA_KS_LEVEL,), BUDGETS, privacy_key="ks_privacy",
                                                  shared=("original",))
    detail = {name: frontier_mod.frontier_wins_detail(t, OURS, others) for name, t in tables.items()}
    wins = {m: all(frontier_mod.frontier_wins(t, OURS, [m])[m] for t in tables.values()) for m in others}
    recipe = default_recipe(kind, rows)
    return {"methods": methods, "tables": tables, "wins_detail": detail, "frontier_wins": wins,
            "default_recipe": recipe, "targets": targets(kind, recipe, wins),
            "chosen_vs_best": chosen_vs_best(kind, rows),
            "time_against_first_order": time_against_first_order(kind, rows)}


def time_against_first_order(kind: str, rows: Sequence[dict]) -> dict[str, Any]:
    """Per seed: the default request's seconds against the fastest first-order point that reaches the same privacy
    (exposure on canaries, MIA AUC on QA: at most the default's) at the same or better utility (Δ test perplexity at
    most the default's); first-order checkpoints are timed from their run's start (`frontier.fastest_rivals`).
    `fastest` None: no first-order point of the sweep does, at any price. `default_faster` counts the seeds where the
    request is faster than it, or it has none."""
    key = "exposure" if kind == "canaries" else "mia_auc"

    def matches(mine: dict, r: dict) -> bool:
        return finite(r.get(key)) and r[key] <= mine[key] and r["dppl_percent"] <= mine["dppl_percent"]

    per_seed = fastest_rivals([r for r in rows if r.get("default")], rows, FIRST_ORDER, matches,
                              own=(key, "dppl_percent"), theirs=(key, "dppl_percent"))
    faster = [e for e in per_seed if e["fastest"] is None or e["seconds"] < e["fastest"]["seconds"]]
    return {"privacy": key, "per_seed": per_seed, "default_faster": len(faster), "seeds": len(per_seed)}


# ---------------------------------------------------------------------------------------------------- orchestration
def make_experiment(kind: str, config: Any, cache: str, progress: bool = False) -> Any:
    """The canary `Experiment` or the `QAExperiment` for `config`, caching models under `<cache>/<kind>`."""
    from pathlib import Path

    if kind == "canaries":
        from lightning_unlearn.experiment import Experiment

        return Experiment(config, Path(cache) / "canaries", progress=progress)
    from lightning_unlearn.qa_experiment import QAExperiment

    return QAExperiment(config, Path(cache) / "qa", progress=progress)


def _points_file(kind: str, config: Any, cache: str, small: bool) -> Any:
    """Where a finished task's rows are kept (per experiment and plan), so an interrupted run can be resumed."""
    import hashlib
    import json
    from pathlib import Path

    blob = {"plan": as_dict(default_plan(small)), "rows": ROWS_VERSION}
    plan = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()
    return Path(cache) / "frontier_points" / f"{kind}-{config.key()}-{plan[:10]}.json"


def _task(kind: str, config: Any, cache: str, small: bool, threads: int, resume: bool = False) -> list[dict[str, Any]]:
    """One (benchmark, seed) in a worker process; messages go to stderr with the task's name. Its rows are saved
    under the cache (`resume=True` takes them from there instead of measuring again)."""
    import json
    import sys

    path = _points_file(kind, config, cache, small)
    if resume and path.exists():
        return json.loads(path.read_text())

    from lightning_unlearn.demo import quiet_libraries

    torch.set_num_threads(threads)
    quiet_libraries()
    start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{kind} {config.seed} {time.perf_counter() - start:5.0f} s] {msg}", file=sys.stderr, flush=True)

    exp = make_experiment(kind, config, cache)
    rows = seed_rows(kind, exp, default_plan(small), say)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows))
    tmp.replace(path)
    return rows


def run_frontier(configs: dict[str, Sequence[Any]], cache: str, *, small: bool = False, workers: int = 2,
                 say: Callable[[str], None] = print, resume: bool = False) -> dict[str, Any]:
    """Run every (benchmark, seed) task (`workers` processes, 1 torch thread each when parallel) and analyse.

    Returns {"rows": {kind: rows}, "analysis": {kind: analyse(...)}, "plots": {name: png bytes}}.
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from benchmarks import frontier as frontier_mod

    tasks = [(kind, cfg) for kind, cfgs in configs.items() for cfg in cfgs]
    # tasks that still train their models first: the cached ones fill the other worker meanwhile
    tasks.sort(key=lambda t: (make_experiment(t[0], t[1], cache).cache / "retrained" / "training.json").exists())
    rows: dict[str, list[dict]] = {kind: [] for kind in configs}
    if workers <= 1:
        for kind, cfg in tasks:
            rows[kind] += _task(kind, cfg, cache, small, torch.get_num_threads(), resume)
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [(kind, pool.submit(_task, kind, cfg, cache, small, 1, resume)) for kind, cfg in tasks]
            for kind, fut in futures:
                rows[kind] += fut.result()
    analysis, plots = {}, {}
    for kind, kind_rows in rows.items():
        analysis[kind] = analyse(kind, kind_rows, frontier_mod)
        point_rows = [r for r in kind_rows if r["method"] != "retrain"]
        if kind == "canaries":
            plots[f"frontier_{kind}.png"] = frontier_mod.plot_frontiers(
                point_rows, privacy_key="exposure", shared=("original",), reference=_retrain(kind_rows, "exposure"),
                title="canaries: exposure vs Δ test perplexity (mean ± sd over seeds)",
                privacy_label="inserted-canary exposure (bits, lower is better)")
        else:
            plots[f"frontier_{kind}.png"] = frontier_mod.plot_frontiers(
                point_rows, privacy_key="mia_auc", shared=("original",), reference=_retrain(kind_rows, "mia_auc"),
                title="QA: MIA AUC vs Δ test perplexity (mean ± sd over seeds)",
                privacy_label="MIA AUC, forget vs holdout (lower is better)")
    return {"rows": rows, "analysis": analysis, "plots": plots}


def _cell(v: Any, fmt: str = ".3g") -> str:
    return format(float(v), fmt) if finite(v) else "–"


def markdown(frontier: dict[str, Any]) -> str:
    """The frontier part of results.md."""
    from benchmarks import frontier as frontier_mod

    lines = ["## The default recipe", "",
             "One K-FAC Newton recipe with no knob set (relative damping ρ = 0.1, step-length search to the target "
             "calibrated on holdout data, up to 5 steps). Mean ± sd over seeds.", "",
             "| benchmark | seeds | exposure − retrained (bits) | MIA AUC | KS p | Δ test ppl % | status | seconds | "
             "time / fwd+bwd | time / retrain |", "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, a in frontier["analysis"].items():
        r = a["default_recipe"]

        def ms(key: str, fmt: str = ".3g", r: dict = r) -> str:
            sd = r.get(f"{key}_sd")
            return _cell(r.get(key), fmt) + (f" ± {_cell(sd, fmt)}" if finite(sd) else "")

        statuses = ", ".join(str(e["status"]) for e in r["per_seed"])
        lines.append(f"| {kind} | {len(r['seeds'])} | {ms('exposure_gap_bits', '+.2f') if kind == 'canaries' else '–'}"
                     f" | {ms('mia_auc', '.3f')} | {ms('ks_p', '.3g')} | {ms('dppl_percent', '+.2f')} | {statuses} | "
                     f"{ms('seconds', '.3g')} | {ms('time_over_fwd_bwd', '.3g')} | {ms('time_over_retrain', '.3g')} |")
    lines += ["", "Time of the request (evaluation excluded) over one forward+backward of the original model over the "
              "forget set and the curvature batches, measured in the same process, and over the retrained model's "
              "training time.", "", "### Cost of the default request per phase", "",
              "Mean over seeds; a phase called inside another counts in the outer one; `other` is the rest of the "
              "request (solves and projection outside `newton_direction`, snapshots, checks). Forward examples are "
              "counted at the input embedding, backward examples at the output logits."]
    for kind, a in frontier["analysis"].items():
        r = a["default_recipe"]
        if r.get("breakdown"):
            lines += ["", f"**{kind}** ({_cell(r.get('seconds'), '.3g')} s, {_cell(r.get('forward_examples'), '.0f')} "
                      f"forward / {_cell(r.get('backward_examples'), '.0f')} backward examples):", ""]
            lines += breakdown_markdown(r["breakdown"], r.get("seconds"))
    lines += ["", "### Targets", "", "| benchmark | target | measured | met |", "|---|---|---|---|"]
    for kind, a in frontier["analysis"].items():
        for name, t in a["targets"].items():
            value = t["value"] if isinstance(t["value"], dict) else _cell(t["value"])
            lines.append(f"| {kind} | {name} | {value} | {'yes' if t['met'] else 'no'} |")
    for kind, a in frontier["analysis"].items():
        lines += ["", f"## Frontier: {kind}", "",
                  f"Wins of `{OURS}` (the default recipe's curve: the target swept) against each first-order "
                  "baseline (its Δ perplexity at every matched privacy level at most half the baseline's best): "
                  + ", ".join(f"{m}: {'yes' if w else 'no'}" for m, w in a["frontier_wins"].items()), ""]
        for name, table in a["tables"].items():
            lines += [f"### matched on {name}", "", frontier_mod.markdown_table(table), ""]
            for other, detail in a["wins_detail"][name].items():
                lines.append(f"- vs {other}: " + "; ".join(
                    f"level {d.get('level')}: ours {_cell(d.get('ours'))} vs {_cell(d.get('theirs'))} "
                    f"({d.get('outcome')})" for d in detail))
            lines.append("")
        timing = a.get("time_against_first_order")
        if timing:
            key = timing["privacy"]
            lines += [f"Time against first order: per seed, the default request against the fastest first-order "
                      f"point with at most its {key} and its Δ perplexity (- = no such point):", "",
                      f"| seed | default: {key}, Δppl %, seconds | fastest first order: knob, seconds, {key}, "
                      "Δppl % |",
                      "|---|---|---|"]
            for e in timing["per_seed"]:
                rival = rival_cell(e["fastest"], {key: ".3g", "dppl_percent": "+.2f"})
                lines.append(f"| {e['seed']} | {_cell(e[key])}, {_cell(e['dppl_percent'], '+.2f')}, "
                             f"{_cell(e['seconds'])} | {rival} |")
            lines.append("")
        lines += ["Target picked by the default rule (forget score τ = 0.5 against the holdout) against the τ "
                  "that best matches the retrained model:", "",
                  "| seed | best τ | its Δppl % | its MIA AUC | its KS p |", "|---|---|---|---|---|"]
        for c in a["chosen_vs_best"]:
            lines.append(f"| {c['seed']} | {c['best_tau']} | {_cell(c['best_dppl_percent'], '+.2f')} | "
                         f"{_cell(c['best_mia_auc'], '.3f')} | {_cell(c['best_ks_p'])} |")
    lines += ["", "### Every point", "", "Seconds and examples of second-order runs include their curvature fit "
              "(shared by a curve's runs); first-order checkpoints count every step up to them.", "",
              "| benchmark | seed | method | knob | exposure | MIA AUC | KS p | Δppl % | status | seconds | "
              "/ fwd+bwd | / retrain | fwd ex. | bwd ex. |", "|" + "---|" * 14]
    for kind, kind_rows in frontier["rows"].items():
        for r in kind_rows:
            lines.append(f"| {kind} | {r['seed']} | {r['method']} | {r['knob']} | {_cell(r.get('exposure'), '.2f')} | "
                         f"{_cell(r.get('mia_auc'), '.3f')} | {_cell(r.get('ks_p'))} | "
                         f"{_cell(r.get('dppl_percent'), '+.2f')} | {r.get('status') or '–'} | "
                         f"{_cell(r.get('seconds'), '.2f')} | {_cell(r.get('time_over_fwd_bwd'), '.3g')} | "
                         f"{_cell(r.get('time_over_retrain'), '.2g')} | {_cell(r.get('forward_examples'), '.0f')} | "
                         f"{_cell(r.get('backward_examples'), '.0f')} |")
    return "\n".join(lines) + "\n"
