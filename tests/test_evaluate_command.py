"""`lightning-unlearn evaluate` end to end on tiny saved GPT-2 models and hub-format TOFU / MUSE files."""

import json
import math

import pytest
import torch
from tofu_fixtures import SECRET, tiny_tokenizer_and_model, tofu_parts, write_muse_folder, write_tofu_folder

from lightning_unlearn.cli import main
from lightning_unlearn.metrics import MODEL_UTILITY_KEYS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluate")
    parts = tofu_parts()
    tok, model = tiny_tokenizer_and_model(parts, seed=0)
    _, retain = tiny_tokenizer_and_model(parts, seed=1)
    for name, m in (("model", model), ("retain", retain)):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    write_tofu_folder(root / "tofu", parts)
    write_muse_folder(root / "muse")
    return root


def run(args, capsys):
    main(["evaluate", *map(str, args)])
    out = capsys.readouterr().out
    assert SECRET not in out and "born" not in out  # numbers only, never a text of the data
    return json.loads(out[out.index("{"):])


def test_evaluate_with_retain_model_and_reference_file(setup, capsys):
    root = setup
    common = ["--model", root / "model", "--tofu", root / "tofu", "--split", "forget10", "--muse", root / "muse",
              "--batch-size", 4, "--device", "cpu"]
    direct = run([*common, "--retain-model", root / "retain", "--output", root / "out" / "metrics.json"], capsys)
    expected = {"forget_quality", "forget_truth_ratio", "forget_probability", "forget_rouge", "extraction_strength",
                "model_utility", "mia_auc_min_k", "privleak", "privleak_reference_auc", "muse_mia_auc_min_k",
                "muse_privleak", "muse_privleak_reference_auc", *MODEL_UTILITY_KEYS}
    assert set(direct) == expected
    assert all(isinstance(v, float) and math.isfinite(v) for v in direct.values())
    assert 0.0 <= direct["forget_quality"] <= 1.0 and direct["privleak_reference_auc"] != 0.5
    assert json.loads((root / "out" / "metrics.json").read_text()) == direct
    # the retain model's numbers saved once, then reused: the same metrics
    run(["--model", root / "retain", "--tofu", root / "tofu", "--muse", root / "muse", "--batch-size", 4,
         "--device", "cpu", "--save-reference", root / "ref.json"], capsys)
    saved = json.loads((root / "ref.json").read_text())
    assert len(saved["forget_truth_ratios"]) == 3 and saved["split"] == "forget10"
    assert saved["privleak_auc"] == pytest.approx(direct["privleak_reference_auc"])
    reused = run([*common, "--reference", root / "ref.json"], capsys)
    assert reused == pytest.approx(direct)
    # without a reference: no forget quality, privleak against open-unlearning's default AUC of 0.5
    alone = run(["--model", root / "model", "--tofu", root / "tofu", "--device", "cpu"], capsys)
    assert "forget_quality" not in alone and alone["privleak_reference_auc"] == 0.5


def test_evaluate_input_errors_are_one_line(setup, capsys):
    root = setup
    for args, message in ((["--model", root / "model"], "give --tofu FOLDER and/or --muse FOLDER"),
                          (["--model", root / "model", "--tofu", root / "nowhere"], "does not exist"),
                          (["--model", root / "model", "--tofu", root / "tofu", "--reference", root / "no.json"],
                           "--reference: file"),
                          (["--model", root / "model", "--tofu", root / "tofu", "--batch-size", "0"],
                           "must be positive")):
        with pytest.raises(SystemExit) as exit_info:
            main(["evaluate", *map(str, args)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("lightning-unlearn: error:") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["model_config", "model_weights", "inside_tofu", "reference"])
def test_evaluate_never_writes_its_json_over_an_input(setup, capsys, where):
    root = setup
    weights = next((root / "model").glob("*.safetensors"))
    target, flag = {"model_config": (root / "model" / "config.json", "--output"),
                    "model_weights": (weights, "--save-reference"),
                    "inside_tofu": (root / "tofu" / "metrics.json", "--output"),
                    "reference": (root / "ref_in.json", "--output")}[where]
    extra = []
    if where == "reference":
        target.write_text(json.dumps({"privleak_auc": 0.5}))
        extra = ["--reference", target]
    before = target.read_bytes() if target.exists() else None
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", *map(str, ["--model", root / "model", "--tofu", root / "tofu", "--device", "cpu",
                                     flag, target, *extra])])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "would replace an input" in err and len(err.strip().splitlines()) == 1
    assert (target.read_bytes() if target.exists() else None) == before
