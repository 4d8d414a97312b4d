"""Loading every local format, save_to_disk folders, streaming vs map-style, and the file errors."""

import json

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict

from lightning_unlearn.data import ForgetRetainDataModule, load_source, train_bpe_tokenizer
from lightning_unlearn.data.sources import check_utf8
from lightning_unlearn.errors import UserInputError

TEXTS = [f"record {i}: Ada Lovelace lives at {i} Elm Street, phone 0{i:03d} 555 0{i:02d}" for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS * 3, vocab_size=300)


def write_all(tmp_path):
    """The same texts in every supported format."""
    paths = {}
    (tmp_path / "d.txt").write_text("\n".join(TEXTS) + "\n")
    paths["txt"] = tmp_path / "d.txt"
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    paths["jsonl"] = tmp_path / "d.jsonl"
    (tmp_path / "d.json").write_text(json.dumps([{"text": t} for t in TEXTS]))
    paths["json"] = tmp_path / "d.json"
    pd.DataFrame({"text": TEXTS}).to_csv(tmp_path / "d.csv", index=False)
    paths["csv"] = tmp_path / "d.csv"
    pd.DataFrame({"text": TEXTS}).to_parquet(tmp_path / "d.parquet")
    paths["parquet"] = tmp_path / "d.parquet"
    Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "saved"))
    paths["save_to_disk"] = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_dict({"text": TEXTS})}).save_to_disk(str(tmp_path / "saved_dict"))
    paths["save_to_disk_dict"] = tmp_path / "saved_dict"
    return paths


def test_every_local_format_loads_the_same_texts(tmp_path):
    for fmt, path in write_all(tmp_path).items():
        ds = load_source(path)
        assert ds["text"] == TEXTS, fmt
        stream = load_source(path, streaming=True)
        assert [r["text"] for r in stream] == TEXTS, fmt


def test_datamodule_from_saved_dataset_and_files(tmp_path, tokenizer):
    paths = write_all(tmp_path)
    for fmt in ("save_to_disk", "parquet", "txt"):
        dm = ForgetRetainDataModule(paths[fmt], forget_ids=[3, 7], tokenizer=tokenizer, max_length=64)
        assert dm.forget_example_ids == [3, 7], fmt


def test_streaming_and_map_style_yield_the_same_examples(tmp_path, tokenizer):
    path = write_all(tmp_path)["jsonl"]
    out = {}
    for streaming in (False, True):
        dm = ForgetRetainDataModule(path, forget_regex=r"record 1\d:", tokenizer=tokenizer, max_length=64,
                                    streaming=streaming, test_fraction=0.1, holdout_fraction=0.1, batch_size=4)
        out[streaming] = {}
        for split in ("forget", "retain", "full", "test", "holdout"):
            batches = list(dm.dataloader(split))
            out[streaming][split] = [(int(e), tuple(i[m.bool()].tolist())) for b in batches
                                     for e, i, m in zip(b["example_id"], b["input_ids"], b["attention_mask"])]
    assert out[False] == out[True]
    assert len(out[True]["forget"]) == 10 and out[True]["test"] and out[True]["holdout"]


def test_missing_file_names_the_path():
    with pytest.raises(FileNotFoundError, match="train file .*nope.jsonl.* does not exist; check the path"):
        load_source("/tmp/definitely/nope.jsonl", name="train")


def test_unreadable_format(tmp_path):
    bad = tmp_path / "data.xyz"
    bad.write_text("hello")
    with pytest.raises(ValueError, match=r"unreadable format '.xyz'; use one of .*\.jsonl"):
        load_source(bad)


def test_corrupt_file(tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": unquoted\n')
    with pytest.raises(ValueError, match="could not be read as json.*check that the file is valid json"):
        load_source(bad, name="train")


def test_missing_text_column(tmp_path, tokenizer):
    """No `text` column: an error listing the columns, never a guess (even with a single string column)."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"body": t, "n": 1}) + "\n" for t in TEXTS[:5]))
    ds = load_source(path)
    assert ds.column_names == ["body", "n"]
    with pytest.raises(UserInputError, match=r"train file '.*d.jsonl' has no text column 'text' \(columns: \['body', "
                                             r"'n'\]\); pass text_column=<name>.*\(string columns: body\)"):
        ForgetRetainDataModule(path, forget_ids=[0], tokenizer=tokenizer).setup()
    assert ForgetRetainDataModule(path, forget_ids=[0], tokenizer=tokenizer, text_column="body").forget_example_ids \
        == [0]
    path.write_text("".join(json.dumps({"a": t, "b": t}) + "\n" for t in TEXTS[:5]))
    with pytest.raises(ValueError, match="no text column 'text'.*pass text_column=<name>"):
        ForgetRetainDataModule(path, forget_ids=[0], tokenizer=tokenizer).setup()


def test_csv_without_text_column(tmp_path, tokenizer):
    path = tmp_path / "d.csv"
    pd.DataFrame({"body": TEXTS[:6], "doc": range(6)}).to_csv(path, index=False)
    with pytest.raises(UserInputError, match=r"train file .*d.csv' has no text column 'text' \(columns: \['body', "
                                             r"'doc'\]\); pass text_column=<name>"):
        ForgetRetainDataModule(path, forget_ids=[0], tokenizer=tokenizer).setup()
    with pytest.raises(UserInputError, match="no text column 'txt'"):  # a wrong explicit name: the same error
        ForgetRetainDataModule(path, forget_ids=[0], tokenizer=tokenizer, text_column="txt").setup()


def test_non_utf8_file_names_file_and_line(tmp_path):
    good = json.dumps({"text": "fine"}) + "\n"
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((good * 2).encode() + '{"text": "caf\u00e9 secret"}\n'.encode("latin-1") + good.encode())
    for streaming in (False, True):
        with pytest.raises(UserInputError, match=r"train file '.*latin1.jsonl' is not valid UTF-8: line 3, byte "
                                                 r"offset \d+ \(byte 0xe9.*re-encode the file as UTF-8") as err:
            load_source(path, name="train", streaming=streaming)
        assert "secret" not in str(err.value) and "caf" not in str(err.value)  # the line's text is not shown
    csv = tmp_path / "d.csv"
    csv.write_bytes(b"text\nok\nbad \xff\n")
    with pytest.raises(UserInputError, match=r"d.csv' is not valid UTF-8: line 3"):
        load_source(csv)


def test_utf8_check_across_chunk_boundaries(tmp_path):
    """A multi-byte character split between two reads is valid; a truncated one at the end is not."""
    path = tmp_path / "d.txt"
    path.write_bytes(("é" * 50 + "\n").encode() * 3)
    for size in (1, 2, 3, 7, 64):
        check_utf8(path, chunk_size=size)
    path.write_bytes(("é" * 5 + "\n").encode() + "é".encode()[:1])
    with pytest.raises(UserInputError, match="line 2, byte offset 11"):
        check_utf8(path, chunk_size=4)
    check_utf8(path, limit=7, chunk_size=2)  # only the first 7 bytes, the 4th é cut by the limit (streaming: a prefix)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_files_name_the_file(tmp_path, tokenizer, content):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:10]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    assert len(load_source(empty)) == 0
    for role in ("train", "retain", "holdout"):
        kw = {"forget": [TEXTS[0]], "retain": TEXTS[1:]} if role != "train" else {"forget_ids": [0]}
        kw[role] = empty
        with pytest.raises(UserInputError, match=rf"the {role} file '.*empty.jsonl' has no examples"):
            ForgetRetainDataModule(tokenizer=tokenizer, **kw).setup()
    header_only = tmp_path / "h.csv"
    header_only.write_text("text\n")
    with pytest.raises(UserInputError, match=r"the forget set is empty: the forget file '.*h.csv' has no examples"):
        ForgetRetainDataModule(train, forget=header_only, tokenizer=tokenizer).setup()


def test_streaming_shards_across_processes(tmp_path, tokenizer):
    """Each rank streams a disjoint shard (split_dataset_by_node); together they cover the split."""
    path = write_all(tmp_path)["jsonl"]
    shards = []
    for rank in range(2):
        dm = ForgetRetainDataModule(path, forget_ids=[0], tokenizer=tokenizer, streaming=True, holdout_fraction=0,
                                    test_fraction=0)
        dm._rank_world = lambda rank=rank: (rank, 2)  # what a 2-process Trainer reports
        shards.append([int(i) for b in dm.curvature_dataloader("retain") for i in b["example_id"]])
    assert set(shards[0]).isdisjoint(shards[1]) and sorted(shards[0] + shards[1]) == list(range(1, len(TEXTS)))


def test_txt_loses_its_byte_order_mark_and_blank_lines(tmp_path, tokenizer):
    """A BOM stayed in the first text of a .txt file (JSONL and CSV drop it), blank lines became empty examples, and
    a file of whitespace lines was not refused as empty (a JSONL one is)."""
    path = tmp_path / "bom.txt"
    path.write_bytes(("\ufeff" + TEXTS[0] + "\n\n   \n" + TEXTS[1] + "\n\t\n").encode())
    assert load_source(path)["text"] == TEXTS[:2]
    assert [r["text"] for r in load_source(path, streaming=True)] == TEXTS[:2]
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\t\n")
    with pytest.raises(UserInputError, match=r"the holdout file '.*blank.txt' has no examples \(an empty file, blank "
                                             r"lines only"):
        ForgetRetainDataModule(TEXTS, forget_ids=[0], holdout=blank, tokenizer=tokenizer).setup()


def test_csv_text_column_of_digits_is_text(tmp_path, tokenizer):
    """A CSV text column of digits ("1234", "0456") was read as integers and refused as "holds int, not text"."""
    path = tmp_path / "pins.csv"
    pd.DataFrame({"text": [f"0{i:03d}" for i in range(40)]}).to_csv(path, index=False)
    assert load_source(path)["text"][:3] == ["0000", "0001", "0002"]
    dm = ForgetRetainDataModule(path, forget_ids=[3], tokenizer=tokenizer, max_length=64)
    assert dm.forget_example_ids == [3] and dm.texts["forget"]["text"] == ["0003"]


def test_csv_integer_ids_with_a_gap_match_integer_forget_ids(tmp_path, tokenizer):
    """An integer id column with one empty cell is read as floats (3.0): forget_ids=[3] must still select id 3."""
    path = tmp_path / "ids.csv"
    ids = [None if i == 10 else i for i in range(40)]
    pd.DataFrame({"id": ids, "text": TEXTS}).to_csv(path, index=False)
    for forget_ids in ([3], ["3"], [3.0]):
        dm = ForgetRetainDataModule(path, id_column="id", forget_ids=forget_ids, tokenizer=tokenizer, max_length=64)
        assert dm.forget_example_ids == [3] and dm.texts["forget"]["key"] == ["3"], forget_ids


def test_a_dataset_dict_without_the_split_names_source_split(tmp_path, tokenizer):
    """The fix named `split=`, which the data module does not take: its argument is `source_split`."""
    DatasetDict({"validation": Dataset.from_dict({"text": TEXTS})}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(UserInputError, match=r"has splits \['validation'\] but not 'train'; pass "
                                             r"source_split=<one of them>"):
        ForgetRetainDataModule(tmp_path / "dict", forget_ids=[0], tokenizer=tokenizer).setup()
    dm = ForgetRetainDataModule(tmp_path / "dict", forget_ids=[0], source_split="validation", tokenizer=tokenizer,
                                max_length=64)
    assert dm.forget_example_ids == [0]


def test_a_list_source_names_its_bad_item():
    with pytest.raises(TypeError, match=r"forget: a list source must hold strings \(the texts\); item 2 is a int"):
        load_source(["a text", "another", 5], name="forget")


@pytest.mark.parametrize("role", ["forget", "holdout"])
@pytest.mark.parametrize("value", ["record 3: the password is ZQXSECRET77813 keep it", "ZQXSECRET77813",
                                   '["record 3: ZQXSECRET77813", 5]', "ZQXSECRET77813.txt"])
def test_a_forget_string_is_never_a_hub_id_nor_echoed(value, role):
    """forget="<a text>" (or a list read as one string by the command) was sent to the hub as a dataset name: the
    secret went into a URL, the logs and the exception. A forget or holdout string that is not an existing path is
    refused before anything is sent, without the value."""
    with pytest.raises(UserInputError, match=rf"{role}: the given string is not an existing file or folder \(the "
                                             r"value is not shown.*a list of texts") as err:
        load_source(value, name=role)
    assert "ZQXSECRET" not in str(err.value)
    kw = {"train": TEXTS, role: value} if role == "forget" else {"train": TEXTS, "forget_ids": [0], role: value}
    with pytest.raises(UserInputError, match=rf"{role}: the given string is not an existing file") as err:
        ForgetRetainDataModule(**kw, tokenizer=None).setup()
    assert "ZQXSECRET" not in str(err.value)


def test_hub_ids_are_only_valid_repo_ids():
    """Hub names stay sources for the training data ("owner/name"); a string that is no valid repo id is refused
    without being sent or repeated, whatever the role; forget data from the hub needs "hub:owner/name"."""
    from lightning_unlearn.data.sources import is_hub_id

    assert is_hub_id("locuslab/TOFU") and is_hub_id("wikitext") and is_hub_id("muse-bench/MUSE-News")
    for bad in ("two words", "a/b/c", "-x", "a--b", "x..y", '["a", 5]', "a" * 97):
        assert not is_hub_id(bad), bad
    with pytest.raises(UserInputError, match=r"train: the given string is neither an existing file or folder nor a "
                                             r"valid Hugging Face Hub dataset id \(the value is not shown") as err:
        load_source("my secret text", name="train")
    assert "secret" not in str(err.value)
    # a valid id (and a forget source asked for with hub:) goes to the hub: offline in the tests, so it is not reached
    for source, role in (("someowner/no-such-dataset", "train"), ("hub:someowner/no-such-dataset", "forget")):
        with pytest.raises(Exception, match="no-such-dataset") as err:
            load_source(source, name=role)
        assert not isinstance(err.value, UserInputError)
