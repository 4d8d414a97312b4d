"""Which examples are forgotten, which tokens of them, and which held-out split every other example lands in.

Every row of the training data is normalised once into the same columns, for map-style and streaming sources alike:
`text` (span markers removed), `example_id` (row index), `key` (the user's id, as a string), `text_sha256`,
`spans` (character [start, end) pairs of the sensitive span; empty = the whole example), `forget` (selected or not)
and `split` ("forget", "train", "test" or "holdout").
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import UserInputError

SpanMode = Literal["example", "offsets", "markers", "regex"]
DEFAULT_MARKERS = ("⟦", "⟧")


def text_sha256(text: str) -> str:
    """The sha256 of a text: how texts are compared and reported without being shown."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def strip_markers(text: str, markers: tuple[str, str] = DEFAULT_MARKERS,
                  where: str = "a text") -> tuple[str, list[list[int]]]:
    """Remove span markers from `text`; return the clean text and the [start, end) of each marked span in it.
    `where` names the example (and its data) in the error of an unclosed marker; the text is never shown."""
    open_m, close_m = markers
    out, spans, pos, cursor = [], [], 0, 0
    while True:
        start = text.find(open_m, cursor)
        if start < 0:
            break
        end = text.find(close_m, start + len(open_m))
        if end < 0:
            raise UserInputError(f"unclosed span marker {open_m!r} at character {start} of {where}; close it with "
                                 f"{close_m!r}, or choose span_markers that this text does not use (every text is "
                                 "read for markers with span='markers', retain texts too)")
        out.append(text[cursor:start])
        pos += start - cursor
        inner = text[start + len(open_m):end]
        out.append(inner)
        spans.append([pos, pos + len(inner)])
        pos += len(inner)
        cursor = end + len(close_m)
    out.append(text[cursor:])
    return "".join(out), spans


@dataclass
class Selection:
    """How the forget set is chosen from the training data: by ids, by a truthy column, by a regex, or by texts."""

    # ids, pattern and hashes stay out of the repr: they may be secrets
    ids: Collection[Any] | None = field(default=None, repr=False)
    column: str | None = None
    regex: str | None = field(default=None, repr=False)
    hashes: Collection[str] | None = field(default=None, repr=False)  # sha256 of a separate forget source's texts
    _ids: set[str] = field(default_factory=set, init=False, repr=False)
    _pattern: re.Pattern | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        given = [n for n in ("ids", "column", "regex", "hashes") if getattr(self, n) is not None]
        if len(given) > 1:
            raise UserInputError(f"choose the forget set one way only; got {', '.join(given)}")
        if self.ids is not None:
            # a string is refused, not read as one id: iterating it would select its characters ('17' -> rows 1
            # and 7), and a string meant as a list ('doc-1,doc-2') would be silently one unknown id
            if isinstance(self.ids, (str, bytes, Mapping)) or not isinstance(self.ids, Iterable):
                raise UserInputError(f"forget_ids must be a list of ids, got a {type(self.ids).__name__} (the value is"
                                     " not shown: it may be a secret); give forget_ids=['id-a'] for one id, "
                                     "forget_ids=['id-a', 'id-b'] for several")
            self._ids = {id_key(i) for i in self.ids}
            if not self._ids:
                raise UserInputError("the forget set is empty: forget_ids=[] selects nothing; give at least one id")
        if self.regex is not None:
            try:
                self._pattern = re.compile(self.regex)
            except re.error as err:  # never echo the pattern: it may be the secret itself
                where = f" at position {err.pos}" if err.pos is not None else ""
                raise UserInputError(f"forget_regex is not a valid regular expression: {err.msg}{where} (the "
                                     "pattern is not shown: it may be a secret); fix the pattern, e.g. escape "
                                     "literal brackets and dots with re.escape") from None
        if self.hashes is not None:
            self.hashes = set(self.hashes)

    @property
    def empty(self) -> bool:
        return all(getattr(self, n) is None for n in ("ids", "column", "regex", "hashes"))

    def matches(self, row: dict, key: str, text: str, sha: str) -> bool:
        if self.ids is not None:
            return key in self._ids
        if self.column is not None:
            if self.column not in row:
                raise UserInputError(f"forget_column {self.column!r} is not a column of the training data "
                                     f"(columns: {sorted(row)}); pass the name of a boolean column")
            return bool(row[self.column])
        if self._pattern is not None:
            return self._pattern.search(text) is not None
        if self.hashes is not None:
            return sha in self.hashes
        return False

    def regex_spans(self, text: str) -> list[list[int]]:
        """Spans of the regex matches: the group named `span` when the pattern has one, else the whole match."""
        if self._pattern is None:
            raise UserInputError("span='regex' needs forget_regex=...; pass a pattern (with a (?P<span>...) group)")
        group = "span" if "span" in self._pattern.groupindex else 0
        return [[m.start(group), m.end(group)] for m in self._pattern.finditer(text) if m.start(group) >= 0]


def id_key(value: Any) -> str:
    """An id as the string it is matched by: a whole float is written as the integer it is (CSV readers turn an
    integer id column with an empty cell into floats, so id 3 was read as 3.0 and never matched forget_ids=[3])."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def check_spans(spans: Sequence[Sequence[int]], length: int, where: str, how: str = "") -> list[list[int]]:
    """`spans` as [start, end) integer pairs inside a text of `length` characters; an empty, reversed or outside span
    is refused naming `where` (the example), the span's offsets and what is wrong (never the text). `how` says where
    the span came from ("the pair of span markers") for an empty one."""
    for s, e in spans:
        if s == e:
            source = how or "the span"
            raise UserInputError(f"{where} has an empty span [{s}, {e}) ({source} covers no character, so nothing of "
                                 "it would be unlearned); give spans of at least one character (for a regex, a pattern "
                                 "that cannot match empty text, e.g. \\d+ rather than \\d*)")
        if s > e:
            raise UserInputError(f"{where} has a reversed span [{s}, {e}) (its start is after its end); give spans as "
                                 "[start, end) with start < end")
        if s < 0 or e > length:
            raise UserInputError(f"{where} has span [{s}, {e}) outside its text of {length} characters; give "
                                 "character offsets into the text (0 to its length)")
    return [[int(s), int(e)] for s, e in spans]


def bucket(sha: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the text and the seed: duplicates of a text always share a split."""
    return int(hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest()[:12], 16) / 16**12


@dataclass
class Normaliser:
    """The per-row function (for `Dataset.map` / `IterableDataset.map` with `with_indices=True`)."""

    text_column: str = "text"
    id_column: str | None = None
    selection: Selection = field(default_factory=Selection)
    span: SpanMode = "example"
    markers: tuple[str, str] = DEFAULT_MARKERS
    seed: int = 0
    test_fraction: float = 0.0
    holdout_fraction: float = 0.0
    id_offset: int = 0
    role: Literal["train", "forget", "retain", "test", "holdout"] = "train"
    source: str = ""  # where the rows come from ("train file '/x/d.jsonl'"), for messages

    def __call__(self, row: dict, idx: int) -> dict:
        raw = row[self.text_column]
        if raw is None:
            raise UserInputError(f"example {idx + self.id_offset} of the {self.role} data has no text (an empty "
                                 f"cell or null in column {self.text_column!r}); fill it in or remove the row")
        if not isinstance(raw, str):
            raise UserInputError(f"example {idx + self.id_offset}: column {self.text_column!r} holds "
                                 f"{type(raw).__name__}, not text; pass text_column=<a string column>")
        example_id = idx + self.id_offset
        text, marked = strip_markers(raw, self.markers, self._where(example_id, source=True)) \
            if self.span == "markers" else (raw, [])
        key = id_key(row[self.id_column]) if self.id_column else str(example_id)
        sha = text_sha256(text)
        if self.role == "train":
            forget = self.selection.matches(row, key, text, sha)
        else:
            forget = self.role == "forget"
        spans: list[list[int]] = []
        if forget and self.span != "example":
            spans = self._spans(row, text, marked, self.selection, example_id)
        elif self.role == "holdout" and self.span != "example":  # labelled like the forget set where it has spans
            spans = self._holdout_spans(row, text, marked, example_id)
        if forget:
            split = "forget"
        elif self.role in ("test", "holdout"):
            split = self.role
        elif self.role == "retain":
            split = "train"
        else:
            u = bucket(sha, self.seed)
            split = "test" if u < self.test_fraction else \
                "holdout" if u < self.test_fraction + self.holdout_fraction else "train"
        return {"text": text, "example_id": example_id, "key": key, "text_sha256": sha, "spans": spans,
                "forget": forget, "split": split}

    def _spans(self, row: dict, text: str, marked: list, selection: Selection, example_id: int) -> list[list[int]]:
        if self.span == "markers":
            spans = marked
        elif self.span == "regex":
            spans = selection.regex_spans(text)
        else:  # offsets
            spans = offsets_from_row(row, self._where(example_id))
        if self.span == "regex" and spans and all(s == e for s, e in spans):
            raise UserInputError(f"forget example {example_id}: every match of forget_regex is empty (a pattern that "
                                 "can match empty text, e.g. x* or an optional span group), so the example has no "
                                 "character to forget; make the pattern (or its span group) match at least one "
                                 "character")
        if self.span == "regex":  # an empty match beside real ones (e.g. of \d*) is no span
            spans = [sp for sp in spans if sp[0] != sp[1]]
        if not spans:
            raise UserInputError(f"forget example {example_id} has no sensitive span under span={self.span!r}; "
                                 "mark its span (markers, offsets or a regex match) or use span='example'")
        how = "the pair of span markers" if self.span == "markers" else ""
        return check_spans(spans, len(text), f"forget example {example_id}", how)

    def _where(self, example_id: int, source: bool = False) -> str:
        """The example and its row (1-based, data rows of the file: the line of a JSON Lines file) for messages;
        `source=True` names the data by `self.source` (its file) when the data module gave it."""
        data = self.source if source and self.source else f"the {self.role} data"
        return f"{self.role} example {example_id} (row {example_id - self.id_offset + 1} of {data})"

    def _holdout_spans(self, row: dict, text: str, marked: list, example_id: int) -> list[list[int]]:
        """An explicit holdout source's spans, found the forget set's way; none (whole-text labels) where a row has
        none. The data module checks that a span-level forget set gets a span-labelled holdout."""
        if self.span == "markers":
            spans = marked
        elif self.span == "regex":
            spans = self.selection.regex_spans(text) if self.selection._pattern is not None else []
        elif row.get("spans") is not None or ("span_start" in row and "span_end" in row):
            spans = offsets_from_row(row, self._where(example_id))
        else:
            spans = []
        if self.span == "regex":
            spans = [sp for sp in spans if sp[0] != sp[1]]
        how = "the pair of span markers" if self.span == "markers" else ""
        return check_spans(spans, len(text), f"holdout example {example_id}", how)


def offsets_from_row(row: dict, where: str = "a row") -> list[list[int]]:
    """Spans from a `spans` column (list of [start, end]; a CSV cell holds it as JSON text) or from `span_start` /
    `span_end` columns. A malformed `spans` cell is refused naming `where` (the row), the column and the format."""
    if "spans" in row and row["spans"] is not None:
        return _span_pairs(row["spans"], where)
    if "span_start" in row and "span_end" in row:
        if row["span_start"] is None or row["span_start"] < 0:
            return []
        return [[row["span_start"], row["span_end"]]]
    raise UserInputError("span='offsets' needs a 'spans' column (a list of [start, end] character offsets) or "
                         "'span_start' and 'span_end' columns; add them or choose span='markers' / 'regex'")


def _span_pairs(value: Any, where: str) -> list[list[int]]:
    """`value` as a list of [start, end] integer pairs: a JSON string is parsed (CSV cells cannot hold lists), an
    empty one is no span; anything else is refused by its shape only (the offsets are near the secret's text)."""
    text = isinstance(value, str)
    if text:
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except ValueError:
            value = None  # reported below as text that is not a JSON list
    if not isinstance(value, (list, tuple)):
        problem = "holds text that is not a JSON list" if text else f"holds a {type(value).__name__} value"
    elif value and all(_is_offset(v) for v in value):
        problem = f"is a flat list of {len(value)} number(s), not a list of pairs"
    elif all(isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_offset(v) for v in p) for p in value):
        return [[int(s), int(e)] for s, e in value]
    else:
        problem = "is not a list of [start, end] pairs of integers"
    raise UserInputError(f"column 'spans' of {where} {problem}; give the spans as [[start, end], ...] character "
                         "offsets into the text, e.g. [[10, 21]] for one span (in a CSV file, the JSON text "
                         "\"[[10, 21]]\")")


def _is_offset(value: Any) -> bool:
    """An integer character offset (a whole float too: CSV readers turn integer columns with gaps into floats)."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


def sorted_ids(values: Sequence[Any], limit: int = 5) -> str:
    """A short, printable list of ids for error messages (ids only, never texts)."""
    values = sorted(values, key=str)
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return ", ".join(map(str, values[:limit])) + more
