"""TOFU and MUSE adapters on small local fixtures in the benchmarks' schemas."""

from pathlib import Path

import pytest

from lightning_unlearn.data.adapters import load_muse, load_tofu, muse_datamodule, tofu_datamodule

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("split,n_forget", [("forget01", 1), ("forget05", 2), ("forget10", 4)])
def test_tofu_splits(split, n_forget):
    parts = load_tofu(FIXTURES / "tofu", split)
    assert len(parts["forget"]) == n_forget and len(parts["retain"]) == 40 - n_forget
    row = parts["forget"][0]
    (s, e), = row["spans"]
    assert row["text"].startswith("Question: ") and row["text"][s - len("Answer: "):s] == "Answer: "
    assert e == len(row["text"])
    assert ("holdout" in parts) == (split == "forget10")


def test_tofu_datamodule_masks_questions(tmp_path):
    dm = tofu_datamodule(FIXTURES / "tofu", "forget10", vocab_size=300, max_length=128, batch_size=4,
                         tokenizer_dir=tmp_path / "tok", holdout_fraction=0.0)
    dm.setup()
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    assert len(dm.split("forget")) == 4 and len(dm.split("retain")) == 36 and len(dm.split("holdout")) == 4
    batch = next(iter(dm.curvature_dataloader("forget")))
    for labels in batch["labels"]:
        answer = dm.tokenizer.decode(labels[labels != -100])
        assert "Question" not in answer and answer.strip().endswith(".")
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert set(batch) == {"forget", "retain"}


def test_muse_datamodule():
    parts = load_muse(FIXTURES / "muse")
    assert [len(parts[k]) for k in ("forget", "retain", "holdout")] == [5, 17, 8]
    dm = muse_datamodule(FIXTURES / "muse", vocab_size=300, max_length=64, holdout_fraction=0.0)
    assert dm.forget_example_ids == [0, 1, 2, 3, 4]
    assert sorted(dm.texts["retain"]["example_id"]) == list(range(5, 22))
    with pytest.raises(FileNotFoundError, match="no retain2 file in .*expected retain2.json"):
        load_muse(FIXTURES / "muse", retain="retain2")


def test_bad_benchmark_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown TOFU split 'forget20'; choose one of forget01"):
        load_tofu(FIXTURES / "tofu", "forget20")
    with pytest.raises(FileNotFoundError, match="benchmark folder .* does not exist"):
        load_tofu(tmp_path / "nothing", "forget01")
    (tmp_path / "forget01.jsonl").write_text('{"text": "no question here"}\n')
    (tmp_path / "retain99.jsonl").write_text('{"text": "nor here"}\n')
    with pytest.raises(ValueError, match="not a TOFU file: no 'question' column"):
        load_tofu(tmp_path, "forget01")
