"""benchmarks.frontier: Pareto frontiers, interpolation, matched tables over seeds, wins, plot and Markdown.

All expected numbers are computed by hand from small point sets.
"""

import math

import pytest

from benchmarks.frontier import (
    cost_at_privacy,
    frontier,
    frontier_wins,
    frontier_wins_detail,
    markdown_table,
    matched_table,
    plot_frontiers,
    privacy_at_cost,
)

# (privacy, cost): the original model (10, 0), two frontier points, two dominated points, a duplicate, a NaN
POINTS = [(10.0, 0.0), (8.0, 3.0), (6.0, 2.0), (3.0, 10.0), (2.0, 6.0), (6.0, 2.0), (float("nan"), 1.0)]
FRONT = [(10.0, 0.0), (6.0, 2.0), (2.0, 6.0)]


def test_frontier_drops_dominated_and_sorts_privacy_descending():
    assert frontier(POINTS) == FRONT
    assert frontier([]) == []
    # equal cost: only the more private one; equal privacy: only the cheaper one
    assert frontier([(5.0, 1.0), (4.0, 1.0), (4.0, 3.0)]) == [(4.0, 1.0)]


@pytest.mark.parametrize(
    ("level", "cost"),
    [(6.0, 2.0), (2.0, 6.0), (10.0, 0.0), (11.0, 0.0), (4.0, 4.0), (8.0, 1.0), (3.0, 5.0), (1.9, None)],
)
def test_cost_at_privacy(level, cost):
    got = cost_at_privacy(POINTS, level)
    assert got == (None if cost is None else pytest.approx(cost))


def test_cost_at_privacy_cheapest_point_may_cost_something():
    assert cost_at_privacy([(5.0, 1.5), (1.0, 3.0)], 7.0) == 1.5
    assert cost_at_privacy([], 7.0) is None


@pytest.mark.parametrize(
    ("budget", "privacy"),
    [(0.0, 10.0), (1.0, 8.0), (2.0, 6.0), (4.0, 4.0), (6.0, 2.0), (100.0, 2.0), (-1.0, None)],
)
def test_privacy_at_cost(budget, privacy):
    got = privacy_at_cost(POINTS, budget)
    assert got == (None if privacy is None else pytest.approx(privacy))


def _rows():
    rows = [{"method": "original", "seed": s, "privacy": 10.0, "dppl_percent": 0.0} for s in (0, 1)]
    # A: seed 0 reaches privacy 0 at cost 2, seed 1 at cost 4 (straight lines from the original model)
    rows += [{"method": "A", "knob": "k", "seed": 0, "privacy": 0.0, "dppl_percent": 2.0},
             {"method": "A", "knob": "k", "seed": 1, "privacy": 0.0, "dppl_percent": 4.0}]
    # B: seed 0 reaches privacy 5 at cost 6; seed 1 only gets to 8 (cost 6); a failed run without numbers
    rows += [{"method": "B", "knob": "k", "seed": 0, "privacy": 5.0, "dppl_percent": 6.0},
             {"method": "B", "knob": "k", "seed": 1, "privacy": 8.0, "dppl_percent": 6.0},
             {"method": "B", "knob": "bad", "seed": 1, "privacy": None, "dppl_percent": 1.0}]
    return rows


def test_matched_table_per_seed_and_mean_sd():
    table = matched_table(_rows(), levels=[5.0, 0.0], budgets=[1.0], shared=["original"])
    assert set(table["methods"]) == {"A", "B"}
    a = table["methods"]["A"]
    assert a["seeds"][0]["cost_at_privacy"] == [1.0, 2.0]
    assert a["seeds"][1]["cost_at_privacy"] == [2.0, 4.0]
    lvl5, lvl0 = a["cost_at_privacy"]
    assert lvl5["level"] == 5.0 and lvl5["mean"] == pytest.approx(1.5)
    assert lvl5["sd"] == pytest.approx(math.sqrt(0.5)) and (lvl5["reached"], lvl5["n"]) == (2, 2)
    assert lvl0["mean"] == pytest.approx(3.0) and lvl0["sd"] == pytest.approx(math.sqrt(2.0))
    # privacy at cost 1: seed 0 is half way to 0 (5), seed 1 a quarter (7.5)
    (b1,) = a["privacy_at_cost"]
    assert b1["budget"] == 1.0 and b1["mean"] == pytest.approx(6.25) and b1["reached"] == 2

    b = table["methods"]["B"]
    lvl5, lvl0 = b["cost_at_privacy"]
    assert (lvl5["mean"], lvl5["sd"], lvl5["reached"], lvl5["n"]) == (6.0, None, 1, 2)  # one seed: no sd
    assert (lvl0["mean"], lvl0["sd"], lvl0["reached"]) == (None, None, 0)


def test_matched_table_without_shared_original_cannot_be_cheap():
    table = matched_table(_rows(), levels=[9.0], budgets=[1.0])
    assert "original" in table["methods"]
    a = table["methods"]["A"]
    assert a["cost_at_privacy"][0]["mean"] == pytest.approx(3.0)  # the cheapest A points already reach 9
    assert a["privacy_at_cost"][0]["reached"] == 0  # no A point is that cheap


def test_matched_table_levels_relative_to_reference():
    table = matched_table(_rows(), levels=[1.0], budgets=[], shared=["original"], reference={0: 4.0, 1: 0.0})
    a = table["methods"]["A"]
    assert a["seeds"][0]["levels"] == [5.0] and a["seeds"][1]["levels"] == [1.0]
    assert a["seeds"][0]["cost_at_privacy"] == [1.0]
    assert a["seeds"][1]["cost_at_privacy"] == [pytest.approx(3.6)]
    assert a["cost_at_privacy"][0]["mean"] == pytest.approx(2.3)
    assert table["relative"] is True
    with pytest.raises(KeyError, match="seed 1"):
        matched_table(_rows(), levels=[1.0], budgets=[], reference={0: 4.0})


def _table(means: dict[str, list[float | None]]) -> dict:
    """A table with one seed per method and the given mean costs per level (None = never reached)."""
    n = len(next(iter(means.values())))
    return {
        "levels": list(range(n)), "budgets": [], "relative": False, "reference": None,
        "methods": {m: {"cost_at_privacy": [{"level": float(i), "mean": c, "sd": None, "reached": int(c is not None),
                                             "n": 1} for i, c in enumerate(costs)], "privacy_at_cost": []}
                    for m, costs in means.items()},
    }


def test_frontier_wins_factor():
    table = _table({"ours": [1.0, 2.0], "half": [2.0, 4.0], "close": [1.5, 4.0], "zero": [0.0, 4.0]})
    assert frontier_wins(table, "ours", ["half", "close", "zero"]) == {"half": True, "close": False, "zero": False}
    assert frontier_wins(table, "ours", ["close"], factor=1.0) == {"close": True}
    detail = frontier_wins_detail(table, "ours", ["close", "zero"])
    assert [r["outcome"] for r in detail["close"]] == ["lose", "win"]
    assert detail["close"][0]["ratio"] == pytest.approx(1.0 / 1.5)
    assert detail["zero"][0]["ratio"] is None


def test_frontier_wins_never_reached_rules():
    table = _table({
        "ours": [1.0, 2.0, None],
        "theirs_miss": [4.0, None, None],  # they never reach level 1: we win it; level 2 ignored
        "all_ours_miss": [None, None, 5.0],  # we never reach level 2: we lose
        "none": [None, None, None],
    })
    table["methods"]["ours_nothing"] = _table({"x": [None, None, None]})["methods"]["x"]
    assert frontier_wins(table, "ours", ["theirs_miss", "all_ours_miss", "none"]) == {
        "theirs_miss": True, "all_ours_miss": False, "none": True,
    }
    detail = frontier_wins_detail(table, "ours", ["theirs_miss", "all_ours_miss"])
    assert [r["outcome"] for r in detail["theirs_miss"]] == ["win", "win", "ignored"]
    assert [r["outcome"] for r in detail["all_ours_miss"]] == ["win", "win", "lose"]
    # every level ignored: no evidence, no win
    assert frontier_wins(table, "ours_nothing", ["none"]) == {"none": False}


def test_markdown_table():
    table = matched_table(_rows(), levels=[5.0, 0.0], budgets=[1.0], shared=["original"])
    md = markdown_table(table, [5.0, 0.0], [1.0])
    lines = md.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| method |")
    assert "≤ 5" in lines[0] and "≤ 1" in lines[0]
    a_line = next(line for line in lines if line.startswith("| A |"))
    assert "1.5 ± 0.707 (2/2)" in a_line and "6.25 ± 1.77 (2/2)" in a_line
    b_line = next(line for line in lines if line.startswith("| B |"))
    assert "6 (1/2)" in b_line and "– (0/2)" in b_line
    only = markdown_table(table, [0.0], [])
    assert "≤ 5" not in only and "3 ± 1.41 (2/2)" in only
    rel = matched_table(_rows(), levels=[1.0], budgets=[], shared=["original"], reference={0: 4.0, 1: 0.0})
    assert "ref+1" in markdown_table(rel)
    with pytest.raises(ValueError):
        markdown_table(table, [7.0], [])


def test_plot_frontiers_png():
    png = plot_frontiers(_rows(), shared=["original"], reference={0: 1.0, 1: 2.0}, title="t")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert plot_frontiers([]).startswith(b"\x89PNG\r\n\x1a\n")


def test_time_against_first_order_needs_both_privacy_and_utility():
    from benchmarks.frontier_bench import time_against_first_order

    def row(method, exposure, dppl, seconds, seed=0, **extra):
        return {"method": method, "knob": "-", "seed": seed, "exposure": exposure, "dppl_percent": dppl,
                "seconds": seconds, **extra}

    rows = [row("newton_kfac", 1.5, 0.3, 4.0, default=True),
            row("gradient_ascent", 1.4, 5.0, 0.5),     # as private, far worse utility
            row("npo", 2.0, 0.1, 0.4),                 # better utility, less private
            row("gradient_difference", 1.5, 0.3, 6.0),  # matches both, slower
            row("newton_kfac", 1.2, 0.2, 1.0),          # second order: not a rival
            row("newton_kfac", 1.5, 0.3, 4.0, seed=1, default=True),
            row("npo", 1.0, 0.0, 2.0, seed=1)]         # matches both on seed 1, faster
    timing = time_against_first_order("canaries", rows)
    first, second = timing["per_seed"]
    assert first["fastest"]["method"] == "gradient_difference" and second["fastest"]["method"] == "npo"
    assert timing["default_faster"] == 1 and timing["seeds"] == 2 and timing["privacy"] == "exposure"
