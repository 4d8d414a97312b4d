"""The benchmark's smoke preset end to end (tiny sizes), so that `python -m benchmarks.run` cannot rot.

Checks the output files and their schema (the default recipe and the frontier wins per benchmark, every method's
points with every metric), that the retrained model is the reference, and that no canary secret reaches the results.
Numbers are not asserted (timings are never tested; the tiny models say nothing about quality).
"""

import json
import math

import pytest

from benchmarks.presets import PRESETS
from benchmarks.run import main, run_benchmark
from lightning_unlearn.experiment import Experiment

KINDS = ("canaries", "qa")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_benchmark("smoke", out / "results", out / "cache", progress=False, workers=1)
    return out / "results", result


def test_smoke_writes_every_file(smoke):
    out, _ = smoke
    for name in ("results.json", "results.md", "frontier_canaries.png", "frontier_qa.png", "scaling.png"):
        assert (out / name).stat().st_size > 0, name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_default_recipe_and_frontier_wins_schema(smoke):
    out, _ = smoke
    result = json.loads((out / "results.json").read_text())
    for kind in KINDS:
        recipe = result["default_recipe"][kind]
        assert recipe["seeds"] == list(PRESETS["smoke"].seeds)
        keys = ("mia_auc", "ks_p", "dppl_percent") + (("exposure_gap_bits",) if kind == "canaries" else ())
        for key in keys:
            assert math.isfinite(recipe[key]), (kind, key)
        assert all(e["status"] in ("target_reached", "budget_exhausted", "nothing_accepted")
                   for e in recipe["per_seed"])
        wins = result["frontier_wins"][kind]
        assert set(wins) == {"gradient_ascent"} and all(isinstance(v, bool) for v in wins.values())
        assert set(result["targets"][kind]) >= {"mia_auc<=0.55", "ks_p>=0.05", "dppl_percent<=1"}


def test_every_method_appears_with_its_metrics(smoke):
    _, result = smoke
    for kind in KINDS:
        rows = result["rows"][kind]
        methods = {r["method"] for r in rows}
        assert {"original", "retrain", "newton_kfac", "fisher_removal", "gradient_ascent"} <= methods
        for r in rows:
            assert 0 <= r["mia_auc"] <= 1 and 0 <= r["ks_p"] <= 1 and math.isfinite(r["dppl_percent"]), r["method"]
            if kind == "canaries":
                assert math.isfinite(r["exposure"])


def test_retrained_model_is_the_reference(smoke):
    _, result = smoke
    for kind in KINDS:
        retrain = next(r for r in result["rows"][kind] if r["method"] == "retrain")
        assert retrain["ks_p"] == pytest.approx(1.0)  # KS of the retrained model against itself


def test_scaling_and_memory(smoke):
    _, result = smoke
    sizes = {(r["hidden"], r["layers"]) for r in result["scaling"]["model_size"]}
    assert len(sizes) >= 4 and len({r["n_forget"] for r in result["scaling"]["forget_size"]}) >= 3
    assert {r["backend"] for r in result["scaling"]["model_size"]} == {"kfac", "cg", "woodfisher", "diagonal"}
    g = result["gpt2_small_kfac_memory"]["measured_one_block"]["fp32"]
    assert g["as_implemented"] == pytest.approx(g["formula_as_implemented"], rel=1e-6)  # shapes formula is exact


def test_results_hold_no_secret(smoke, tmp_path):
    out, _ = smoke
    exp = Experiment(PRESETS["smoke"].experiment, tmp_path, progress=False)
    secrets = [c.secret for c in exp.registry.inserted + exp.registry.references]
    texts = {p.name: p.read_bytes() for p in out.iterdir()}
    for s in secrets:
        for name, data in texts.items():
            assert s.encode() not in data, name


def test_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--preset", "nope"])
    assert "invalid choice" in capsys.readouterr().err
