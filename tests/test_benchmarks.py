"""The benchmark's smoke preset end to end (tiny sizes), so that `python -m benchmarks.run` cannot rot.

Checks the output files and their schema, that every method of the project appears with every metric and ratio, that
the retrained model is the reference, and that no canary secret reaches the results. Numbers are not asserted
(timings are never tested; the tiny models say nothing about quality).
"""

import json
import math

import pytest

from benchmarks.presets import PRESETS
from benchmarks.run import main, run_benchmark
from lightning_unlearn.experiment import Experiment
from lightning_unlearn.methods import METHODS

ROW_KEYS = ("method", "setting", "exposure_inserted", "exposure_reference", "mia_auc", "forget_quality",
            "extraction_strength", "test_perplexity_change_pct", "unlearn_seconds", "peak_rss_mb",
            "time_over_fwd_bwd", "time_over_retrain", "curvature_memory_over_params")
LABELS = {"newton_kfac", "newton_cg", "newton_woodfisher", "newton_diagonal", "fisher_removal", "fisher_forgetting",
          "gradient_ascent", "gradient_difference", "npo", "retrain"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_benchmark("smoke", out / "results", out / "cache", progress=False)
    return out / "results", result


def test_smoke_writes_every_file(smoke):
    out, _ = smoke
    for name in ("results.json", "results.md", "privacy_utility.png", "time_to_forget.png", "scaling.png"):
        assert (out / name).stat().st_size > 0, name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_every_method_appears_with_every_metric(smoke):
    out, _ = smoke
    rows = json.loads((out / "results.json").read_text())["methods"]
    assert LABELS <= {r["method"] for r in rows}
    # every registered method of the engine is benchmarked
    assert set(METHODS) <= {r.get("hyperparameters", {}).get("method") for r in rows} | {"newton"}
    for r in rows:
        if r["method"] in ("original", "retrain"):
            continue
        missing = [k for k in ROW_KEYS if r.get(k) is None and not (k == "curvature_memory_over_params"
                                                                      and r["hyperparameters"]["extra"].get("lr"))]
        assert not missing, (r["method"], missing)
        assert 0 <= r["forget_quality"] <= 1 and 0 <= r["mia_auc"] <= 1
        assert r["time_over_fwd_bwd"] > 0 and r["unlearn_seconds"] > 0


def test_retrained_model_is_the_reference(smoke):
    _, result = smoke
    retrain = next(r for r in result["methods"] if r["method"] == "retrain")
    assert retrain["time_over_retrain"] == 1.0
    assert retrain["forget_quality"] == pytest.approx(1.0)  # KS of the retrained model against itself
    assert result["context"]["level_exposure"] == pytest.approx(retrain["exposure_inserted"] + 1.0)


def test_scaling_targets_and_time_to_forget(smoke):
    _, result = smoke
    preset = PRESETS["smoke"]
    sizes = {(r["hidden"], r["layers"]) for r in result["scaling"]["model_size"]}
    assert len(sizes) >= 4 and len({r["n_forget"] for r in result["scaling"]["forget_size"]}) >= 3
    assert {r["backend"] for r in result["scaling"]["model_size"]} == {"kfac", "cg", "woodfisher", "diagonal"}
    assert len(preset.scaling_sizes) >= 4
    names = {t["target"] for t in result["targets"]}
    assert any("time_over_fwd_bwd" in n for n in names) and any("bf16" in n for n in names)
    for method, t in result["time_to_forget"].items():
        assert t["seconds"] is None or t["seconds"] >= 0, method
    g = result["gpt2_small_kfac_memory"]["measured_one_block"]["fp32"]
    assert g["as_implemented"] == pytest.approx(g["formula_as_implemented"], rel=1e-6)  # shapes formula is exact
    assert math.isfinite(result["gpt2_small_kfac_memory"]["bf16"]["as_implemented"])


def test_results_hold_no_secret(smoke, tmp_path):
    out, result = smoke
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
