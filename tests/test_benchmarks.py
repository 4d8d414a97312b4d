"""The benchmark's smoke preset end to end (tiny sizes), so that `python -m benchmarks.run` cannot rot.

Checks the output files and their schema (the default recipe and the frontier wins per benchmark, every method's
points with every metric and its cost, the default request's per-phase breakdown, the request's scaling curve), that
the retrained model is the reference, and that no canary secret reaches the results. Numbers are not asserted, only
their consistency (ratios are their quotients, phases fit in the request; the tiny models say nothing about quality
and timings vary).
"""

import dataclasses
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
    for name in ("results.json", "results.md", "frontier_canaries.png", "frontier_qa.png", "scaling.png",
                 "request_scaling.png"):
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
        # the smoke preset's barely trained models: a run reaches its target, or its steps together move the weights
        # by their norm first (the run's trust region) and it says so; it never ends with nothing done
        assert len(recipe["per_seed"]) == 1, (kind, recipe["per_seed"])
        assert recipe["per_seed"][0]["status"] in ("target_reached", "budget_exhausted"), (kind, recipe["per_seed"])
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


COSTS = ("seconds", "fwd_bwd_seconds", "time_over_fwd_bwd", "time_over_retrain", "forward_examples",
         "backward_examples")


def test_every_unlearning_row_has_its_cost(smoke):
    _, result = smoke
    for kind in KINDS:
        rows = result["rows"][kind]
        retrain = {r["seed"]: r["seconds"] for r in rows if r["method"] == "retrain"}
        runs = [r for r in rows if r["method"] not in ("original", "retrain")]
        assert {r["method"] for r in runs} >= {"newton_kfac", "fisher_removal", "gradient_ascent"}
        for r in runs:
            where = (kind, r["method"], r["knob"])
            assert all(math.isfinite(r[k]) for k in COSTS), where
            assert r["seconds"] > 0 and r["fwd_bwd_seconds"] > 0, where
            assert r["time_over_fwd_bwd"] == pytest.approx(r["seconds"] / r["fwd_bwd_seconds"]), where
            assert r["time_over_retrain"] == pytest.approx(r["seconds"] / retrain[r["seed"]]), where
            assert r["forward_examples"] >= r["forget_examples"] and r["backward_examples"] > 0, where
            if r["method"] != "gradient_ascent":  # second order: the shared curvature fit is part of each run
                assert 0 < r["curvature_seconds"] <= r["seconds"], where
                assert r["curvature_forward_examples"] <= r["forward_examples"], where
        # first-order checkpoints along one run: cumulative
        ga = [r for r in runs if r["method"] == "gradient_ascent"]
        assert [r["steps"] for r in ga] == sorted(r["steps"] for r in ga)
        assert all(a["seconds"] <= b["seconds"] and a["backward_examples"] < b["backward_examples"]
                   for a, b in zip(ga, ga[1:]))


def test_default_request_cost_and_breakdown(smoke):
    out, result = smoke
    saved = json.loads((out / "results.json").read_text())
    for kind in KINDS:
        recipe = saved["default_recipe"][kind]
        default = [r for r in result["rows"][kind] if r.get("default")]
        assert len(default) == len(recipe["per_seed"]) == len(PRESETS["smoke"].seeds)
        for key in COSTS:
            assert recipe[key] == pytest.approx(sum(e[key] for e in recipe["per_seed"]) / len(default)), (kind, key)
        for r in default:
            assert r["time_over_fwd_bwd"] == pytest.approx(r["seconds"] / r["fwd_bwd_seconds"])
            assert r["forward_examples"] >= r["forget_examples"] > 0
            phases = r["breakdown"]
            assert {"curvature", "calibrate", "forget_gradient", "holdout_gradients", "measure_forget_score", "measure",
                    "other"} <= set(phases), kind
            measured = sum(v["seconds"] for name, v in phases.items() if name != "other")
            assert 0 < measured <= r["seconds"]
            assert measured + phases["other"]["seconds"] == pytest.approx(r["seconds"])
            for key in ("forward_examples", "backward_examples"):
                assert all(v[key] >= 0 for v in phases.values()), (kind, key)
                assert sum(v[key] for v in phases.values()) == r[key], (kind, key)
                assert phases["other"][key] == 0, (kind, key)  # every pass is in a named phase
            assert phases["curvature"]["backward_examples"] > 0 and phases["forget_gradient"]["backward_examples"] > 0
            assert phases["measure_forget_score"]["forward_examples"] >= r["forget_examples"]
            assert phases["curvature"]["seconds"] == pytest.approx(r["curvature_seconds"])
        assert set(recipe["breakdown"]) == set(default[0]["breakdown"])
    md = (out / "results.md").read_text()
    for text in ("time / fwd+bwd", "time / retrain", "Cost of the default request per phase",
                 "Scaling of the default request"):
        assert text in md, text


def test_request_scaling_curve(smoke):
    _, result = smoke
    request = result["scaling"]["request"]
    preset = PRESETS["smoke"]
    assert len({r["params"] for r in request["model_size"]}) >= 4
    assert [r["n_forget"] for r in request["forget_size"]] == list(preset.scaling_forget)
    for r in request["model_size"] + request["forget_size"]:
        assert r["time_over_fwd_bwd"] == pytest.approx(r["seconds"] / r["fwd_bwd_seconds"])
        assert r["forward_examples"] >= r["n_forget"] and r["status"] in (
            "target_reached", "budget_exhausted", "nothing_accepted")
    for key in ("exponent_params", "exponent_forget", "fwd_bwd_exponent_params", "fwd_bwd_exponent_forget"):
        assert math.isfinite(request[key]), key


def test_scaling_only_writes_its_report(tmp_path):
    """`--scaling-only` (no model of the experiment trained) writes scaling.json, a markdown report with the
    request's curve and both plots."""
    part = run_benchmark("smoke", tmp_path, tmp_path / "cache", progress=False, scaling_only=True)
    assert {p.name for p in tmp_path.iterdir()} >= {"scaling.json", "scaling.md", "scaling.png",
                                                    "request_scaling.png"}
    assert json.loads((tmp_path / "scaling.json").read_text())["scaling"]["request"]["model_size"]
    md = (tmp_path / "scaling.md").read_text()
    assert "## Scaling of the default request" in md and "![request_scaling.png](request_scaling.png)" in md
    assert len(part["scaling"]["request"]["model_size"]) == len(PRESETS["smoke"].scaling_sizes)


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


def test_training_takes_all_its_steps_within_its_epoch_bound(tmp_path):
    """`Experiment.train` gives the Trainer `max_epochs` (the epochs its `max_steps` take) so the progress bar has a
    bound instead of "Epoch 9/-2": the bound must never end the training before its steps."""
    smoke = PRESETS["smoke"].experiment
    batches = len(Experiment(smoke, tmp_path / "count", progress=False).data.dataloader("full", shuffle=True))
    config = dataclasses.replace(smoke, train_steps=2 * batches + 3)  # ends inside a third epoch
    exp = Experiment(config, tmp_path / "train", progress=False)
    exp.train("full")
    meta = json.loads((exp.cache / "original" / "training.json").read_text())
    assert meta["steps"] == config.train_steps


def test_one_benchmark_of_a_frontier_preset_from_the_cached_points(smoke, tmp_path):
    """`--benchmarks canaries --resume`: the canary tasks' points the smoke run cached, analysed again, and a header
    that says the run's time is not the measuring's."""
    out, _ = smoke
    main(["--preset", "smoke", "--no-scaling", "--benchmarks", "canaries", "--resume", "--quiet",
          "--output", str(tmp_path), "--cache", str(out.parent / "cache")])
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["rows"]) == {"canaries"} and set(result["frontier_wins"]) == {"canaries"}
    assert result["command"].endswith("--benchmarks canaries") and result["resumed"] is True
    cached = json.loads((out / "results.json").read_text())["rows"]["canaries"]
    assert [r.get("seconds") for r in result["rows"]["canaries"]] == [r.get("seconds") for r in cached]
    header = (tmp_path / "results.md").read_text().split("\n\n")[1]
    assert "(this run: canaries)" in header and "written with `--resume`" in header
    assert "time_against_first_order" in result["frontier"]["canaries"]
