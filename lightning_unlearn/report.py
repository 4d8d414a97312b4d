"""The audit report of an unlearning run: `report.json`, `report.md` and PNG plots, written atomically.

The report holds metrics before / after unlearning (and for the retrained reference), the method, its
hyper-parameters, timings, the seed, library versions, and sha256 hashes of the forget set and of the weights before
and after. It never holds a forget text or a canary secret: pass them as `secrets=` and every file is checked
before it is written (a match raises instead of writing).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import platform
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io import atomic_file

# (pattern on the metric name, direction shown in the table, what "better" means after unlearning)
DIRECTIONS: tuple[tuple[str, str, str], ...] = (
    (r"^forget/(loss|perplexity)$", "↑", "the model no longer predicts the forget set"),
    (r"^(holdout|test)/(loss|perplexity)$", "↓", "utility on unseen data is kept"),
    (r"^forget/(extraction_strength|exact_memorization)$", "↓", "less of the forget set is regenerated greedily"),
    (r"^mia/.*/reference_auroc$", "·", "the retrained model's AUROC: the target level"),
    (r"^mia/.*/auroc$", "↓", "forget data less recognisable as members (0.5 = like unseen data)"),
    (r"^mia/.*/privleak$", "→0", "as private as the retrained model (0); > 0 under-, < 0 over-unlearning"),
    (r"^forget_quality$", "↑", "forget-set losses indistinguishable from the retrained model's (KS p-value)"),
    (r"^exposure/reference_mean$", "·", "exposure of never-inserted canaries: the target level"),
    (r"^exposure/", "↓", "canary secrets no more likely than random candidates"),
)


def direction(name: str) -> tuple[str, str]:
    """(arrow, meaning) of a metric name; `("", "")` for names without a known direction."""
    for pattern, arrow, meaning in DIRECTIONS:
        if re.search(pattern, name):
            return arrow, meaning
    return "", ""


def hash_state_dict(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 over a model's state_dict: names in sorted order, then each tensor's dtype, shape and raw bytes."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def hash_texts(texts: Iterable[str]) -> str:
    """sha256 of a set of texts, independent of their order (sorted per-text sha256 digests, duplicates kept)."""
    digests = sorted(hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that shape the numbers."""
    out = {"python": platform.python_version()}
    for lib in ("lightning-unlearn", "torch", "lightning", "transformers", "torchmetrics", "datasets", "scipy",
                "numpy"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def json_safe(value: Any) -> Any:
    """JSON-safe values: NaN/inf -> None, tensors -> numbers, unknown objects -> str."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def atomic_write(path: Path, data: bytes, secrets: Sequence[bytes]) -> Path:
    """Write through a temporary file in the same folder and `os.replace`, after checking for secrets."""
    for secret in secrets:
        if secret and secret in data:
            raise ValueError(f"refusing to write {path.name}: it would contain a forget text or canary secret; "
                             "remove texts from the metrics, hyper-parameters and names given to the report")
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return path


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _summary_markdown(report: dict[str, Any]) -> list[str]:
    """The headline table: one row per headline number, one column per model (before/after/retrain)."""
    columns = [c for c in ("before", "after", "retrain") if isinstance(report.get(c), Mapping)]
    if not columns:
        run = _run_lines(report)
        return ["## Summary", "", *run] if run else []
    names = list(dict.fromkeys(n for c in columns for n in report[c]))
    lines = ["## Summary", ""]
    lines += _run_lines(report)
    lines += ["| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| `{n}` | " + " | ".join(_fmt(report[c].get(n)) for c in columns) + " |" for n in names]
    return lines + ["", "## All metrics", ""]


def _run_lines(report: Mapping[str, Any]) -> list[str]:
    """How the unlearning run ended (`status`), what it aimed at (`target`) and where that came from
    (`target_source`), when the summary has them."""
    if not any(report.get(k) is not None for k in ("status", "target", "target_source")):
        return []
    return [f"- status: `{_fmt(report.get('status'))}`",
            f"- target: {_fmt(report.get('target'))} (source: `{_fmt(report.get('target_source'))}`)", ""]


def _markdown(report: dict[str, Any], plots: Sequence[str]) -> str:
    metrics = report["metrics"]
    columns = [c for c in ("before", "after", "reference") if metrics.get(c)]
    names = sorted({n for c in columns for n in metrics[c]}, key=lambda n: ("/canary/" in n, n))
    lines = [f"# Unlearning report: {report['method'] or 'unnamed method'}", ""]
    lines += _summary_markdown(report)
    lines += ["Direction: ↑ higher is better after unlearning, ↓ lower is better, →0 closer to 0 is better, "
              "· a reference level.", ""]
    lines += ["| metric | better | " + " | ".join(columns) + (" | Δ after−before |" if "before" in columns else " |"),
              "|---|:-:|" + "---:|" * len(columns) + ("---:|" if "before" in columns else "")]
    for name in names:
        arrow, _ = direction(name)
        row = [metrics[c].get(name) for c in columns]
        delta = ""
        if "before" in columns:
            b, a = metrics["before"].get(name), metrics["after"].get(name)
            delta = " | " + (_fmt(a - b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "–")
        lines.append(f"| `{name}` | {arrow} | " + " | ".join(_fmt(v) for v in row) + delta + " |")
    lines += ["", "## Run", "", f"- seed: {_fmt(report['seed'])}"]
    for key, value in report["hashes"].items():
        lines.append(f"- {key}: `{_fmt(value)}`")
    if report["timings_s"]:
        lines += ["", "## Timings (s)", "", "| phase | seconds |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in report["timings_s"].items()]
    if report["hyperparameters"]:
        lines += ["", "## Hyper-parameters", "", "```json", json.dumps(report["hyperparameters"], indent=2), "```"]
    lines += ["", "## Library versions", "", ", ".join(f"{k} {v}" for k, v in report["versions"].items())]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def figure_bytes(fig) -> bytes:
    """A matplotlib figure as PNG bytes (no software tag: the same figure gives the same bytes); closes it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def plot_exposure(before: Mapping[str, list] | None, after: Mapping[str, list]) -> bytes:
    """Exposure per inserted canary before/after, with the band of never-inserted reference canaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("before", before, "tab:red"), ("after", after, "tab:blue")]
    series = [(n, s, c) for n, s, c in series if s and s.get("exposure/canary")]
    first = series[0][1]
    inserted = [i for i, r in enumerate(first["exposure/repetitions"]) if r > 0]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(inserted) + 1.5), 3.8))
    width = 0.8 / len(series)
    for j, (label, s, color) in enumerate(series):
        ax.bar([i + j * width for i in range(len(inserted))], [s["exposure/exposure"][i] for i in inserted],
               width=width, color=color, label=f"{label} unlearning")
        refs = [e for e, r in zip(s["exposure/exposure"], s["exposure/repetitions"]) if r == 0]
        if refs:
            ax.axhspan(min(refs), max(refs), color=color, alpha=0.12, zorder=0)
            ax.axhline(sum(refs) / len(refs), color=color, ls="--", lw=1,
                       label=f"reference canaries ({label}), mean and range")
    ticks = [f"{first['exposure/canary'][i]}\n×{first['exposure/repetitions'][i]}" for i in inserted]
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(inserted))], ticks, fontsize=7,
                  rotation=30, ha="right")
    ax.set_ylabel("exposure (bits)")
    ax.set_xlabel("inserted canary (id, repetitions)")
    ax.set_title("Canary exposure: lower is better, the reference band is the target")
    ax.legend(fontsize=7)
    return figure_bytes(fig)


def plot_loss_histograms(panels: Mapping[str, Mapping[str, list]]) -> bytes:
    """Per-example loss histograms of forget vs holdout, one panel per model (before, after, reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3), sharex=True, squeeze=False)
    for ax, (title, per_example) in zip(axes[0], panels.items()):
        for split, color in (("forget", "tab:red"), ("holdout", "tab:gray")):
            values = [v for v in per_example.get(f"{split}/loss", []) if v == v]
            if values:
                ax.hist(values, bins=20, alpha=0.6, color=color, label=split, density=True)
        ax.set_title(title)
        ax.set_xlabel("mean token loss (nats)")
        ax.legend(fontsize=7)
    return figure_bytes(fig)


def plot_privacy_utility(runs: Sequence[Mapping[str, Any]], privacy: str, utility: str) -> bytes:
    """One point per run: utility (x) against privacy (y); lower-left is better for both defaults."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for run in runs:
        x, y = run["metrics"].get(utility), run["metrics"].get(privacy)
        if x is None or y is None:
            continue
        ax.scatter([x], [y])
        ax.annotate(str(run.get("name", "")), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{utility} ({direction(utility)[0]})")
    ax.set_ylabel(f"{privacy} ({direction(privacy)[0]})")
    ax.set_title("Privacy against utility")
    return figure_bytes(fig)


def write_report(
    out_dir: str | Path,
    *,
    after: Mapping[str, float],
    before: Mapping[str, float] | None = None,
    reference: Mapping[str, float] | None = None,
    method: str = "",
    hyperparameters: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
    seed: int | None = None,
    forget_sha256: str | None = None,
    weights_before_sha256: str | None = None,
    weights_after_sha256: str | None = None,
    runs: Sequence[Mapping[str, Any]] | None = None,
    secrets: Iterable[str] = (),
    privacy_metric: str | None = None,
    utility_metric: str = "test/perplexity",
    summary: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write `report.json`, `report.md` and PNG plots into `out_dir`; returns `{name: path}` of the files.

    `before` / `after` / `reference` are `evaluate` results (their `per_example` feed the plots). `runs`: several
    runs `{"name": str, "metrics": {...}}` for the privacy-utility scatter (`privacy_metric`, default the first of
    `exposure/mean`, `mia/min_k/auroc`, `mia/loss/auroc` present). `secrets`: forget texts and canary secrets that
    must appear in no file (checked before writing). `summary`: headline entries written at the top level of
    `report.json` (e.g. `curvature`, `timing`, and `before`/`after`/`retrain` dicts of headline numbers), shown first
    in `report.md`; they may not replace the standard keys.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    guard = [s.encode("utf-8") for s in secrets if s]
    files: dict[str, Path] = {}
    plots: list[str] = []
    per = {name: getattr(m, "per_example", None) for name, m in
           (("before", before), ("after", after), ("reference", reference))}
    if per["after"] and per["after"].get("exposure/canary"):
        files["exposure_plot"] = atomic_write(out / "exposure.png", plot_exposure(per["before"], per["after"]), guard)
        plots.append("exposure.png")
    panels = {name: p for name, p in per.items() if p and p.get("forget/loss") and p.get("holdout/loss")}
    if panels:
        files["loss_plot"] = atomic_write(out / "loss_histograms.png", plot_loss_histograms(panels), guard)
        plots.append("loss_histograms.png")
    if runs and len(runs) >= 2:
        keys = set().union(*(r["metrics"] for r in runs))
        privacy = privacy_metric or next((k for k in ("exposure/mean", "mia/min_k/auroc", "mia/loss/auroc")
                                          if k in keys), None)
        if privacy is not None:
            files["privacy_utility_plot"] = atomic_write(
                out / "privacy_utility.png", plot_privacy_utility(runs, privacy, utility_metric), guard)
            plots.append("privacy_utility.png")
    report = {
        "schema_version": 1,
        "method": method,
        "hyperparameters": json_safe(hyperparameters or {}),
        "seed": seed,
        "timings_s": json_safe(timings or {}),
        "hashes": {"forget_set_sha256": forget_sha256, "weights_before_sha256": weights_before_sha256,
                   "weights_after_sha256": weights_after_sha256},
        "versions": library_versions(),
        "metrics": {"before": json_safe(dict(before or {})), "after": json_safe(dict(after)),
                    "reference": json_safe(dict(reference or {}))},
        "runs": json_safe([{"name": r.get("name"), "metrics": dict(r["metrics"])} for r in runs or []]),
        "plots": plots,
    }
    clash = set(summary or {}) & set(report)
    if clash:
        raise ValueError(f"summary keys {sorted(clash)} clash with the report's own keys; rename them")
    report.update(json_safe(dict(summary or {})))
    files["json"] = atomic_write(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False).encode(),
                                  guard)
    files["markdown"] = atomic_write(out / "report.md", _markdown(report, plots).encode("utf-8"), guard)
    return files
