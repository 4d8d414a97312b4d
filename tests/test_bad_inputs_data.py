"""Bad input, data: a user's project on disk (`make_project`), one bad data input per case (selections, columns,
encodings, empty files and splits, tokenizers). Each case asserts that the error names the problem (and the fix), that
the source model and data are byte-for-byte unchanged, and, where a forget pattern or forget ids are involved, that the
error does not repeat them (they may be secrets).

Most cases go through the API (`ForgetRetainDataModule(...).setup("fit")`, fast); a few through the command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bad_input_fixtures import (
    FORGET_IDS,
    Project,
    make_project,
    run_cli,
    texts,
    user_files_untouched,  # noqa: F401 - the autouse check of every case
)

from lightning_unlearn.data import ForgetRetainDataModule
from lightning_unlearn.errors import EXIT_USER_ERROR, UserInputError


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Project:
    """One project for the API cases (none of them writes into it; each checks the snapshot)."""
    return make_project(tmp_path_factory.mktemp("project"))


@pytest.fixture
def data_project(tmp_path) -> Project:
    """A fresh project for cases that add a bad file to the user's data folder or run the command."""
    return make_project(tmp_path)


def data_module(data_project: Project, **changes: Any) -> ForgetRetainDataModule:
    """The project's `data:` config as a data module, with keys changed (None removes one)."""
    kwargs = dict(data_project.settings()["data"])
    for key, value in changes.items():
        if value is None:
            kwargs.pop(key, None)
        else:
            kwargs[key] = value
    return ForgetRetainDataModule(**kwargs)


def data_refused(data_project: Project, match: str, *, secrets: tuple[str, ...] = (), **changes: Any) -> str:
    """Build the data module with `changes` and set it up: it must raise a UserInputError matching `match`, leave
    the project unchanged and not contain any of `secrets`. Returns the message."""
    before = data_project.snapshot()
    with pytest.raises(UserInputError, match=match) as err:
        data_module(data_project, **changes).setup("fit")
    message = str(err.value)
    assert data_project.snapshot() == before
    for secret in secrets:
        assert secret not in message, f"the error repeats {secret!r}"
    return message


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_cli(data_project: Project, *args: str) -> tuple[int, str]:
    """`lightning-unlearn fit --config <project> ARGS`: (exit code, stdout + stderr); a refusal is the user's error:
    exit 2, one line, no traceback."""
    code, out, err = run_cli(["fit", "--config", str(data_project.config), *args], data_project.root)
    if code != 0:
        assert code == EXIT_USER_ERROR and "Traceback" not in err, err[-2000:]
    return code, out + err


# ------------------------------------------------------------------ forget selections


def test_regex_matching_everything(shared):
    data_refused(shared, r"retain is empty: the forget selection \(forget_regex\) selected 36 of 36 training examples, "
                    r"so nothing would be kept.*select fewer examples \(check forget_regex\)",
            secrets=(r"record \d+",), forget_ids=None, forget_regex=r"record \d+")


def test_ids_selecting_everything(shared):
    ids = [r["id"] for r in texts()]
    message = data_refused(shared, r"retain is empty: the forget selection \(forget_ids\) selected 36 of 36",
                      forget_ids=ids)
    assert "doc-" not in message


def test_column_selecting_everything(data_project):
    rows = [{**r, "erase": True} for r in texts()]
    write_jsonl(data_project.data.parent / "marked.jsonl", rows)
    data_refused(data_project, r"retain is empty: the forget selection \(forget_column 'erase'\) selected 36 of 36",
            train=str(data_project.data.parent / "marked.jsonl"), forget_ids=None, forget_column="erase")


def test_empty_forget_selections(shared):
    data_refused(shared, r"the forget set is empty: forget_ids=\[\] selects nothing", forget_ids=[])
    data_refused(shared, "forget_regex matched no training example; check the pattern", secrets=("zulu-9",),
            forget_ids=None, forget_regex="zulu-9")


def test_forget_ids_not_in_the_data(shared):
    data_refused(shared, r"2 of the 3 forget_ids are not in the training data; ids are matched against column 'id'",
            secrets=("doc-404", "doc-999"), forget_ids=["doc-1", "doc-404", "doc-999"])


def test_invalid_regex_is_not_echoed(shared):
    data_refused(shared, r"forget_regex is not a valid regular expression: unterminated character set at position 7 "
                    r"\(the pattern is not shown",
            secrets=("PIN: ", "[0-9"), forget_ids=None, forget_regex="PIN: (([0-9")


# ------------------------------------------------------------------ files and columns


def test_csv_without_text_column(data_project):
    csv = data_project.data.parent / "train.csv"
    csv.write_text("id,body\n" + "".join(f"{r['id']},{r['text']}\n" for r in texts()))
    message = data_refused(data_project,
                           r"train file '.*train.csv' has no text column 'text' \(columns: \['id', 'body'\]\); "
                               r"pass text_column=<name>", train=str(csv))
    assert "string columns: id, body" in message
    assert data_module(data_project, train=str(csv), text_column="body").forget_example_ids == [0, 3, 7]


def test_jsonl_with_another_string_column_is_not_guessed(data_project):
    path = write_jsonl(data_project.data.parent / "renamed.jsonl", [{"id": r["id"],
                                                                     "content": r["text"]} for r in texts()])
    data_refused(data_project,
                 r"train file '.*renamed.jsonl' has no text column 'text' \(columns: \['id', 'content'\]\)",
            train=str(path))


def test_non_utf8_jsonl_names_file_and_line(data_project):
    rows = texts()
    raw = b"".join((json.dumps(r) + "\n").encode() for r in rows[:4])
    raw += '{"id": "doc-4", "text": "Jos\u00e9 record 4"}\n'.encode("latin-1")
    raw += b"".join((json.dumps(r) + "\n").encode() for r in rows[5:])
    bad = data_project.data.parent / "latin1.jsonl"
    bad.write_bytes(raw)
    data_refused(data_project, r"train file '.*latin1.jsonl' is not valid UTF-8: line 5, byte offset \d+ \(byte 0xe9.*"
                     r"re-encode the file as UTF-8", secrets=("Jos",), train=str(bad))


@pytest.mark.parametrize("role", ["train", "holdout", "test"])
def test_empty_file_names_file_and_role(data_project, role):
    empty = data_project.data.parent / f"{role}-empty.jsonl"
    empty.write_text("\n")
    data_refused(data_project,
                 rf"the {role} file '.*{role}-empty.jsonl' has no examples \(an empty file, blank lines only, "
                     r"or a header without rows\)", **{role: str(empty)})


def test_empty_forget_file(data_project):
    forget = data_project.data.parent / "forget.csv"
    forget.write_text("text\n")  # a header, no rows
    data_refused(data_project, r"the forget set is empty: the forget file '.*forget.csv' has no examples",
            forget_ids=None, id_column=None, forget=str(forget))


def test_empty_split_has_no_batch(shared):
    dm = data_module(shared, test_fraction=0.0)
    before = shared.snapshot()
    with pytest.raises(UserInputError, match=r"the test split is empty \(0 examples\), so it has no batch; set "
                                             r"test_fraction > 0 or give test=<data>"):
        dm.dataloader("test")
    assert shared.snapshot() == before


def spans_rows(spans: dict[str, Any], marked: set[str] | None = None) -> list[dict[str, Any]]:
    """The project's rows with a `secret` forget column (true for the forget ids) and `spans` on the forget rows."""
    marked = set(FORGET_IDS) if marked is None else marked
    return [{**r, "secret": r["id"] in marked, "spans": spans.get(r["id"])} for r in texts()]


def test_flat_spans_name_column_row_and_format(data_project):
    """`"spans": [5, 12]` (one flat pair) instead of `[[5, 12]]`: refused naming the column, row and format."""
    rows = spans_rows({i: [5, 12] for i in FORGET_IDS})
    path = write_jsonl(data_project.data.parent / "flat.jsonl", rows)
    message = data_refused(data_project, r"column 'spans' of train example 0 \(row 1 of the train data\) is a flat "
                                         r"list of 2 number\(s\), not a list of pairs; give the spans as \[\[start, "
                                         r"end\], \.\.\.\] character offsets",
                           secrets=("5, 12", rows[0]["text"][5:12]), train=str(path), forget_ids=None,
                           forget_column="secret", span="offsets")
    assert "Traceback" not in message


def test_csv_spans_as_json_text(data_project):
    """A CSV cell cannot hold a list: `"[[5, 12]]"` is parsed as JSON; a cell that is not a list of pairs is
    refused naming its row."""
    import csv

    def write(name: str, cell: str) -> Path:
        path = data_project.data.parent / name
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, ["id", "text", "secret", "spans"])
            writer.writeheader()
            for row in spans_rows({i: cell for i in FORGET_IDS}):
                writer.writerow({**row, "secret": int(row["secret"]), "spans": row["spans"] or ""})
        return path

    dm = data_module(data_project, train=str(write("spans.csv", "[[5, 12]]")), forget_ids=None,
                     forget_column="secret", span="offsets")
    dm.setup("fit")
    forget = dm.split("forget")
    assert list(forget["example_id"]) == [0, 3, 7] and dm.texts["forget"]["spans"] == [[[5, 12]]] * 3
    assert all(sum(lab != -100 for lab in labels) == 7 for labels in forget["labels"])  # one char = one token
    message = data_refused(data_project, r"column 'spans' of train example 0 \(row 1 of the train data\) holds text "
                                         r"that is not a JSON list; give the spans as \[\[start, end\], \.\.\.\]",
                           secrets=("5-12",), train=str(write("dash.csv", "5-12")), forget_ids=None,
                           forget_column="secret", span="offsets")
    assert "(in a CSV file, the JSON text" in message


def test_malformed_jsonl_line_names_the_line(data_project):
    lines = [json.dumps(r) for r in texts()]
    lines[4] = '{"id": "doc-4", "text": "hush secret 4242" '  # no closing brace
    bad = data_project.data.parent / "broken.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    data_refused(data_project, r"train file '.*broken.jsonl' could not be read as json: line 5 is not valid JSON "
                               r"\(Expecting ',' delimiter\); check that the file is valid json",
                 secrets=("hush", "4242"), train=str(bad))


def test_id_column_is_required_only_where_ids_are_matched(data_project):
    """A holdout (or forget, test) file without the id column was refused, with advice (id_column=None) that broke
    the forget_ids selection of the training data; it gets row numbers. The training data still needs the column."""
    holdout = write_jsonl(data_project.data.parent / "holdout.jsonl",
                          [{"text": f"held out {i}: kilo lima mike"} for i in range(5)])
    dm = data_module(data_project, holdout=str(holdout))
    dm.setup("fit")
    assert dm.forget_example_ids == [0, 3, 7] and dm.texts["holdout"]["key"] == ["0", "1", "2", "3", "4"]
    forget = write_jsonl(data_project.data.parent / "forget.jsonl", [{"text": texts()[3]["text"]}])
    assert data_module(data_project, forget_ids=None, forget=str(forget)).forget_example_ids == [3]
    train = write_jsonl(data_project.data.parent / "no_ids.jsonl", [{"text": r["text"]} for r in texts()])
    data_refused(data_project, r"id_column 'id' is not a column of the train data \(columns: \['text'\]\); give the "
                               r"column that holds the ids \(forget_ids are matched against it\), or id_column=None",
                 secrets=("doc-",), train=str(train))


# ------------------------------------------------------------------ spans and truncation


def long_forget_rows(cut: tuple[str, ...], partly: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The project's rows with span-labelled forget rows (char tokenizer: one token per character): those in `cut`
    have their secret after 80 characters of filler, those in `partly` have it across character 64 (max_length),
    the others at the start."""
    filler = "filler words to push the secret along. " * 2
    rows = []
    for r in texts():
        if r["id"] in cut:
            text = filler + "pin 9173 ok"
            start = len(filler)
        elif r["id"] in partly:
            text = filler[:60] + "pin 9173 ok"
            start = 60
        else:
            text, start = "pin 9173 ok. " + r["text"], 0
        rows.append({**r, "text": text, "secret": r["id"] in FORGET_IDS, "spans": [[start, start + 8]]})
    return rows


def test_forget_span_cut_off_by_truncation(data_project):
    """Forget texts whose span lies beyond max_length tokens would keep no label and never be unlearned: refused
    with the count and the fix (whole or partly cut: a warning for the partly cut one only)."""
    path = write_jsonl(data_project.data.parent / "long_forget.jsonl", long_forget_rows(cut=("doc-0", "doc-7")))
    message = data_refused(data_project, r"2 of 3 forget examples \(ids 0, 7\) lost their span to truncation "
                                         r"at max_length=64: every labelled token lies beyond the first 64 tokens, so "
                                         r"they would never be unlearned; raise max_length \(data.max_length.*shorten "
                                         r"or split these texts so that the span comes within the first 64 tokens",
                           secrets=("pin", "9173", "filler"), train=str(path), forget_ids=None,
                           forget_column="secret", span="offsets")
    assert "packing" not in message

    path = write_jsonl(data_project.data.parent / "partly.jsonl", long_forget_rows(cut=(), partly=("doc-3",)))
    dm = data_module(data_project, train=str(path), forget_ids=None, forget_column="secret", span="offsets")
    with pytest.warns(UserWarning, match=r"1 of 3 forget examples \(ids 3\) lost part of their span to "
                                         r"truncation at max_length=64") as caught:
        dm.setup("fit")
    assert not any("9173" in str(w.message) for w in caught)
    labelled = {i: sum(lab != -100 for lab in labels) for i, labels in zip(dm.split("forget")["example_id"],
                                                                           dm.split("forget")["labels"])}
    assert labelled == {0: 8, 3: 4, 7: 8}
    assert data_module(data_project, train=str(path), forget_ids=None, forget_column="secret", span="offsets",
                       max_length=128).split("forget")["example_id"] == [0, 3, 7]


def test_holdout_span_cut_off_by_truncation(data_project):
    """A span-labelled holdout row whose span truncation removes has no loss: it would be scored as unseen at any
    loss and move the target. Refused like a forget row."""
    train = write_jsonl(data_project.data.parent / "spans.jsonl", long_forget_rows(cut=()))
    filler = "filler words to push the secret along. " * 2
    holdout = write_jsonl(data_project.data.parent / "holdout_long.jsonl",
                          [{"text": "pin 4410 ok, the other one.", "spans": [[0, 8]]},
                           {"text": filler + "pin 5521 ok", "spans": [[len(filler), len(filler) + 8]]}])
    dm = data_module(data_project, train=str(train), forget_ids=None, forget_column="secret", span="offsets",
                     holdout=str(holdout), packing=False)
    dm.setup("fit")
    with pytest.raises(UserInputError, match=r"1 of 2 holdout examples \(ids 1\) lost their span to truncation at "
                                             r"max_length=64.*no loss to set the target with") as err:
        dm.split("holdout")
    assert not any(secret in str(err.value) for secret in ("pin", "5521", "filler"))


def test_unclosed_marker_names_the_example_and_the_file(data_project):
    """span='markers' reads every text for markers: an unclosed one (a retain text's "[0, 1)" interval) was refused
    without saying which example or file held it."""
    rows = texts()
    rows[3] = {**rows[3], "text": "pin ⟦9173⟧ ok"}
    rows[5] = {**rows[5], "text": "math: the interval ⟦0, 1) is half open"}
    path = write_jsonl(data_project.data.parent / "marked.jsonl", rows)
    data_refused(data_project, r"unclosed span marker '⟦' at character 19 of train example 5 \(row 6 of train file "
                               r"'.*marked.jsonl'\); close it with '⟧', or choose span_markers",
                 secrets=("interval", "half open", "9173"), train=str(path), forget_ids=["doc-3"], span="markers")


@pytest.mark.parametrize(("spans", "match"), [
    ([[10, 10]], r"forget example 3 has an empty span \[10, 10\) \(the span covers no character"),
    ([[19, 10]], r"forget example 3 has a reversed span \[19, 10\) \(its start is after its end\); give spans as "
                 r"\[start, end\) with start < end"),
    ([[10, 999]], r"forget example 3 has span \[10, 999\) outside its text of \d+ characters"),
])
def test_bad_spans_say_what_is_wrong(data_project, spans, match):
    """An empty or reversed span was reported as "outside its text of N characters"."""
    path = write_jsonl(data_project.data.parent / "spans.jsonl", spans_rows({"doc-3": spans}, marked={"doc-3"}))
    data_refused(data_project, match, train=str(path), forget_ids=None, forget_column="secret", span="offsets")


def test_empty_marked_span_and_empty_regex_match(data_project):
    rows = texts()
    rows[3] = {**rows[3], "text": "pin ⟦⟧ ok"}
    path = write_jsonl(data_project.data.parent / "empty_marked.jsonl", rows)
    data_refused(data_project, r"forget example 3 has an empty span \[4, 4\) \(the pair of span markers covers no "
                               r"character", train=str(path), forget_ids=["doc-3"], span="markers")
    data_refused(data_project, r"forget example 3: every match of forget_regex is empty.*match at least one character",
                 secrets=("code",), forget_ids=None, forget_regex=r"record 3(?P<span>x*):", span="regex")


# ------------------------------------------------------------------ forget texts outside the forget split


def test_unmarked_copies_of_forget_texts_leave_held_out_splits(data_project):
    """An unselected copy of a forget text that lands in the test (or holdout) share is left out of it with a
    warning (counts only), like copies in retain; an explicit test source holding a forget text is warned about;
    with forget= and retain= (no train), a copy in the retain source's test share is refused like one in retain."""
    from lightning_unlearn.data.selection import bucket, text_sha256

    rows = texts()
    u, first = min((bucket(text_sha256(r["text"]), 0), r["id"]) for r in rows)
    forget_text = next(r["text"] for r in rows if r["id"] == first)
    path = write_jsonl(data_project.data.parent / "copies.jsonl", rows + [{"id": "copy", "text": forget_text}])
    dm = data_module(data_project, train=str(path), forget_ids=[first], test_fraction=u + 1e-9,
                     holdout_fraction=0.0)
    with pytest.warns(UserWarning, match=r"1 training example\(s\) repeat a forget text without being selected; they "
                                         r"were left out of test \(1\)") as caught:
        dm.setup("fit")
    assert not any(forget_text in str(w.message) for w in caught)
    assert forget_text not in dm.texts["test"]["text"] and 36 not in dm.texts["test"]["example_id"]

    test = write_jsonl(data_project.data.parent / "test.jsonl", [{"id": "t-0", "text": "an unseen text"},
                                                                {"id": "t-1", "text": forget_text}])
    with pytest.warns(UserWarning, match=r"1 of the 2 examples of the test file '.*test.jsonl' \(ids 1\) have the "
                                         r"text of a forget example, but this data should be unseen"):
        data_module(data_project, forget_ids=[first], test=str(test)).setup("fit")

    retain = [r["text"] for r in rows if r["id"] != first] + [forget_text]
    with pytest.raises(UserInputError, match=r"forget and retain overlap: 1 retain example\(s\) \(ids 36\) have the "
                                             r"text of a forget example") as err:
        data_module(data_project, train=None, forget_ids=None, id_column=None, forget=[forget_text], retain=retain,
                    test_fraction=u + 1e-9, holdout_fraction=0.0).setup("fit")
    assert forget_text not in str(err.value)


# ------------------------------------------------------------------ tokenizers


def test_holdout_from_another_tokenizer(data_project):
    """A holdout tokenised with a bigger tokenizer: its ids do not fit the project's (45-token) tokenizer."""
    rows = [{"id": f"h-{i}", "text": f"held out {i}: kilo lima mike", "input_ids": [3, 70_000 + i]} for i in range(5)]
    holdout = write_jsonl(data_project.data.parent / "holdout.jsonl", rows)
    data_refused(data_project,
                 r"the holdout file '.*holdout.jsonl' holds token id 70004 but the tokenizer has only \d+ tokens: "
                     r"it was tokenised with another tokenizer", holdout=str(holdout))


def test_pretokenised_retain_without_text(data_project):
    retain = write_jsonl(data_project.data.parent / "retain.jsonl", [{"input_ids": [1, 2, 3]} for _ in range(5)])
    data_refused(data_project,
                 r"retain file '.*retain.jsonl' is pre-tokenised \(an input_ids column, no 'text' column.*give "
                     r"the texts", forget_ids=None, id_column=None, train=None,
            forget=[texts()[0]["text"]], retain=str(retain))


# ------------------------------------------------------------------ through the command


def test_cli_regex_matching_everything(data_project):
    before = data_project.snapshot()
    code, output = data_cli(data_project, "--data.forget_ids", "null", "--data.forget_regex", "cord [0-9]+:")
    assert code != 0
    assert "retain is empty: the forget selection (forget_regex) selected 36 of 36 training examples" in output
    assert "cord [0-9]+:" not in output and "num_samples" not in output
    assert data_project.snapshot() == before and not data_project.output.exists()


def test_cli_invalid_regex_is_not_echoed(data_project):
    before = data_project.snapshot()
    code, output = data_cli(data_project, "--data.forget_ids", "null", "--data.forget_regex", "ssn-([")
    assert code != 0
    assert "forget_regex is not a valid regular expression: unterminated character set at position 5" in output
    assert "ssn-([" not in output and "ssn" not in output
    assert data_project.snapshot() == before and not data_project.output.exists()


def test_cli_forget_ids_not_found(data_project):
    before = data_project.snapshot()
    code, output = data_cli(data_project, "--data.forget_ids", json.dumps(FORGET_IDS[:1] + ["doc-771"]))
    assert code != 0
    assert "1 of the 2 forget_ids are not in the training data" in output and "doc-771" not in output
    assert data_project.snapshot() == before and not data_project.output.exists()
