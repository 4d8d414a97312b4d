"""`results.md` of `benchmarks.run`: the targets, the methods table, the time to forget, K-FAC's memory and the
scaling tables; and the writing of a run's results (plots, results.json, results.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks.request_cost import scaling_markdown


def _f(v: Any, fmt: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return format(v, fmt)
    return str(v)


COLUMNS = [("method", "method", ""), ("setting", "setting", ""), ("exposure_inserted", "exp. inserted (bits)", ".2f"),
           ("exposure_reference", "exp. ref (bits)", ".2f"), ("mia_auc", "MIA AUC", ".2f"),
           ("forget_quality", "KS p", ".2g"), ("extraction_strength", "extraction", ".2f"),
           ("test_perplexity_change_pct", "Δppl %", "+.1f"), ("unlearn_seconds", "seconds", ".3g"),
           ("time_over_fwd_bwd", "/fwd+bwd", ".2g"), ("time_over_retrain", "/retrain", ".2g"),
           ("peak_rss_delta_mb", "ΔRSS MiB", ".0f"), ("curvature_memory_over_params", "curv mem/params", ".2g"),
           ("final_damping", "final λ", ".3g"), ("rollbacks", "rollbacks", "d")]


def markdown(result: dict[str, Any]) -> str:
    ctx, rows = result["context"], result["methods"]
    lines = [f"# Benchmark results: preset `{result['preset']}`", "",
             f"{result['description']}. Reproduce: `{result['command']}` ({_f(result['runtime_seconds'], '.0f')} s on "
             f"{result['environment']['cpu_count']} CPU cores with {result['environment']['torch_threads']} torch "
             "threads; timings are wall-clock on a shared machine and noisy: compare ratios, not seconds).", "",
             f"Retrained model: inserted-canary exposure {ctx['retrain_exposure']:.2f} bits; the level counted as "
             f"forgotten is ≤ {ctx['level_exposure']:.2f} bits (retrained + {ctx['level_bits']:g}). Retraining took "
             f"{ctx['retrain_seconds']:.0f} s when it was trained "
             f"({_f(ctx.get('retrain_same_process_seconds'), '.0f')} s of forward+backward compute measured in this "
             "process). Iterative runs marked `steps≤N` stop when the forget-span NLL reaches "
             f"the retrained model's ({ctx['forget_target_nll']:.2f} nats).", "", "## Targets", "",
             "| target | measured | bound | met | note |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {_f(t['value'])} | {t['bound']} | {_f(t['met'])} | {t['note']} |")
    lines += ["", "## Methods", "", "| " + " | ".join(c[1] for c in COLUMNS) + " |",
              "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_f(r.get(k), fmt) for k, _, fmt in COLUMNS) + " |")
    lines += ["", "Columns: exposure of the inserted and of never-inserted reference canaries (bits, ↓); MIA AUC of "
              "the loss attack (inserted vs reference canaries, 0.5 = indistinguishable); KS p = forget quality "
              "(KS test of forget-span losses against the retrained model's, ↑); extraction strength (↓); Δppl = test "
              "perplexity change against the original model; seconds = unlearning wall time (retrain row: training "
              "time); /fwd+bwd = seconds over one forward+backward pass on the forget set plus the method's "
              "curvature batches; ΔRSS = peak resident memory increase during unlearning (psutil sampling); curv "
              "mem/params = `memory_footprint()['total']` over the bytes of the parameters the curvature covers.",
              "", "## Time to forget", "", "| method | seconds | setting | exposure | Δppl % | best exposure |",
              "|---|---|---|---|---|---|"]
    for m, t in result["time_to_forget"].items():
        lines.append(f"| {m} | {_f(t['seconds']) if t['seconds'] is not None else 'not reached'} | "
                     f"{t['setting'] or '–'} | {_f(t['exposure'], '.2f')} | "
                     f"{_f(t['test_perplexity_change_pct'], '+.1f')} | {_f(t['best_exposure'], '.2f')} |")
    lines += [""] + markdown_memory_scaling(result)
    return "\n".join(lines) + "\n"


def keep_memory_options(output: Path) -> None:
    """Put the "K-FAC memory options" section back into a freshly written results.md when `kfac_memory.json` (from
    `python -m benchmarks.kfac_memory`, about 2 minutes) is in `output`: a full run does not re-measure it."""
    from benchmarks import kfac_memory

    measured = output / "kfac_memory.json"
    if measured.exists():
        kfac_memory.write(json.loads(measured.read_text()), output)


def markdown_memory_scaling(result: dict[str, Any]) -> list[str]:
    """The K-FAC memory, scaling and plots sections of results.md."""
    g = result["gpt2_small_kfac_memory"]
    lines = ["## K-FAC memory on GPT-2-small shapes", "",
              f"{g['shape']}; {g['params_tracked'] / 1e6:.1f}M tracked parameters (embeddings and head skipped).", "",
              "| storage | as implemented (factors + eigenbasis) | eigenbasis only |", "|---|---|---|",
              f"| fp32 | {g['fp32']['as_implemented']:.2f}x | {g['fp32']['eigenbasis_only']:.2f}x |",
              f"| bf16 | {g['bf16']['as_implemented']:.2f}x | {g['bf16']['eigenbasis_only']:.2f}x |", "",
              f"Checked against a real accumulated one-block model {g['measured_one_block']['hidden']} wide: fp32 "
              f"{g['measured_one_block']['fp32']['as_implemented']:.3f}x measured vs "
              f"{g['measured_one_block']['fp32']['formula_as_implemented']:.3f}x from the shapes.", "",
              "## Scaling (random-init GPT-2, curvature fit + one solve)", "",
              f"Measured by: {result.get('scaling_source', 'this run')}. CG runs at most 10 iterations.", "",
              "| backend | hidden x layers | params | fit s | solve s | total / fwd+bwd | state MiB | state/params |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["scaling"]["model_size"]:
        lines.append(f"| {r['backend']} | {r['hidden']}x{r['layers']} | {r['params'] / 1e6:.2f}M | "
                     f"{r['fit_seconds']:.3g} | {r['solve_seconds']:.3g} | {r['seconds'] / r['fwd_bwd_seconds']:.2g} | "
                     f"{r['memory_mb']:.3g} | {r['memory_over_params']:.2g} |")
    lines += ["", "| backend | forget sequences | fit s | solve s | state MiB | state/params |",
              "|---|---|---|---|---|---|"]
    for r in result["scaling"]["forget_size"]:
        lines.append(f"| {r['backend']} | {r['n_forget']} | {r['fit_seconds']:.3g} | {r['solve_seconds']:.3g} | "
                     f"{r['memory_mb']:.3g} | {r['memory_over_params']:.2g} |")
    if result["scaling"].get("request"):
        lines += [""] + scaling_markdown(result["scaling"]["request"])
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in result["plots"]]
    return lines


def write_results(output: Path, result: dict[str, Any], plots: dict[str, bytes], md: str,
                  secrets: list[bytes]) -> None:
    """The plots, results.json and results.md of a run (atomic, checked for `secrets`), then the K-FAC memory options
    section (`keep_memory_options`)."""
    from lightning_unlearn.report import atomic_write, json_safe

    for name, data in plots.items():
        atomic_write(output / name, data, secrets)
    atomic_write(output / "results.json", json.dumps(json_safe(result), indent=1).encode(), secrets)
    atomic_write(output / "results.md", md.encode(), secrets)
    keep_memory_options(output)  # the K-FAC memory options section (benchmarks.kfac_memory)
