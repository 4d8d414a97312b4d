"""`lightning-unlearn evaluate` end to end on tiny saved GPT-2 models and hub-format TOFU / MUSE files."""

import json
import math

import pytest
import torch
from tofu_fixtures import (
    SECRET,
    all_texts,
    qa_rows,
    tiny_tokenizer_and_model,
    tofu_parts,
    write_muse_folder,
    write_tofu_folder,
)

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
    write_tofu_folder(root / "tofu", parts, split="forget05")  # the same rows under another split's name
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
                "muse_privleak", "muse_privleak_reference_auc", "model_utility_low", "model_utility_high",
                *MODEL_UTILITY_KEYS}
    dropped = {f"{part}_rows_dropped" for part in ("forget", "retain", "real_authors", "world_facts", "holdout")}
    assert set(direct) == expected | dropped
    assert all(direct[k] == 0 and isinstance(direct[k], int) for k in dropped)
    assert all(isinstance(direct[k], float) and math.isfinite(direct[k]) for k in expected)
    assert 0.0 <= direct["forget_quality"] <= 1.0 and direct["privleak_reference_auc"] != 0.5
    assert direct["model_utility_low"] <= direct["model_utility"] <= direct["model_utility_high"]
    assert json.loads((root / "out" / "metrics.json").read_text()) == direct
    # the retain model's numbers saved once, then reused: the same metrics
    run(["--model", root / "retain", "--tofu", root / "tofu", "--muse", root / "muse", "--batch-size", 4,
         "--device", "cpu", "--save-reference", root / "ref.json"], capsys)
    saved = json.loads((root / "ref.json").read_text())
    assert len(saved["forget_truth_ratios"]) == 3 and saved["split"] == "forget10"
    # what the numbers depend on is recorded: settings and sha256 hashes, never a text of the data
    assert saved["scoring"] == {"max_length": 512, "k": 0.4, "score_eos": False}
    assert all(len(saved[f"{what}_sha256"]) == 64 for what in ("tokenizer", "forget_rows", "holdout_rows", "muse_rows"))
    assert SECRET not in (root / "ref.json").read_text()
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


def refused(args, capsys) -> str:
    """Run the command expecting exit 2 with one error line on stderr (after the models' loading bars, if any);
    return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", *map(str, args)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("lightning-unlearn: error:")
    assert SECRET not in err
    return lines[0]


@pytest.fixture(scope="module")
def reference(setup):
    """A reference saved from the retain model (TOFU and MUSE), and another tokenizer and other forget rows."""
    from lightning_unlearn.data.tokenizer import train_bpe_tokenizer

    root = setup
    main(["evaluate", *map(str, ["--model", root / "retain", "--tofu", root / "tofu", "--muse", root / "muse",
                                 "--device", "cpu", "--save-reference", root / "ref_checked.json"])])
    parts = tofu_parts()
    train_bpe_tokenizer(all_texts(parts), vocab_size=280).save_pretrained(root / "other_tokenizer")
    write_tofu_folder(root / "tofu_other_rows", {**parts, "forget": qa_rows(["Ivy Bell", "Jon Cole", "Kai Dunn"])})
    return root / "ref_checked.json"


@pytest.mark.parametrize("change, message", [
    ({"--score-eos": None}, "--score-eos off (this run: on)"),
    ({"--k": "0.3"}, "--k 0.4 (this run: 0.3)"),
    ({"--max-length": "256"}, "--max-length 512 (this run: 256)"),
    ({"--split": "forget05"}, "--split forget10 (this run: forget05)"),
    ({"--tokenizer": "other_tokenizer"}, "the tokenizer (sha256 differs)"),
    ({"--tofu": "tofu_other_rows"}, "the forget rows (sha256 differs)"),
])
def test_reference_saved_for_other_settings_or_data_is_refused_before_loading(setup, reference, capsys, change,
                                                                            message):
    root = setup
    args = {"--model": root / "no_model_here", "--tokenizer": root / "model", "--tofu": root / "tofu",
            "--muse": root / "muse", "--device": "cpu", "--reference": reference}
    args.update({flag: root / value if value in ("other_tokenizer", "tofu_other_rows") else value
                 for flag, value in change.items()})
    line = [str(x) for flag, value in args.items() for x in (flag, value) if x is not None]
    err = refused(line, capsys)  # the model folder does not exist: the check ran before any loading
    assert "was saved for other data or settings than this run" in err and message in err and "re-save it" in err


def test_reference_from_an_older_version_is_used_with_a_warning(setup, reference, capsys):
    root = setup
    common = ["--model", root / "model", "--tofu", root / "tofu", "--device", "cpu", "--max-new-tokens", 2]
    checked = run([*common, "--reference", reference], capsys)
    old = {k: v for k, v in json.loads(reference.read_text()).items()
           if k in ("split", "forget_truth_ratios", "privleak_auc")}
    (root / "ref_old.json").write_text(json.dumps(old))
    with pytest.warns(UserWarning, match="does not record scoring, tokenizer_sha256, forget_rows_sha256"):
        unchecked = run([*common, "--reference", root / "ref_old.json"], capsys)
    assert unchecked == pytest.approx(checked)
    (root / "ref_old05.json").write_text(json.dumps({**old, "split": "forget05"}))  # its split is still checked
    assert "--split forget05 (this run: forget10)" in refused([*common, "--reference", root / "ref_old05.json"],
                                                              capsys)


@pytest.mark.parametrize("edit, message", [
    ({"forget_truth_ratios": 0.5}, "forget_truth_ratios must be a non-empty list of numbers or nulls, got float"),
    ({"forget_truth_ratios": {"a": 1, "b": 2, "c": 3}}, "forget_truth_ratios must be a non-empty list"),
    ({"forget_truth_ratios": [True, False, True]}, "entries [0, 1, 2] are not non-negative finite numbers or null"),
    ({"forget_truth_ratios": ["0.5", 1.0, 2.0]}, "entries [0] are not non-negative finite numbers or null (str)"),
    ({"forget_truth_ratios": [-1.0, 1.0, float("inf")]}, "entries [0, 2] are not non-negative finite numbers"),
    ({"forget_truth_ratios": [None, None, None]}, "forget_truth_ratios holds no number"),
    ({"privleak_auc": "0.7"}, "privleak_auc must be null or a finite number in [0, 1] (an AUC), got a str"),
    ({"privleak_auc": [0.7]}, "privleak_auc must be null or a finite number in [0, 1] (an AUC), got a list"),
    ({"privleak_auc": 7.0}, "privleak_auc must be null or a finite number in [0, 1] (an AUC), got 7"),
    ({"privleak_auc": float("nan")}, "privleak_auc must be null or a finite number in [0, 1] (an AUC), got nan"),
    ({"muse_privleak_auc": True}, "muse_privleak_auc must be null or a finite number in [0, 1] (an AUC), got a bool"),
    ({"forget_truth_ratios": [1.0, 1.0]}, "the reference has 2 forget truth ratios but forget10 has 3 questions"),
])
def test_malformed_reference_values_are_refused_before_loading(setup, reference, capsys, edit, message):
    root = setup
    data = {**json.loads(reference.read_text()), **edit}
    (root / "ref_edited.json").write_text(json.dumps(data))  # json writes NaN / Infinity as Python reads them
    err = refused(["--model", root / "no_model_here", "--tokenizer", root / "model", "--tofu", root / "tofu",
                   "--device", "cpu", "--reference", root / "ref_edited.json"], capsys)
    assert message in err


def test_save_reference_with_retain_model_is_refused(setup, capsys):
    root = setup
    err = refused(["--model", root / "model", "--tofu", root / "tofu", "--device", "cpu", "--retain-model",
                   root / "retain", "--save-reference", root / "ref_both.json"], capsys)
    assert "--save-reference writes the statistics of --model, not of --retain-model" in err
    assert not (root / "ref_both.json").exists()


def test_every_row_truncated_names_max_length(setup, capsys):
    root = setup
    err = refused(["--model", root / "model", "--tofu", root / "tofu", "--device", "cpu", "--max-length", 12], capsys)
    assert "every one of the 3 forget rows was dropped" in err and "--max-length" in err


def test_no_holdout_file_gives_null_privleak_with_a_warning(setup, capsys, tmp_path):
    root = setup
    parts = tofu_parts()
    del parts["holdout"]
    write_tofu_folder(tmp_path / "tofu", parts)
    with pytest.warns(UserWarning, match="has no holdout10.json"):
        out = run(["--model", root / "model", "--tofu", tmp_path / "tofu", "--device", "cpu", "--max-new-tokens", 2],
                  capsys)
    assert out["privleak"] is None and out["mia_auc_min_k"] is None and out["privleak_reference_auc"] is None
    assert "holdout_rows_dropped" not in out and out["forget_rows_dropped"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch has no CUDA device")
def test_device_cuda_without_cuda_is_refused(setup, capsys):
    root = setup
    err = refused(["--model", root / "model", "--tofu", root / "tofu", "--device", "cuda"], capsys)
    assert "--device: accelerator 'cuda' asked for" in err and "the only device available is the cpu" in err
