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
    assert report["status"] == "target_reached", report["unlearning"]  # what the tiny seeded demo gives
    assert report["target_source"] == "holdout" and isinstance(report["target"], float)
    assert report["unlearning"]["status"] == report["status"]
    assert report["hyperparameters"]["unlearning"]["damping"] is None  # no knob set
    assert f"- status: `{report['status']}`" in (out / "report.md").read_text()
    assert all(v > 0 for v in report["timing"].values())
    for name in ("report.md", "exposure.png", "loss_histograms.png", "model/model.safetensors",
                 "original/model.safetensors", "data/train.jsonl", "data/holdout.jsonl", "data/references.jsonl"):
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
    # the tiny demo's 40 training steps memorise no canary: against its never-inserted canaries (data.holdout) the
    # target is met at the start (0 steps, rightly); without a holdout target every step is taken
    config["model"]["holdout_batches"] = 0
    (work / "kfac.yaml").write_text(yaml.safe_dump(config))
    original = (work / "runs/demo/original/model.safetensors").read_bytes()
    result = run_command(["fit", "--config", "kfac.yaml"], cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unlearning status: " in result.stdout and "source none" in result.stdout, result.stdout[-2000:]
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


# ---------------------------------------------------------------- the target's holdout, through the command


@pytest.fixture(scope="module")
def memorised_canaries(tmp_path_factory):
    """A tiny GPT-2 that memorised 2 canaries' PINs (each inserted 8 times into 44 short texts, ~6 s of training),
    written as `lightning-unlearn demo` writes its outputs: model/ (with its tokenizer), train.jsonl (`canary_id`,
    `spans`) and holdout.jsonl (never-inserted canaries labelled on their PIN); whole.jsonl holds the same
    never-inserted canaries without spans. Returns the folder and a config for the command."""
    import torch

    from lightning_unlearn.data import insert_canaries, make_canaries, synthetic_corpus, train_bpe_tokenizer
    from lightning_unlearn.demo import write_canaries
    from lightning_unlearn.models import small_causal_lm

    root = tmp_path_factory.mktemp("canaries")
    registry = make_canaries(2, (8,), template="my PIN is {d} {d} {d} {d}", length=4, n_references=12, seed=0)
    train = insert_canaries(synthetic_corpus(12_000, seed=0), registry, seed=0)
    tok = train_bpe_tokenizer(train["text"], vocab_size=300)
    model = small_causal_lm("gpt2", vocab_size=len(tok), hidden=32, layers=1, heads=2, max_positions=64, seed=0,
                            eos_token_id=tok.eos_token_id).train()
    rows = [tok(t, add_special_tokens=False)["input_ids"][:63] + [tok.eos_token_id] for t in train["text"]]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = [rows[i] for i in torch.randint(len(rows), (16,), generator=generator)]
        width = max(map(len, batch))
        ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in batch])
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in batch])
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(root / "model")
    tok.save_pretrained(str(root / "model"))
    train.to_json(str(root / "train.jsonl"), lines=True)
    write_canaries(registry.references, root / "holdout.jsonl")
    (root / "whole.jsonl").write_text("".join(json.dumps({"text": c.text}) + "\n" for c in registry.references))
    config = {"seed_everything": 0,
              "model": {"model": "model", "method": "newton", "curvature": "kfac", "curvature_batches": 2},
              "data": {"train": "train.jsonl", "forget_column": "canary_id", "span": "offsets",
                       "holdout": "holdout.jsonl", "tokenizer": "model", "max_length": 64, "packing": True,
                       "batch_size": 8, "forget_batch_size": 64},
              "trainer": {"max_steps": 3, "accelerator": "cpu", "logger": False, "enable_progress_bar": False}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def test_span_forget_set_with_a_span_labelled_holdout_takes_steps(memorised_canaries, monkeypatch, capsys):
    """The command on a span-labelled forget set (the PINs) with a holdout of never-inserted canaries labelled on
    their PIN: the target is not met at the start, so at least one step is accepted and the model changes (the
    demo's configs, calibrated on prose labelled on every token, ended `target_reached` after 0 steps)."""
    monkeypatch.chdir(memorised_canaries)
    main(["fit", "--config", "config.yaml", "--output", "out/span", "--overwrite"])
    printed = capsys.readouterr().out
    assert "source holdout" in printed, printed[-2000:]
    run = json.loads((memorised_canaries / "out/span/run.json").read_text())
    assert run["steps_accepted"] >= 1 and run["status"] in ("target_reached", "budget_exhausted"), run


@pytest.mark.parametrize("holdout", ["whole.jsonl", "null"], ids=["whole-text holdout", "default split"])
def test_span_forget_set_with_a_whole_text_holdout_is_refused(memorised_canaries, monkeypatch, capsys, holdout):
    """A whole-text holdout (a file without spans, or the default split of training texts) with a span-level forget
    set: exit 2 before any step, one line naming the fix, nothing written."""
    monkeypatch.chdir(memorised_canaries)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "config.yaml", "--data.holdout", holdout, "--output", "out/refused"])
    assert info.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-unlearn: error:")]
    assert len(error) == 1 and "the forget set is labelled on its spans (span='offsets') but" in error[0], error
    assert "labelled on every token" in error[0] and "give holdout=" in error[0] and "holdout_batches=0" in error[0]
    assert not (memorised_canaries / "out/refused").exists()


def test_a_demo_corpus_too_small_for_its_splits_names_the_demos_option(tmp_path):
    """The data module's fix names its own options (test_fraction, test=<data>), which `demo` does not have; the
    demo says which of its options to raise. Nothing is written."""
    result = run_command(["demo", "--corpus-bytes", "2000", "--train-steps", "1", "--output", "out", "--quiet"],
                         cwd=tmp_path, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.startswith("lightning-unlearn: error: ")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "raise --corpus-bytes" in lines[0] and "test_fraction" not in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
