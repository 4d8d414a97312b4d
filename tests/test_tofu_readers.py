"""Readers of TOFU's evaluation files and MUSE's privleak texts, on files written in the hubs' exact layouts."""

import json

import pytest
from tofu_fixtures import SECRET, tofu_parts, write_jsonl, write_muse_folder, write_tofu_folder

from lightning_unlearn.data import load_muse_privleak, load_tofu_eval
from lightning_unlearn.errors import UserInputError


def test_load_tofu_eval_reads_the_hub_files(tmp_path):
    parts = tofu_parts()
    write_tofu_folder(tmp_path, parts)
    loaded = load_tofu_eval(tmp_path, "forget10")
    assert set(loaded) == {"forget", "retain", "real_authors", "world_facts", "holdout"}
    assert loaded == parts  # every field kept as it is (paraphrased_question too)
    assert len(loaded["forget"][0]["perturbed_answer"]) == 5 and len(loaded["real_authors"][0]["perturbed_answer"]) == 3
    assert "holdout" not in load_tofu_eval(tmp_path, "forget10", holdout=False)
    # another split reads its own forget file; a missing holdout file is fine
    write_jsonl(tmp_path / "forget05_perturbed.json", parts["forget"][:1])
    assert len(load_tofu_eval(tmp_path, "forget05")["forget"]) == 1 and "holdout" not in load_tofu_eval(
        tmp_path, "forget05")


def test_json_array_and_single_perturbed_answer(tmp_path):
    parts = tofu_parts()
    write_tofu_folder(tmp_path, parts)
    rows = [{**r, "perturbed_answer": r["perturbed_answer"][0]} for r in parts["world_facts"]]
    (tmp_path / "world_facts_perturbed.json").write_text(json.dumps(rows, indent=2))  # one JSON array
    loaded = load_tofu_eval(tmp_path)["world_facts"]
    assert [r["perturbed_answer"] for r in loaded] == [[r["perturbed_answer"]] for r in rows]


def test_tofu_eval_errors_name_files_rows_and_fields_never_texts(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tofu_eval(tmp_path / "nowhere")
    parts = tofu_parts()
    write_jsonl(tmp_path / "forget10_perturbed.json", parts["forget"])
    with pytest.raises(FileNotFoundError, match="lacks retain_perturbed.json, real_authors_perturbed.json, "
                                                "world_facts_perturbed.json"):
        load_tofu_eval(tmp_path)
    write_tofu_folder(tmp_path, parts)
    with pytest.raises(UserInputError, match="unknown TOFU split 'forget20'"):
        load_tofu_eval(tmp_path, "forget20")
    broken = [dict(r) for r in parts["retain"]]
    del broken[1]["paraphrased_answer"]
    write_jsonl(tmp_path / "retain_perturbed.json", broken)
    with pytest.raises(UserInputError, match=r"retain_perturbed.json' row 2 has no 'paraphrased_answer' field") as err:
        load_tofu_eval(tmp_path)
    assert "perturbed_answer" in str(err.value) and SECRET not in str(err.value) and "born" not in str(err.value)
    broken[1]["paraphrased_answer"] = ["not", "a", "string"]
    write_jsonl(tmp_path / "retain_perturbed.json", broken)
    with pytest.raises(UserInputError, match="row 2: field 'paraphrased_answer' must be a string"):
        load_tofu_eval(tmp_path)
    write_jsonl(tmp_path / "retain_perturbed.json", parts["retain"])
    (tmp_path / "holdout10.json").write_text('{"question": "q", "answer": "a"}\n{"question": ' + SECRET + "\n")
    with pytest.raises(UserInputError, match="holdout10.json' line 2 is not valid JSON") as err:
        load_tofu_eval(tmp_path)
    assert SECRET not in str(err.value)


def test_load_muse_privleak(tmp_path):
    write_muse_folder(tmp_path)
    texts = load_muse_privleak(tmp_path)
    assert [len(texts[k]) for k in ("forget", "holdout", "retain")] == [4, 4, 1]
    assert all(isinstance(t, str) for t in texts["forget"])
    # the split files in the folder itself, as JSON lines of {"text": ...}
    flat = tmp_path / "flat"
    write_jsonl(flat / "forget.json", [{"text": t} for t in texts["forget"]])
    write_jsonl(flat / "holdout.json", [{"text": t} for t in texts["holdout"]])
    assert load_muse_privleak(flat) == {"forget": texts["forget"], "holdout": texts["holdout"]}
    (flat / "holdout.json").write_text(json.dumps([{"id": 1}]))
    with pytest.raises(UserInputError, match="record 1 is not a text"):
        load_muse_privleak(flat)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no forget.json and holdout.json"):
        load_muse_privleak(tmp_path / "empty")
