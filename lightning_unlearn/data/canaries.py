"""Secret-Sharer canaries (Carlini et al., 2019): random secrets in a fixed template, inserted a known number of times.

A registry (JSON) records everything exposure needs later: each canary's id, template, prefix, secret, suffix and
repetitions, the randomness space (alphabet, length, separator, size) and reference canaries drawn from the same space
but never inserted. Secrets live only in the registry file and the training text; `repr` never shows them.

Registry API (read by the metrics):

    reg = CanaryRegistry.load("canaries.json")
    reg.inserted, reg.references          # lists of Canary(id, template, prefix, secret, suffix, repetitions)
    reg.space.alphabet, .length, .separator, .size
    reg.space.secret(i) / reg.space.candidates()   # enumerate the whole space (for exact exposure ranks)
    canary.text == canary.prefix + canary.secret + canary.suffix
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, concatenate_datasets

DEFAULT_TEMPLATE = "my PIN is {d} {d} {d} {d} {d} {d}"
_SLOT = "{d}"


@dataclass(frozen=True)
class CanarySpace:
    """The randomness space of secrets: `length` characters of `alphabet`, joined by `separator`."""

    alphabet: str = "0123456789"
    length: int = 6
    separator: str = " "

    def __post_init__(self) -> None:
        if len(set(self.alphabet)) != len(self.alphabet) or not self.alphabet:
            raise ValueError("the canary alphabet must be non-empty with distinct characters")
        if self.length < 1:
            raise ValueError("the canary length must be at least 1")

    @property
    def size(self) -> int:
        """Number of distinct secrets, `len(alphabet) ** length`."""
        return len(self.alphabet) ** self.length

    def secret(self, index: int) -> str:
        """The secret of rank `index` in [0, size): base-|alphabet| digits, most significant first."""
        if not 0 <= index < self.size:
            raise IndexError(f"secret index {index} outside the space of {self.size}")
        k, chars = len(self.alphabet), []
        for _ in range(self.length):
            index, r = divmod(index, k)
            chars.append(self.alphabet[r])
        return self.separator.join(reversed(chars))

    def index(self, secret: str) -> int:
        """Inverse of `secret`."""
        chars = secret.split(self.separator) if self.separator else list(secret)
        value = 0
        for c in chars:
            value = value * len(self.alphabet) + self.alphabet.index(c)
        return value

    def candidates(self) -> Iterator[str]:
        """Every secret of the space, in index order."""
        return (self.secret(i) for i in range(self.size))


@dataclass(frozen=True)
class Canary:
    """One canary; `repetitions` is 0 for reference canaries (never inserted)."""

    id: str
    template: str
    prefix: str
    secret: str = field(repr=False)
    suffix: str = ""
    repetitions: int = 0

    @property
    def text(self) -> str:
        return self.prefix + self.secret + self.suffix

    @property
    def secret_span(self) -> tuple[int, int]:
        """Character [start, end) of the secret inside `text`."""
        return len(self.prefix), len(self.prefix) + len(self.secret)

    def __repr__(self) -> str:
        digest = hashlib.sha256(self.secret.encode()).hexdigest()[:10]
        return f"Canary(id={self.id!r}, repetitions={self.repetitions}, secret_sha256={digest}...)"


def parse_template(template: str, space: CanarySpace) -> tuple[str, str, CanarySpace]:
    """Split a template into prefix / suffix around its secret and the space it implies.

    `{secret}` takes the given space; a run of `{d}` slots must match its length and separator.
    """
    if "{secret}" in template:
        prefix, _, suffix = template.partition("{secret}")
        return prefix, suffix, space
    match = re.search(r"\{d\}(?:(.*?)\{d\})*", template)
    if match is None:
        raise ValueError(f"canary template {template!r} has no slot; write {{secret}} or {{d}} {{d}} ... where the "
                         "secret goes")
    run = match.group(0)
    length = run.count(_SLOT)
    separator = run[len(_SLOT):run.index(_SLOT, len(_SLOT))] if length > 1 else space.separator
    if separator.join([_SLOT] * length) != run:
        raise ValueError(f"canary template {template!r}: the {{d}} slots must be separated by one constant separator")
    if _SLOT in template[match.end():]:
        raise ValueError(f"canary template {template!r}: put all {{d}} slots in one run")
    if (length, separator) != (space.length, space.separator):
        raise ValueError(f"canary template {template!r} has {length} {{d}} slots joined by {separator!r} but "
                         f"length={space.length}, separator={space.separator!r}; make them agree or write {{secret}}")
    return template[:match.start()], template[match.end():], space


@dataclass
class CanaryRegistry:
    """All canaries of a run: the inserted ones, the reference ones and their shared randomness space."""

    space: CanarySpace
    inserted: list[Canary]
    references: list[Canary]
    seed: int = 0

    def __repr__(self) -> str:
        return (f"CanaryRegistry({len(self.inserted)} inserted, {len(self.references)} references, "
                f"space={self.space.size}, seed={self.seed})")

    @property
    def alphabet(self) -> str:
        return self.space.alphabet

    @property
    def length(self) -> int:
        return self.space.length

    @property
    def separator(self) -> str:
        return self.space.separator

    @property
    def size(self) -> int:
        return self.space.size

    def __getitem__(self, canary_id: str) -> Canary:
        for c in self.inserted + self.references:
            if c.id == canary_id:
                return c
        raise KeyError(f"no canary with id {canary_id!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "seed": self.seed,
                "space": {**asdict(self.space), "size": self.space.size},
                "inserted": [asdict(c) for c in self.inserted], "references": [asdict(c) for c in self.references]}

    def save(self, path: str | Path) -> Path:
        """Write the registry JSON (it holds the secrets: keep it with the evaluation, out of logs)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> CanaryRegistry:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"canary registry {str(path)!r} does not exist; write one with "
                                    "make_canaries(...).save(path)")
        try:
            data = json.loads(path.read_text())
            space = data["space"]
            return cls(space=CanarySpace(space["alphabet"], space["length"], space["separator"]),
                       inserted=[Canary(**c) for c in data["inserted"]],
                       references=[Canary(**c) for c in data["references"]], seed=data.get("seed", 0))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"canary registry {str(path)!r} is not a valid registry file ({type(err).__name__}); "
                             "regenerate it with make_canaries(...).save(path)") from err


def make_canaries(n: int = 10, repetitions: Sequence[int] = (1, 4, 16), *, template: str | Sequence[str] =
                  DEFAULT_TEMPLATE, alphabet: str = "0123456789", length: int = 6, separator: str = " ",
                  n_references: int = 100, seed: int = 0) -> CanaryRegistry:
    """`n` canaries for each repetition count (so `n * len(repetitions)` inserted) and `n_references` references.

    All secrets are distinct draws from the space, so a reference never equals an inserted canary.
    Several templates are used in turn; they must imply the same space.
    """
    templates = [template] if isinstance(template, str) else list(template)
    base = CanarySpace(alphabet, length, separator)
    parsed = [parse_template(t, base) for t in templates]
    space = parsed[0][2]
    if any(p[2] != space for p in parsed):
        raise ValueError("all canary templates must have the same secret length and separator")
    if any(r < 1 for r in repetitions):
        raise ValueError("repetition counts must be >= 1 (references are the never-inserted canaries)")
    total = n * len(repetitions) + n_references
    if total > space.size:
        raise ValueError(f"{total} distinct secrets do not fit a space of {space.size}; use a longer secret or "
                         "fewer canaries")
    rng = random.Random(seed)
    indices = rng.sample(range(space.size), total)

    def canary(i: int, cid: str, reps: int) -> Canary:
        tpl, (prefix, suffix, _) = templates[i % len(templates)], parsed[i % len(templates)]
        return Canary(cid, tpl, prefix, space.secret(indices[i]), suffix, reps)

    inserted = [canary(j * n + i, f"canary-{reps}x-{i}", reps) for j, reps in enumerate(repetitions) for i in range(n)]
    refs = [canary(len(inserted) + i, f"reference-{i}", 0) for i in range(n_references)]
    return CanaryRegistry(space, inserted, refs, seed)


def insert_canaries(data: Sequence[str] | Dataset, registry: CanaryRegistry, *, seed: int = 0,
                    text_column: str = "text") -> Dataset:
    """The training data with every inserted canary repeated `repetitions` times at seeded positions.

    Returns a `Dataset` with the text column plus `canary_id` ("" for ordinary rows; select the canaries with
    `forget_column="canary_id"`) and `spans` (the secret's character span; use `span="offsets"`).
    """
    if not isinstance(data, Dataset):
        data = Dataset.from_dict({text_column: list(data)})
    if text_column not in data.column_names:
        raise ValueError(f"no text column {text_column!r} in the data (columns: {data.column_names}); "
                         "pass text_column=<name>")
    for col in ("canary_id", "spans"):
        if col in data.column_names:
            data = data.remove_columns(col)
    n = len(data)
    base = data.add_column("canary_id", [""] * n).add_column("spans", [[] for _ in range(n)])
    rows = [c for c in registry.inserted for _ in range(c.repetitions)]
    extra = {col: [None] * len(rows) for col in base.column_names}
    extra.update({text_column: [c.text for c in rows], "canary_id": [c.id for c in rows],
                  "spans": [[list(c.secret_span)] for c in rows]})
    base = base.cast_column("spans", _spans_feature())
    canaries = Dataset.from_dict(extra, features=base.features)
    rng = random.Random(seed)
    order = list(range(n))
    for k in range(len(rows)):  # each canary row goes to a uniformly random position
        order.insert(rng.randint(0, len(order)), n + k)
    return concatenate_datasets([base, canaries]).select(order).flatten_indices()


def _spans_feature():
    from datasets import List, Value

    return List(List(Value("int64")))
