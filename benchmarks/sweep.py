"""The single-seed method sweep of `benchmarks.run`: every setting of a preset run through `serve_request` on a copy
of the original model, its metrics against the retrained model, the time to forget per method, and the targets."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.measure import PeakRSS, param_bytes
from benchmarks.passes import fwd_bwd_seconds
from benchmarks.presets import SECOND_ORDER, Preset
from lightning_unlearn.experiment import Experiment
from lightning_unlearn.request import serve_request
from lightning_unlearn.settings import UnlearnSettings


def settings_text(s: UnlearnSettings) -> str:
    """A short human label of a setting (numbers and names only)."""
    parts = []
    if s.method in SECOND_ORDER:
        parts += [f"λ={s.damping:g}", f"η={s.scale:g}", f"curv_batches={s.curvature_batches}"]
    else:
        parts += [f"lr={s.method_kwargs.get('lr', 0):g}"]
    parts += [f"steps≤{s.steps}" if s.forget_target is not None else f"steps={s.steps}", s.forget_loss]
    parts += [f"{k}={v:g}" for k, v in s.method_kwargs.items() if k in ("mu",)]
    return " ".join(parts)


def run_method(exp: Experiment, original: torch.nn.Module, settings: UnlearnSettings) -> dict[str, Any]:
    """One request through `serve_request` (the path of every driver) on a copy of `original`, with no holdout
    target (the sweep's settings set their own stop), its peak memory sampled; the method is kept for its
    curvature's footprint."""
    model = copy.deepcopy(original).eval()
    forget = exp.forget_batches()
    retain = exp.retain_batches(settings.curvature_batches)
    held = exp.held_retain_batch()
    curvature_batches = retain if settings.method in SECOND_ORDER else []
    fwd_bwd = fwd_bwd_seconds(model, forget + curvature_batches)
    torch.manual_seed(exp.config.seed)
    with PeakRSS() as mem:
        start = time.perf_counter()
        result = serve_request(model, forget, retain, settings=settings, held_retain=held)
        seconds = time.perf_counter() - start
    history, unlearner = list(result), result.unlearner
    curvature = getattr(unlearner, "curvature", None)
    out: dict[str, Any] = {
        "unlearn_seconds": seconds, "fwd_bwd_seconds": fwd_bwd, "peak_rss_mb": mem.peak_mb,
        "peak_rss_delta_mb": mem.delta_mb,
        "steps_accepted": sum(r.accepted for r in history), "rollbacks": sum(not r.accepted for r in history),
        "final_damping": history[-1].damping if history else None, "stop_reason": history[-1].reason,
        "curvature_memory_mb": None, "curvature_memory_over_params": None,
    }
    if curvature is not None:
        total = curvature.memory_footprint()["total"]
        out["curvature_memory_mb"] = total / 2**20
        out["curvature_memory_over_params"] = total / param_bytes(model, curvature.param_names)
    return {"model": model, **out}


def metrics_row(result: dict[str, float], before_ppl: float) -> dict[str, Any]:
    ppl = result.get("test/perplexity", float("nan"))
    return {
        "exposure_inserted": result.get("exposure/mean"),
        "exposure_reference": result.get("exposure/reference_mean"),
        "mia_auc": result.get("mia/loss/auroc"),
        "mia_auc_min_k": result.get("mia/min_k/auroc"),
        "privleak": result.get("mia/loss/privleak"),
        "forget_quality": result.get("forget_quality"),
        "extraction_strength": result.get("forget/extraction_strength"),
        "forget_span_nll": result.get("forget/loss"),
        "test_perplexity": ppl,
        "test_perplexity_change_pct": 100.0 * (ppl / before_ppl - 1.0),
    }


def retrained_forget_nll(exp: Experiment, retrained: torch.nn.Module) -> float:
    """Mean token NLL of the retrained model on the forget spans: the cheap stopping target of iterative runs."""
    from lightning_unlearn.methods.losses import mean_nll

    s, n = 0.0, 0
    with torch.no_grad():
        for b in exp.forget_batches():
            bs, bn = mean_nll(retrained, b)
            s, n = s + float(bs), n + bn
    return s / max(n, 1)


def method_rows(exp: Experiment, preset: Preset, say: Callable[[str], None],
                on_row: Callable[[list[dict]], None] | None = None) -> tuple[list[dict], dict]:
    original = exp.train("full")
    retrained = exp.train("retain")
    retrain_seconds = exp.timings["retrain_seconds"]
    target = retrained_forget_nll(exp, retrained)
    # retraining's compute, measured in this process (so under the same machine load as the unlearning runs):
    # train_steps x one forward+backward on a training batch (optimizer step excluded: an underestimate)
    train_batch = next(iter(exp.data.dataloader("retain", shuffle=False)))
    retrain_same_process = exp.config.train_steps * fwd_bwd_seconds(copy.deepcopy(retrained), [train_batch])
    say(f"evaluating the original and the retrained model (retrain took {retrain_seconds:.0f} s)")
    before = exp.evaluate(original, reference=retrained)
    before_ppl = before["test/perplexity"]
    rows = [{"method": "original", "setting": "no unlearning", **metrics_row(before, before_ppl),
             "unlearn_seconds": 0.0}]
    after_retrain = exp.evaluate(retrained, reference=retrained)
    rows.append({"method": "retrain", "setting": f"{exp.config.train_steps} steps on the retain set",
                 **metrics_row(after_retrain, before_ppl), "unlearn_seconds": retrain_seconds,
                 "time_over_retrain": 1.0})
    level = after_retrain["exposure/mean"] + preset.level_bits
    for i, run in enumerate(preset.runs):
        settings = run.settings.replace(forget_target=target) if run.target else run.settings.replace()
        say(f"[{i + 1}/{len(preset.runs)}] {run.label}: {settings_text(settings)}")
        out = run_method(exp, original, settings)
        model = out.pop("model")
        result = exp.evaluate(model, reference=retrained)
        row = {"method": run.label, "setting": settings_text(settings),
               "hyperparameters": settings.to_dict(), **metrics_row(result, before_ppl), **out}
        row["time_over_fwd_bwd"] = out["unlearn_seconds"] / out["fwd_bwd_seconds"]
        row["time_over_retrain"] = out["unlearn_seconds"] / retrain_seconds
        row["time_over_retrain_same_process"] = out["unlearn_seconds"] / retrain_same_process
        row["reached_level"] = bool(row["exposure_inserted"] <= level)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        say(f"    exposure {row['exposure_inserted']:.2f} bits, ppl {row['test_perplexity_change_pct']:+.1f} %, "
            f"{row['unlearn_seconds']:.2f} s (x{row['time_over_fwd_bwd']:.1f} fwd+bwd)")
        del model
    context = {"retrain_seconds": retrain_seconds, "retrain_same_process_seconds": retrain_same_process,
               "train_seconds": exp.timings.get("train_seconds"),
               "forget_target_nll": target, "level_bits": preset.level_bits, "level_exposure": level,
               "retrain_exposure": after_retrain["exposure/mean"],
               "reference_exposure_original": before["exposure/reference_mean"],
               "n_forget_sequences": sum(int(b["input_ids"].shape[0]) for b in exp.forget_batches())}
    return rows, context


def time_to_forget(rows: list[dict], level: float) -> dict[str, dict]:
    """Per method: the fastest setting that brought the inserted exposure to `level` (or not reached)."""
    out: dict[str, dict] = {}
    for row in rows:
        m = row["method"]
        if m == "original":
            continue
        entry = out.setdefault(m, {"seconds": None, "setting": None, "exposure": None,
                                   "test_perplexity_change_pct": None, "best_exposure": math.inf})
        entry["best_exposure"] = min(entry["best_exposure"], row["exposure_inserted"])
        faster = entry["seconds"] is None or row["unlearn_seconds"] < entry["seconds"]
        if row["exposure_inserted"] <= level and faster:
            entry.update(seconds=row["unlearn_seconds"], setting=row["setting"], exposure=row["exposure_inserted"],
                         test_perplexity_change_pct=row["test_perplexity_change_pct"])
    return out


def targets(rows: list[dict], ttf: dict[str, dict], gpt2: dict[str, Any]) -> list[dict]:
    """The targets as measured ratios, each with `met` (True/False/None = not measurable)."""
    kfac = next((r for r in rows if r["method"] == "newton_kfac"), None)  # the first K-FAC row: the demo recipe
    out = []

    def add(name: str, value: Any, bound: str, met: bool | None, note: str = "") -> None:
        out.append({"target": name, "value": value, "bound": bound, "met": met, "note": note})

    if kfac is not None:
        add("K-FAC Newton time_over_fwd_bwd", kfac["time_over_fwd_bwd"], "<= 2", kfac["time_over_fwd_bwd"] <= 2,
            kfac["setting"])
        add("K-FAC Newton time_over_retrain", kfac["time_over_retrain"], "<= 0.01",
            kfac["time_over_retrain"] <= 0.01, kfac["setting"])
        add("K-FAC Newton time / retrain compute measured in the same process", kfac["time_over_retrain_same_process"],
            "<= 0.01", kfac["time_over_retrain_same_process"] <= 0.01,
            "retrain = train_steps x one fwd+bwd of a training batch (optimizer excluded), same machine load")
    k, ga = ttf.get("newton_kfac", {}), ttf.get("gradient_ascent", {})
    if k.get("seconds") is None:
        add("K-FAC time to forget <= 0.5 x gradient ascent's", None, "<= 0.5", False,
            f"K-FAC Newton did not reach the level (best {k.get('best_exposure', float('nan')):.2f} bits)")
    elif ga.get("seconds") is None:
        add("K-FAC time to forget <= 0.5 x gradient ascent's", None, "<= 0.5", True,
            f"gradient ascent did not reach the level (best {ga.get('best_exposure', float('nan')):.2f} bits)")
    else:
        ratio = k["seconds"] / ga["seconds"]
        add("K-FAC time to forget <= 0.5 x gradient ascent's", ratio, "<= 0.5", ratio <= 0.5)
    if k.get("seconds") is not None:
        ga_ppl = ga.get("test_perplexity_change_pct")
        add("K-FAC perplexity increase at the level < gradient ascent's", k["test_perplexity_change_pct"],
            f"< {ga_ppl:.2f} %" if ga_ppl is not None else "< gradient ascent's (not reached)",
            None if ga_ppl is None else k["test_perplexity_change_pct"] < ga_ppl)
    # the best documented option (benchmarks.kfac_memory.RECOMMENDED: keep_factors=False, wide_layer="block"),
    # from the shapes under KFAC's own rule (checked against a measured fit by `python -m benchmarks.kfac_memory`)
    from benchmarks.kfac_memory import RECOMMENDED, closed_form, gpt2_shapes

    for storage, elem, bound in (("fp32", 4, 3.0), ("bf16", 2, 1.5)):
        best = closed_form(gpt2_shapes(768, 12), RECOMMENDED, elem)
        add(f"K-FAC state / params, {storage}, GPT-2 small, keep_factors=False + wide_layer='block'", best,
            f"<= {bound:g}", best <= bound, f"default (factors kept, dense G): {gpt2[storage]['as_implemented']:.2f}x")
    return out
