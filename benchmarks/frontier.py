"""Privacy–utility frontiers of unlearning runs: Pareto curves, matched comparisons, wins, plot and table.

Pure Python/numpy (matplotlib only for the plot), so that a report can be rebuilt from `results.json` alone.

Each benchmark run is a row such as
``{"method": "gradient_ascent", "knob": "lr=1e-3,steps=30", "seed": 0, "privacy": 1.7, "dppl_percent": 2.3}``
where ``privacy`` is LOWER-is-better (exposure in bits, MIA AUC, ``1 - ks_p``...) and ``dppl_percent`` (Δ test
perplexity in %, lower is better) is the utility cost. A method's knob sweep gives many (privacy, cost) points per
seed; single runs say little because each method trades privacy for utility along its own knob, so methods are
compared at MATCHED privacy (cost to reach a level) and MATCHED cost (privacy reachable within a budget), both read
off each seed's Pareto frontier by linear interpolation, then averaged over seeds.

Conventions used throughout:
- a point is ``(privacy, cost)``; non-finite or missing values are ignored;
- a frontier is sorted by cost ascending, i.e. privacy descending;
- ``None`` means "never reached" (no point gets that private / no point is that cheap);
- sd is the sample standard deviation (ddof=1) over the seeds that reached, ``None`` with fewer than two.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Point = tuple[float, float]

__all__ = [
    "cost_at_privacy",
    "frontier",
    "frontier_wins",
    "frontier_wins_detail",
    "markdown_table",
    "matched_table",
    "plot_frontiers",
    "privacy_at_cost",
]


def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def frontier(points: Iterable[Point]) -> list[Point]:
    """The lower-left Pareto frontier of (privacy, cost) points: the non-dominated ones, privacy descending.

    A point is dropped when another is at least as private AND at least as cheap (and differs); exact duplicates
    are kept once. Non-finite points are ignored. Sorted by cost ascending = privacy descending, so walking the
    list spends more utility for more privacy, which is what the interpolation functions rely on.
    """
    pts = sorted({(float(p), float(c)) for p, c in points if _finite(p) and _finite(c)}, key=lambda pc: (pc[1], pc[0]))
    out: list[Point] = []
    for p, c in pts:  # cost ascending; among equal costs the most private comes first
        if not out or p < out[-1][0]:
            out.append((p, c))
    return out


def cost_at_privacy(points: Iterable[Point], level: float) -> float | None:
    """The smallest cost at which privacy <= `level` is reached, linearly interpolated along the frontier.

    A frontier point exactly at `level` returns its cost; a level at or above the cheapest point's privacy returns
    that point's cost (0 for the original model); a level below every point's privacy returns None (never reached).
    """
    front = frontier(points)
    if not front or front[-1][0] > level:
        return None
    if front[0][0] <= level:
        return front[0][1]
    for (p0, c0), (p1, c1) in zip(front, front[1:]):
        if p0 > level >= p1:  # privacy strictly falls along the frontier, so p0 > p1
            return c0 + (level - p0) / (p1 - p0) * (c1 - c0)
    raise AssertionError("unreachable: the frontier brackets the level")  # pragma: no cover


def privacy_at_cost(points: Iterable[Point], budget: float) -> float | None:
    """The best (lowest) privacy reachable at cost <= `budget`, linearly interpolated along the frontier.

    None when no point has cost <= budget; beyond the most expensive frontier point it stays at that point's privacy.
    """
    front = frontier(points)
    if not front or front[0][1] > budget:
        return None
    for (p0, c0), (p1, c1) in zip(front, front[1:]):
        if c0 <= budget < c1:  # cost strictly rises along the frontier, so c1 > c0
            return p0 + (budget - c0) / (c1 - c0) * (p1 - p0)
    return front[-1][0]


def _summary(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample sd over the values that are not None, with how many there were (`reached`) out of `n`."""
    got = [float(v) for v in values if v is not None]
    return {
        "mean": float(np.mean(got)) if got else None,
        "sd": float(np.std(got, ddof=1)) if len(got) >= 2 else None,
        "reached": len(got),
        "n": len(values),
    }


def _group_points(
    rows: Iterable[Mapping[str, Any]],
    privacy_key: str,
    cost_key: str,
    group_key: str,
    seed_key: str,
    shared: Sequence[str],
) -> dict[str, dict[Any, list[Point]]]:
    """{method: {seed: [(privacy, cost), ...]}}, with the points of the `shared` groups (e.g. the original model)
    added to every other method's points of the same seed (a seed-less shared row goes to every seed)."""
    groups: dict[str, dict[Any, list[Point]]] = {}
    shared_pts: dict[Any, list[Point]] = {}
    for row in rows:
        p, c = row.get(privacy_key), row.get(cost_key)
        if not (_finite(p) and _finite(c)):
            continue
        point = (float(p), float(c))
        seed = row.get(seed_key)
        if row[group_key] in shared:
            shared_pts.setdefault(seed, []).append(point)
        else:
            groups.setdefault(row[group_key], {}).setdefault(seed, []).append(point)
    for seeds in groups.values():
        for seed, pts in seeds.items():
            pts.extend(shared_pts.get(seed, []))
            if seed is not None:
                pts.extend(shared_pts.get(None, []))
    return groups


def _seed_levels(levels: Sequence[float], reference: Mapping[Any, float] | None, seed: Any) -> list[float]:
    if reference is None:
        return [float(lv) for lv in levels]
    if seed not in reference:
        raise KeyError(f"reference has no value for seed {seed!r} (levels are offsets from the per-seed reference)")
    return [float(reference[seed]) + float(lv) for lv in levels]


def matched_table(
    rows: Iterable[Mapping[str, Any]],
    levels: Sequence[float],
    budgets: Sequence[float],
    privacy_key: str = "privacy",
    cost_key: str = "dppl_percent",
    group_key: str = "method",
    *,
    seed_key: str = "seed",
    reference: Mapping[Any, float] | None = None,
    shared: Sequence[str] = (),
) -> dict[str, Any]:
    """Matched comparisons per method: cost at each privacy level, privacy at each cost budget, per seed and mean.

    Per method and seed, the seed's frontier gives `cost_at_privacy` for each level and `privacy_at_cost` for each
    budget; per method these are summarised over seeds (mean and sd of those that reached, `reached` of `n`). With
    `reference` ({seed: value}, e.g. the retrained model's exposure) the `levels` are offsets added to each seed's
    reference, so "within 1 bit of retraining" is matched per seed. `shared` names groups (e.g. "original") whose
    points belong to every method's frontier of the same seed instead of being a method of their own.

    Returns ``{"levels", "budgets", "relative", "reference", "methods": {method: {"seeds": {seed: {"frontier",
    "levels", "cost_at_privacy", "privacy_at_cost"}}, "cost_at_privacy": [summary per level], "privacy_at_cost":
    [summary per budget]}}}``; a summary is ``{"level" | "budget", "mean", "sd", "reached", "n"}`` (lists aligned
    with `levels` / `budgets`, mean and sd None when no seed reached).
    """
    groups = _group_points(rows, privacy_key, cost_key, group_key, seed_key, shared)
    methods: dict[str, Any] = {}
    for method, seeds in groups.items():
        per_seed: dict[Any, Any] = {}
        for seed, pts in seeds.items():
            abs_levels = _seed_levels(levels, reference, seed)
            per_seed[seed] = {
                "frontier": frontier(pts),
                "levels": abs_levels,
                "cost_at_privacy": [cost_at_privacy(pts, lv) for lv in abs_levels],
                "privacy_at_cost": [privacy_at_cost(pts, float(b)) for b in budgets],
            }
        methods[method] = {
            "seeds": per_seed,
            "cost_at_privacy": [
                {"level": float(lv), **_summary([s["cost_at_privacy"][i] for s in per_seed.values()])}
                for i, lv in enumerate(levels)
            ],
            "privacy_at_cost": [
                {"budget": float(b), **_summary([s["privacy_at_cost"][i] for s in per_seed.values()])}
                for i, b in enumerate(budgets)
            ],
        }
    return {
        "levels": [float(lv) for lv in levels],
        "budgets": [float(b) for b in budgets],
        "relative": reference is not None,
        "reference": dict(reference) if reference is not None else None,
        "methods": methods,
    }


def frontier_wins_detail(
    table: Mapping[str, Any], ours: str, others: Sequence[str], factor: float = 0.5
) -> dict[str, list[dict[str, Any]]]:
    """Per other method, per matched privacy level: both mean costs and the outcome ("win", "lose" or "ignored").

    We win a level when our mean cost <= `factor` × theirs, or when only we reach it; we lose when we do not reach
    it; a level neither reaches is ignored. `ratio` is ours / theirs when both reached and theirs > 0. This is the
    "why" behind `frontier_wins`.
    """
    mine = table["methods"][ours]["cost_at_privacy"]
    detail: dict[str, list[dict[str, Any]]] = {}
    for other in others:
        theirs = table["methods"][other]["cost_at_privacy"]
        rows = []
        for a, b in zip(mine, theirs):
            ca, cb = a["mean"], b["mean"]
            if ca is None and cb is None:
                outcome = "ignored"
            elif ca is None:
                outcome = "lose"
            elif cb is None:
                outcome = "win"
            else:
                outcome = "win" if ca <= factor * cb else "lose"
            ratio = ca / cb if ca is not None and cb is not None and cb > 0 else None
            rows.append({
                "level": a["level"], "ours": ca, "theirs": cb, "ours_reached": a["reached"],
                "theirs_reached": b["reached"], "n_ours": a["n"], "n_theirs": b["n"], "ratio": ratio,
                "outcome": outcome,
            })
        detail[other] = rows
    return detail


def frontier_wins(table: Mapping[str, Any], ours: str, others: Sequence[str], factor: float = 0.5) -> dict[str, bool]:
    """Per other method: True when `ours` wins every matched privacy level that is not ignored (see
    `frontier_wins_detail`: mean cost <= factor × theirs, or only we reach it), and at least one level counts."""
    out = {}
    for other, rows in frontier_wins_detail(table, ours, others, factor).items():
        counted = [r["outcome"] for r in rows if r["outcome"] != "ignored"]
        out[other] = bool(counted) and all(o == "win" for o in counted)
    return out


def fastest_rivals(defaults: Iterable[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                   baselines: Sequence[str], matches: Callable[[Mapping[str, Any], Mapping[str, Any]], bool],
                   own: Sequence[str], theirs: Sequence[str]) -> list[dict[str, Any]]:
    """Time against first order, per default row (one a seed): the fastest point of `baselines` on its seed that
    `matches(default, point)` (the same privacy at the same or better utility; the benchmark says what that is), as
    its method, knob, seconds and `theirs` fields (None: no point does, at any price), beside the default's seconds
    and `own` fields."""
    out = []
    for mine in sorted(defaults, key=lambda r: r["seed"]):
        rivals = [r for r in rows if r["seed"] == mine["seed"] and r["method"] in baselines
                  and _finite(r.get("seconds")) and matches(mine, r)]
        best = min(rivals, key=lambda r: r["seconds"]) if rivals else None
        out.append({"seed": mine["seed"], **{k: mine[k] for k in own}, "seconds": mine["seconds"],
                    "fastest": None if best is None else
                    {k: best[k] for k in ("method", "knob", "seconds", *theirs)}})
    return out


def rival_cell(fastest: Mapping[str, Any] | None, formats: Mapping[str, str]) -> str:
    """A `fastest_rivals` entry's point for a Markdown table: `method knob: seconds s, field, ...` ("-": none)."""
    if fastest is None:
        return "-"
    return f"{fastest['method']} {fastest['knob']}: {fastest['seconds']:.3g} s, " + ", ".join(
        format(fastest[k], fmt) for k, fmt in formats.items())


def _fmt(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


def _cell(summary: Mapping[str, Any], digits: int) -> str:
    if summary["mean"] is None:
        return f"– ({summary['reached']}/{summary['n']})"
    sd = f" ± {_fmt(summary['sd'], digits)}" if summary["sd"] is not None else ""
    return f"{_fmt(summary['mean'], digits)}{sd} ({summary['reached']}/{summary['n']})"


def _indices(wanted: Sequence[float] | None, have: Sequence[float], what: str) -> list[int]:
    if wanted is None:
        return list(range(len(have)))
    idx = []
    for w in wanted:
        hits = [i for i, h in enumerate(have) if math.isclose(h, float(w), rel_tol=1e-9, abs_tol=1e-12)]
        if not hits:
            raise ValueError(f"{what} {w!r} is not in the table ({list(have)})")
        idx.append(hits[0])
    return idx


def markdown_table(
    table: Mapping[str, Any],
    levels: Sequence[float] | None = None,
    budgets: Sequence[float] | None = None,
    *,
    digits: int = 3,
    privacy_label: str = "privacy",
    cost_label: str = "Δppl %",
) -> str:
    """A Markdown table, one row per method: cost at each privacy level, then privacy at each cost budget.

    Cells are "mean ± sd (reached/n)", "–" when no seed reached. `levels` / `budgets` select columns among those
    of the table (all by default). Relative levels are headed "ref+offset".
    """
    li = _indices(levels, table["levels"], "level")
    bi = _indices(budgets, table["budgets"], "budget")

    def level_name(lv: float) -> str:
        return f"ref{lv:+g}" if table.get("relative") else f"{lv:g}"

    header = ["method"]
    header += [f"{cost_label} @ {privacy_label} ≤ {level_name(table['levels'][i])}" for i in li]
    header += [f"{privacy_label} @ {cost_label} ≤ {table['budgets'][i]:g}" for i in bi]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for method, entry in table["methods"].items():
        cells = [str(method)]
        cells += [_cell(entry["cost_at_privacy"][i], digits) for i in li]
        cells += [_cell(entry["privacy_at_cost"][i], digits) for i in bi]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_frontiers(
    rows: Iterable[Mapping[str, Any]],
    privacy_key: str = "privacy",
    cost_key: str = "dppl_percent",
    group_key: str = "method",
    *,
    seed_key: str = "seed",
    shared: Sequence[str] = (),
    methods: Sequence[str] | None = None,
    reference: Mapping[Any, float] | None = None,
    grid_points: int = 60,
    title: str | None = None,
    privacy_label: str = "privacy (lower is better)",
    cost_label: str = "Δ test perplexity (%)",
) -> bytes:
    """PNG of each method's mean frontier over seeds (x = cost, y = privacy) with a shaded ±sd band.

    Each seed's frontier is read (`cost_at_privacy`) on a common privacy grid spanning the method's points; the
    curve is drawn only where every seed reaches the privacy, so the mean is always over all seeds. With
    `reference` ({seed: value}) a horizontal line marks its mean (the retrained model).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group_points(rows, privacy_key, cost_key, group_key, seed_key, shared)
    names = [m for m in (methods if methods is not None else groups) if m in groups]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    drawn: list[float] = []  # the mean curves' costs: the x range (a ±sd band of a diverged run spans ±10^7 %)
    try:
        for k, method in enumerate(names):
            seeds = groups[method]
            fronts = [frontier(pts) for pts in seeds.values()]
            privs = [p for f in fronts for p, _ in f]
            if not privs:
                continue
            grid = np.unique(np.concatenate([np.linspace(min(privs), max(privs), grid_points), privs]))
            costs = np.array([[np.nan if (c := cost_at_privacy(f, y)) is None else c for y in grid] for f in fronts])
            ok = ~np.isnan(costs).any(axis=0)
            if not ok.any():
                continue
            color = f"C{k % 10}"
            mean = costs[:, ok].mean(axis=0)
            ax.plot(mean, grid[ok], color=color, label=f"{method} (n={len(fronts)})")
            drawn += [float(c) for c in mean]
            if len(fronts) >= 2:
                sd = costs[:, ok].std(axis=0, ddof=1)
                ax.fill_betweenx(grid[ok], mean - sd, mean + sd, color=color, alpha=0.2, linewidth=0)
        if reference:
            ref = float(np.mean([float(v) for v in reference.values()]))
            ax.axhline(ref, color="black", linestyle="--", linewidth=1, label="retrained (reference)")
        # costs span -50 % to +10^6 %: symmetric-log keeps the 0-5 % region, where the comparisons are, readable
        ax.set_xscale("symlog", linthresh=1.0)
        if drawn:
            ax.set_xlim(min(-1.0, 2.0 * min(drawn)), max(10.0, 2.0 * max(drawn)))
        ax.set_xlabel(cost_label + " (symmetric log scale)")
        ax.set_ylabel(privacy_label)
        if title:
            ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)
