"""`model_utility_interval`: the paired bootstrap of model utility over the evaluation's rows, against an exhaustive
enumeration of the resamples and against values worked out by hand."""

import itertools
import math

import pytest

from lightning_unlearn.metrics import MODEL_UTILITY_KEYS, model_utility, model_utility_interval
from lightning_unlearn.metrics.model_utility import MODEL_UTILITY_PARTS

#: two rows per evaluation set: (probability, ROUGE-L, truth ratio) of row 0 and of row 1
ROWS = {"retain": ((0.9, 1.0, 0.8), (0.5, 0.5, 0.4)),
        "real_authors": ((0.5, 0.2, 0.3), (0.3, 0.1, 0.2)),
        "world_facts": ((0.6, 0.4, 0.5), (0.2, 0.6, 0.1))}


def _items(rows=ROWS):
    out = {}
    for part, (first, second) in rows.items():
        for i, what in enumerate(("probability", "rouge", "truth_ratio")):
            out[f"{part}_{what}"] = [first[i], second[i]]
    return out


def _utility_of(draw: dict[str, tuple[int, int]], items) -> float:
    """The utility of one resample, by hand: each component the mean of its drawn rows."""
    means = {}
    for key in MODEL_UTILITY_KEYS:
        part = next(p for p in MODEL_UTILITY_PARTS if key.startswith(f"{p}_"))
        means[key] = sum(items[key][i] for i in draw[part]) / len(draw[part])
    return float(model_utility(means))


def test_value_is_the_utility_and_the_interval_ends_are_the_extreme_resamples():
    items = _items()
    means = {k: sum(v) / 2 for k, v in items.items()}
    # every resample of two rows per set: 4 draws per set, 64 in all, each with probability 1/64
    draws = list(itertools.product(*[list(itertools.product((0, 1), repeat=2))] * 3))
    values = sorted(_utility_of(dict(zip(MODEL_UTILITY_PARTS, d)), items) for d in draws)
    out = model_utility_interval(items, level=0.999, resamples=4000, seed=1)
    assert out["value"] == pytest.approx(float(model_utility(means)), abs=1e-12)
    # at the 0.05 % and 99.95 % quantiles of 4,000 draws the extreme resamples (each 1/64 likely) are the ends
    assert out["low"] == pytest.approx(values[0], abs=1e-12)
    assert out["high"] == pytest.approx(values[-1], abs=1e-12)
    central = model_utility_interval(items, resamples=4000, seed=1)
    assert values[0] < central["low"] < out["value"] < central["high"] < values[-1]
    assert model_utility_interval(items, resamples=4000, seed=1) == central  # deterministic for a seed


def test_paired_ratio_cancels_the_questions_both_models_share():
    items = _items()
    same = model_utility_interval(items, items)
    assert (same["value"], same["low"], same["high"]) == (1.0, 1.0, 1.0)
    # every row 0.8 × the reference's: each component, each resample's utility and so the ratio are 0.8 exactly,
    # where the two utilities alone vary with the resample
    scaled = {k: [0.8 * v for v in values] for k, values in items.items()}
    ratio = model_utility_interval(scaled, items)
    assert ratio["value"] == pytest.approx(0.8, abs=1e-12)
    assert ratio["low"] == pytest.approx(0.8, abs=1e-12) and ratio["high"] == pytest.approx(0.8, abs=1e-12)
    alone = model_utility_interval(scaled)
    assert alone["high"] - alone["low"] > 0.05
    # a reference with a component at 0 has utility 0: no ratio
    zero = {**items, "world_facts_rouge": [0.0, 0.0]}
    with pytest.warns(UserWarning, match="components are 0: world_facts_rouge"):
        none = model_utility_interval(items, zero)
    assert all(math.isnan(v) for v in none.values())


def test_a_row_left_out_stays_out_of_its_component():
    items = _items()
    items["retain_rouge"] = [1.0, float("nan")]  # row 1 had no scored answer
    out = model_utility_interval(items, resamples=500)
    means = {k: [v for v in values if not math.isnan(v)] for k, values in items.items()}
    assert out["value"] == pytest.approx(float(model_utility({k: sum(v) / len(v) for k, v in means.items()})))
    assert math.isfinite(out["low"]) and out["low"] <= out["value"] <= out["high"]


def test_the_errors_name_the_problem():
    items = _items()
    with pytest.raises(ValueError, match="lacks the per-row values of world_facts_rouge"):
        model_utility_interval({k: v for k, v in items.items() if k != "world_facts_rouge"})
    with pytest.raises(ValueError, match="the real_authors components of items must hold one value per row"):
        model_utility_interval({**items, "real_authors_rouge": [0.2]})
    longer = {k: v + v for k, v in items.items()}
    with pytest.raises(ValueError, match="must score the same rows; retain_probability has 4 and 2"):
        model_utility_interval(longer, items)
    with pytest.raises(ValueError, match="level must be in"):
        model_utility_interval(items, level=1.0)
    with pytest.raises(ValueError, match="resamples must be >= 2"):
        model_utility_interval(items, resamples=1)
