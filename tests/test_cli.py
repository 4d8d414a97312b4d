"""The `lightning-unlearn` command, run as a user runs it: shipped configs parse, a tiny demo and a tiny LightningCLI
run go end to end through the console script, and bad configs fail naming the key without leaving output behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_unlearn.cli import ConfigError, load_demo_config, main

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "demo.yaml")
TINY_EXPERIMENT = {"corpus_bytes": 40_000, "canaries_per_group": 2, "repetitions": [2, 8], "n_references": 6,
                   "secret_length": 4,
                   "vocab_size": 300, "max_length": 64, "hidden": 32, "layers": 1, "heads": 2, "batch_size": 8,
                   "train_steps": 40, "warmup_steps": 5}


def run_command(args, cwd, timeout=600):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "LIGHTNING_UNLEARN_LOG_DIR": "logs"}
    script = Path(sys.executable).with_name("lightning-unlearn")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lightning_unlearn.cli"]
    return subprocess.run(cmd + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("config", LIGHTNING_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_lightning_config_parses(config, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["method"] in {"newton", "fisher_removal", "fisher_forgetting", "gradient_ascent", "npo"}
    assert printed["data"]["train"]


def test_shipped_demo_config_parses_to_the_defaults():
    config, settings = load_demo_config(str(ROOT / "configs" / "demo.yaml"))
    default_config, default_settings = load_demo_config(None)
    assert config == default_config and settings == default_settings


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """`lightning-unlearn demo` on a tiny experiment, through the console script."""
    work = tmp_path_factory.mktemp("demo")
    (work / "tiny.yaml").write_text(yaml.safe_dump({"experiment": TINY_EXPERIMENT,
                                                    "unlearning": {"curvature_batches": 2}}))
    result = run_command(["demo", "--config", "tiny.yaml", "--output", "runs/demo", "--quiet"], cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result


def test_demo_writes_the_report_the_model_and_the_summary(tiny_demo):
    work, result = tiny_demo
    out = work / "runs" / "demo"
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "newton" and report["curvature"] == "kfac"
    for column in ("before", "after", "retrain"):
        for key in ("exposure_inserted_mean", "exposure_reference_mean", "test_perplexity", "forget_loss", "mia_auc"):
            assert isinstance(report[column][key], float), (column, key)
    assert set(report["timing"]) >= {"train_seconds", "retrain_seconds", "unlearn_seconds"}
    # the default recipe's run: how it ended and what it aimed at (the never-inserted canaries)
    assert report["status"] in ("target_reached", "budget_exhausted", "nothing_accepted")
    assert report["target_source"] == "holdout" and isinstance(report["target"], float)
    assert report["unlearning"]["status"] == report["status"]
    assert report["hyperparameters"]["unlearning"]["damping"] is None  # no knob set
    assert f"- status: `{report['status']}`" in (out / "report.md").read_text()
    assert all(v > 0 for v in report["timing"].values())
    for name in ("report.md", "exposure.png", "loss_histograms.png", "model/model.safetensors",
                 "original/model.safetensors", "data/train.jsonl"):
        assert (out / name).exists(), name
    assert "exposure_inserted_mean" in result.stdout  # the summary table
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_demo_report_files_hold_no_secret(tiny_demo):
    from lightning_unlearn.data import CanaryRegistry

    work, result = tiny_demo
    out = work / "runs" / "demo"
    registry = CanaryRegistry.load(out / "data" / "canaries.json")
    secrets = [c.secret for c in registry.inserted + registry.references]
    for path in [*out.glob("report.*"), *out.glob("*.png")]:
        blob = path.read_bytes()
        assert not any(s.encode() in blob for s in secrets), path.name
    assert not any(s in result.stdout + result.stderr for s in secrets)


def test_tiny_lightning_config_end_to_end_through_the_command(tiny_demo):
    work, _ = tiny_demo
    config = yaml.safe_load((ROOT / "configs" / "unlearn_kfac.yaml").read_text())
    config["data"].update(max_length=64, batch_size=8)
    config["model"]["curvature_batches"] = 2
    (work / "kfac.yaml").write_text(yaml.safe_dump(config))
    original = (work / "runs/demo/original/model.safetensors").read_bytes()
    result = run_command(["fit", "--config", "kfac.yaml"], cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unlearning status: " in result.stdout and "source holdout" in result.stdout, result.stdout[-2000:]
    from safetensors.torch import load_file

    before = load_file(work / "runs/demo/original/model.safetensors")
    after = load_file(work / "runs/unlearn_kfac/model/model.safetensors")
    assert (work / "runs/demo/original/model.safetensors").read_bytes() == original  # never modified in place
    changed = [k for k in before if not (before[k] == after[k]).all()]
    assert changed, "the unlearning step changed no weight"
    metrics = next((work / "logs").rglob("metrics.csv")).read_text()
    assert "unlearn/forget_loss" in metrics and "val/forget_loss" in metrics
    # the forget set chosen by a regex this time: the pattern may be a secret, so no log file may hold it
    pattern = "my PIN is"
    tested = run_command(["test", "--config", "kfac.yaml", "--model.model", "runs/unlearn_kfac/model",
                          "--data.forget_column", "null", "--data.forget_regex", pattern, "--data.span", "example"],
                         cwd=work)
    assert tested.returncode == 0, tested.stderr[-3000:]
    logged_metrics = "".join(p.read_text() for p in (work / "logs").rglob("metrics.csv"))
    for key in ("test/forget_loss", "test/holdout_ppl", "test/mia_loss_auroc", "test/forget_extraction_strength"):
        assert key in logged_metrics, key
    logged = [p for p in (work / "logs").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in logged) and any(".wandb" in p.name for p in logged)
    assert not [p for p in logged if pattern.encode() in p.read_bytes()]


@pytest.mark.parametrize(("override", "key"), [
    ("--model.method=forget_everything", "model.method"),
    ("--model.curvature=magic", "model.curvature"),
    ("--model.model=runs/no_such_model", "model.model"),
    ("--data.train=no_such_file.jsonl", "data.train"),
    ("--model.damping=lots", "model.damping"),
])
def test_bad_config_names_the_key_and_leaves_no_output(tmp_path, override, key):
    config = ROOT / "configs" / "unlearn_kfac.yaml"
    (tmp_path / "runs").mkdir()
    result = run_command(["fit", "--config", str(config), override], cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert key in result.stderr
    assert not (tmp_path / "logs").exists()
    assert list((tmp_path / "runs").iterdir()) == []


def test_bad_demo_config_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"experiment": {"train_step": 10}}))
    with pytest.raises(ConfigError, match="experiment.train_step"):
        load_demo_config(str(bad))
    bad.write_text(yaml.safe_dump({"unlearning": {"damping": "high"}}))
    with pytest.raises(ConfigError, match="unlearning.damping"):
        load_demo_config(str(bad))
    bad.write_text(yaml.safe_dump({"unlearning": {"method": "wipe"}}))
    with pytest.raises(ConfigError, match="model.method"):
        load_demo_config(str(bad))
    with pytest.raises(SystemExit):
        main(["demo", "--config", str(bad), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
