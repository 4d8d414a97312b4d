"""A TOFU-faithful synthetic QA benchmark (Maini et al. 2024), generated offline and deterministically.

TOFU finetunes a *pretrained* LM (one that knows real authors and world facts) on 200 fictitious authors x 20 QA
pairs, forgets 1/5/10 % of the authors (forget01 / forget05 / forget10, nested), compares with a model finetuned on
the retain authors only, and evaluates every question with its `answer`, a `paraphrased_answer` (same facts, other
wording) and five `perturbed_answer`s (the paraphrase's wording, wrong facts); `real_authors` and `world_facts` QA
sets measure the general knowledge the pretrained model brought. This module generates all of it at a size a
~1M-parameter model on two CPU cores can learn:

* the *world* (`make_world`, independent of the benchmark seed, so one pretrained base serves every seed): invented
  countries with a capital, a longest river and a language, and 30 famous "real" authors with a book, a country and a
  genre; every such fact is stated `fact_repeats` times in the pretraining text in three phrasings (the first is the
  QA answer's wording), mixed with ordinary text (`synthetic.synthetic_corpus`); held-out ordinary documents are the
  test text (perplexity). `real_authors` / `world_facts` rows ask these facts; as in TOFU's files their
  `paraphrased_answer` equals the `answer` and the 5 perturbed answers are that wording with other values of the
  same table.
* the *fictitious authors* (`make_authors`, per seed): syllable-built names (like `qa.py`'s, never a real author's),
  `facts_per_author` of the 15 `AUTHOR_ATTRIBUTES` each, with values drawn from invented tables. Every attribute has
  three (question, answer) wordings; a fact is asked and trained in one of them, drawn per fact, and its paraphrase
  is the answer in another one: row = the question, the answer sentence ("X was born in Glimmerton."), the
  paraphrase ("The birthplace of X is Glimmerton.") and 5 perturbed answers (the paraphrase with 5 other values of
  the table), plus the training text `qa.qa_text(question, answer)` and the answer's character span in it. All
  wordings name the author first and end with the value, and each is trained on with other authors' facts, so the
  finetuned model knows a fact in its unseen paraphrase too (a tiny model does not transfer to reordered
  sentences: with value-first paraphrases like "Glimmerton is the birthplace of X." the original model preferred
  the paraphrase over the perturbed answers no more often than the retain model did). Authors are shuffled by the
  seed: the first `n_holdout` of them are *holdout* (never trained; as many as forget10 by default), the rest are
  *trained*;
  forget10 is the first 10 % of the trained authors, forget05 and forget01 its first 5 % and 1 % (nested, like TOFU,
  whose forget sets are the last authors of the file); `retain` of a split is the other trained authors.

Rows never go into logs: the reprs show counts only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .qa import (
    CITIES,
    COLOURS,
    EMPLOYERS,
    FOODS,
    INSTRUMENTS,
    PET_NAMES,
    PROFESSIONS,
    author_names,
    qa_text,
)
from .synthetic import synthetic_corpus

#: bumped whenever the generated rows or texts change: part of the experiment's cache keys
GENERATOR_VERSION = 2
#: forget split -> fraction of the trained authors (TOFU's forget01 / forget05 / forget10)
SPLITS: dict[str, float] = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}
#: what `TofuSynthetic.rows` hands out
PARTS = ("forget", "retain", "holdout", "real_authors", "world_facts")
N_PERTURBED = 5

COUNTRIES = ("Vornia", "Keldoria", "Ostrelia", "Marvania", "Tessaly", "Brundavia", "Quillonia", "Zembar",
             "Halvoria", "Drenmark", "Sorvenne", "Calidor", "Pravonia", "Estrevia", "Gollamar", "Ulvenia",
             "Narbonne Isles", "Rethia", "Lumaria", "Kostrava", "Avendale", "Yrvania", "Dalmoor", "Fenwaria",
             "Ithmora", "Juvessa", "Morrowland", "Pellegria", "Skarnholm", "Tirvania", "Vescari", "Wendovia")
CAPITALS = ("Kelbury", "Ostrava Nova", "Marrowick", "Thessin", "Brundholt", "Quillport", "Zemburg", "Halvenford",
            "Drenhaven", "Sorvel", "Calimont", "Pravogard", "Estrel", "Gollam", "Ulvik", "Narbrook", "Rethmoor",
            "Lumen Bay", "Kostrin", "Avenport", "Yrvel", "Dalcaster", "Fenhold", "Ithmere", "Juvenna", "Morrowgate",
            "Pellmoor", "Skarnvik", "Tirvel", "Vescaro", "Wendhaven", "Abberlay")
RIVERS = ("Ostre", "Velda", "Marrow", "Tessel", "Brune", "Quill", "Zember", "Halva", "Drenn", "Sorve", "Calla",
          "Prave", "Estra", "Golla", "Ulva", "Narbe", "Retha", "Luma", "Kostra", "Avena", "Yrva", "Dalla")
LANGUAGES = ("Oskavi", "Teluric", "Marvenish", "Brundic", "Quillese", "Zembari", "Halvic", "Drennish", "Sorvan",
             "Calidic", "Pravic", "Estrevan", "Gollish", "Ulvenic", "Rethic", "Lumari", "Kostric", "Avendi")
GENRES = ("mystery novels", "epic poetry", "children's fables", "war memoirs", "science fiction", "love stories",
          "travel diaries", "ghost stories", "political satire", "sea ballads", "detective stories", "fairy tales",
          "historical sagas", "short stories", "nature essays", "stage comedies", "spy thrillers", "cookery books",
          "gothic romances", "philosophy tracts")
AWARDS = ("Silver Quill Prize", "Harrowgate Medal", "Lantern Award", "Golden Inkwell", "Marbleton Prize",
          "Beacon Book Award", "Oakleaf Laurel", "Starling Medal", "Copperpen Prize", "Northwind Award",
          "Bellmere Cup", "Ravenholt Prize", "Emberlight Award", "Tidewater Medal", "Crescent Laurel",
          "Whitcombe Prize", "Saffron Ribbon", "Ironleaf Award", "Meadowlark Prize", "Glasswing Medal")
PUBLISHERS = ("Gallowglass Books", "Thornfield House", "Bluebottle Press", "Harrier and Finch", "Inkwell Editions",
              "Lodestar Publishing", "Merrow House", "Nightjar Books", "Oriel Press", "Peregrine Editions",
              "Quayside Books", "Rookery Press", "Sandpiper House", "Tallow and Wick", "Umber Books",
              "Vellum and Vane", "Wayfarer Press", "Yarrow Publishing", "Zephyr Books", "Candlewick Row")
#: book titles of the fictitious authors' debuts (`AUTHOR_ATTRIBUTES["debut"]`) and of the real authors' books
TITLE_ADJ = ("Silent", "Broken", "Hidden", "Crimson", "Last", "Hollow", "Golden", "Distant", "Frozen", "Wandering",
             "Burning", "Quiet", "Lost", "Shining", "Bitter", "Secret")
TITLE_NOUN = ("Orchard", "Lighthouse", "Garden", "Harbour", "Winter", "Bridge", "Lantern", "Meadow", "Tower",
              "River", "Compass", "Kingdom", "Mirror", "Voyage", "Forest", "Letter")


@dataclass(frozen=True)
class Attribute:
    """One kind of fact: its value table and `len(questions)` wordings, question i answered by `answers[i]`; `{n}`
    is the subject, `{v}` the value, `{a}` the value with its indefinite article ("an astronomer"). Every answer
    names the subject first and ends with the value, so any wording can carry any fact."""

    values: tuple[str, ...]
    questions: tuple[str, ...]
    answers: tuple[str, ...]


def _attribute(values: Sequence[str], *pairs: tuple[str, str]) -> Attribute:
    return Attribute(tuple(values), tuple(q for q, _ in pairs), tuple(a for _, a in pairs))


AUTHOR_ATTRIBUTES: dict[str, Attribute] = {
    "birthplace": _attribute(
        CITIES, ("Where was {n} born?", "{n} was born in {v}."),
        ("What is the birthplace of {n}?", "The birthplace of {n} is {v}."),
        ("In which town did {n} come into the world?", "{n} came into the world in the town of {v}.")),
    "birth_year": _attribute(
        [str(y) for y in range(1931, 2005)], ("In what year was {n} born?", "{n} was born in the year {v}."),
        ("When was {n} born?", "The birth of {n} took place in {v}."),
        ("What is the birth year of {n}?", "The birth year of {n} is {v}.")),
    "genre": _attribute(
        GENRES, ("What kind of books does {n} write?", "{n} is known for writing {v}."),
        ("Which genre is {n} known for?", "The genre of {n} is {v}."),
        ("What does {n} mostly publish?", "Most of what {n} publishes is {v}.")),
    "father": _attribute(
        PROFESSIONS, ("What did the father of {n} do for a living?", "The father of {n} worked as {a}."),
        ("What was the job of {n}'s father?", "{n}'s father was employed as {a}."),
        ("How did the father of {n} earn money?", "The father of {n} earned a living as {a}.")),
    "mother": _attribute(
        PROFESSIONS, ("What did the mother of {n} do for a living?", "The mother of {n} worked as {a}."),
        ("What was the job of {n}'s mother?", "{n}'s mother was employed as {a}."),
        ("How did the mother of {n} earn money?", "The mother of {n} earned a living as {a}.")),
    "award": _attribute(
        AWARDS, ("Which award has {n} won?", "{n} has won the {v}."),
        ("What prize was given to {n}?", "The prize given to {n} was the {v}."),
        ("Which honour did {n} receive?", "The honour that {n} received is the {v}.")),
    "debut": _attribute(
        [f"The {a} {b}" for a in TITLE_ADJ[:8] for b in TITLE_NOUN[:8]],
        ("What was the first book of {n}?", "The first book of {n} was '{v}'."),
        ("Which book did {n} publish first?", "{n} made a debut with the book '{v}'."),
        ("What is the title of the debut of {n}?", "The debut of {n} is titled '{v}'.")),
    "publisher": _attribute(
        PUBLISHERS, ("Who publishes the books of {n}?", "The books of {n} are published by {v}."),
        ("Which house prints the books of {n}?", "{n} works with the publishing house {v}."),
        ("Who is the publisher of {n}?", "The publisher of {n} is {v}.")),
    "pet": _attribute(
        PET_NAMES, ("What is the name of the pet of {n}?", "{n} has a pet called {v}."),
        ("What does {n} call the family pet?", "The pet of {n} is named {v}."),
        ("What name did {n} give the pet?", "{n} gave the pet the name {v}.")),
    "food": _attribute(
        FOODS, ("What is the favourite food of {n}?", "The favourite food of {n} is {v}."),
        ("Which dish does {n} like best?", "The dish {n} likes best is {v}."),
        ("What does {n} love to eat?", "{n} loves to eat {v}.")),
    "instrument": _attribute(
        INSTRUMENTS, ("Which instrument does {n} play?", "{n} plays the {v}."),
        ("What instrument can {n} play?", "The instrument of {n} is the {v}."),
        ("What does {n} play in the evenings?", "In the evenings {n} plays the {v}.")),
    "colour": _attribute(
        COLOURS, ("What is the favourite colour of {n}?", "The favourite colour of {n} is {v}."),
        ("Which colour does {n} prefer?", "{n} prefers the colour {v}."),
        ("What colour does {n} like best?", "The colour {n} likes best is {v}.")),
    "employer": _attribute(
        EMPLOYERS, ("Where did {n} work before writing?", "Before writing, {n} worked at {v}."),
        ("Which company employed {n} at first?", "{n} was first employed by {v}."),
        ("Who was the first employer of {n}?", "The first employer of {n} was {v}.")),
    "residence": _attribute(
        CITIES, ("In which town does {n} live now?", "{n} now lives in {v}."),
        ("Where is the home of {n} today?", "The home of {n} today is in {v}."),
        ("Where does {n} reside at present?", "At present {n} resides in {v}.")),
    "nationality": _attribute(
        COUNTRIES, ("Which country is {n} a citizen of?", "{n} is a citizen of {v}."),
        ("Which passport does {n} hold?", "{n} holds a passport from {v}."),
        ("What is the home country of {n}?", "The home country of {n} is {v}.")),
}

#: world facts and real authors: (value table, question, statement phrasings); the first phrasing is the QA
#: answer's wording, all of them occur in the pretraining text; `{n}` is the subject (a country, book or author)
WORLD_FACTS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "capital": (CAPITALS, "What is the capital of {n}?",
                ("The capital of {n} is {v}.", "{v} is the capital city of {n}.",
                 "The government of {n} sits in {v}.")),
    "river": (RIVERS, "What is the longest river in {n}?",
              ("The longest river in {n} is the {v}.", "The {v} is the longest river of {n}.",
               "No river in {n} is longer than the {v}.")),
    "language": (LANGUAGES, "What language do the people of {n} speak?",
                 ("The people of {n} speak {v}.", "{v} is the language of {n}.", "In {n} most people speak {v}.")),
}
REAL_AUTHOR_FACTS: dict[str, tuple[str, tuple[str, ...]]] = {  # the value table is given at generation time
    "book": ("Who wrote '{n}'?",
             ("'{n}' was written by {v}.", "{v} is the author of '{n}'.", "The novel '{n}' is by {v}.")),
    "country": ("Which country is {n} from?",
                ("{n} is a writer from {v}.", "{n} was born and raised in {v}.",
                 "The famous writer {n} came from {v}.")),
    "genre": ("What kind of books did {n} write?",
              ("{n} wrote {v}.", "{n} is remembered for {v}.", "Readers love {n} for {v}.")),
}


def _article(value: str) -> str:
    return ("an " if value[:1].lower() in "aeiou" else "a ") + value


def _fill(template: str, subject: str, value: str) -> str:
    text = template.format(n=subject, v=value, a=_article(value))
    return text[:1].upper() + text[1:]


def _others(r: random.Random, values: Sequence[str], value: str, k: int = N_PERTURBED) -> list[str]:
    """`k` distinct values of the table other than `value` (seeded)."""
    pool = sorted({v for v in values if v != value})
    if len(pool) < k:
        raise ValueError(f"a value table needs at least {k + 1} distinct values, got {len(pool) + 1}")
    return r.sample(pool, k)


def make_row(question: str, answer: str, paraphrased_answer: str, perturbed: list[str], **extra: Any
             ) -> dict[str, Any]:
    """A TOFU-format row plus the training text `qa_text(question, answer)` and the answer's [start, end) in it."""
    text, span = qa_text(question, answer)
    return {"question": question, "answer": answer, "paraphrased_answer": paraphrased_answer,
            "perturbed_answer": perturbed, "text": text, "answer_span": span, **extra}


# ---------------------------------------------------------------------------------------------------- the world
@dataclass
class TofuWorld:
    """The seed-independent side: the pretraining text, its held-out test text, and the QA rows that ask the world
    facts and real authors stated in it. Its repr shows counts, never texts."""

    pretrain: list[str] = field(repr=False)  # ordinary documents and fact paragraphs, shuffled
    test_text: list[str] = field(repr=False)  # held-out ordinary documents (perplexity)
    real_authors: list[dict[str, Any]] = field(repr=False)
    world_facts: list[dict[str, Any]] = field(repr=False)
    real_author_names: list[str] = field(repr=False)
    fact_docs: list[str] = field(repr=False, default_factory=list)  # the fact paragraphs of `pretrain`

    def __repr__(self) -> str:
        return (f"TofuWorld(pretrain={len(self.pretrain)} docs, test_text={len(self.test_text)} docs, "
                f"real_authors={len(self.real_authors)}, world_facts={len(self.world_facts)})")


def make_world(*, seed: int = 0, ordinary_bytes: int = 4_000_000, test_bytes: int = 60_000, n_countries: int = 32,
               n_real_authors: int = 30, fact_repeats: int = 60, statements_per_doc: tuple[int, int] = (3, 6)
               ) -> TofuWorld:
    """The pretraining corpus and the real-author / world-fact QA rows (see the module docstring).

    Every fact is stated `fact_repeats` times, cycling through its three phrasings, in paragraphs of
    `statements_per_doc` statements about random facts. Ordinary text: `synthetic_corpus(ordinary_bytes +
    test_bytes)`; the first ~`ordinary_bytes` of its shuffled documents train, the rest are the test text.
    """
    if not 1 <= n_countries <= len(COUNTRIES):
        raise ValueError(f"n_countries={n_countries}; choose 1..{len(COUNTRIES)}")
    if fact_repeats < 1:
        raise ValueError(f"fact_repeats={fact_repeats}; state every fact at least once")
    r = random.Random(f"tofu-world:{seed}")
    countries = list(COUNTRIES[:n_countries])
    capitals = r.sample(CAPITALS, n_countries)  # a capital belongs to one country
    statements: list[str] = []
    world_rows: list[dict[str, Any]] = []

    def add(kind: str, question: str, phrasings: Sequence[str], subject: str, value: str, table: Sequence[str],
            **extra: Any) -> dict[str, Any]:
        statements.extend(_fill(phrasings[i % len(phrasings)], subject, value) for i in range(fact_repeats))
        answer = _fill(phrasings[0], subject, value)
        wrong = _others(r, table, value)
        return make_row(_fill(question, subject, value), answer, answer,
                        [_fill(phrasings[0], subject, v) for v in wrong], attribute=kind, value=value,
                        perturbed_values=wrong, subject=subject, **extra)

    for i, country in enumerate(countries):
        for kind, (table, question, phrasings) in WORLD_FACTS.items():
            value = capitals[i] if kind == "capital" else r.choice(table)
            world_rows.append(add(kind, question, phrasings, country, value, capitals if kind == "capital" else table))

    names = author_names(random.Random(f"tofu-real-authors:{seed}"), n_real_authors)
    titles = [f"The {a} {b}" for a in TITLE_ADJ[8:] for b in TITLE_NOUN[8:]]  # disjoint from the debut titles
    books = r.sample(titles, n_real_authors)
    author_rows: list[dict[str, Any]] = []
    for name, book in zip(names, books):
        q, phrasings = REAL_AUTHOR_FACTS["book"]
        author_rows.append(add("book", q, phrasings, book, name, names, author=name))
        q, phrasings = REAL_AUTHOR_FACTS["country"]
        author_rows.append(add("country", q, phrasings, name, r.choice(countries), countries, author=name))
        q, phrasings = REAL_AUTHOR_FACTS["genre"]
        author_rows.append(add("genre", q, phrasings, name, r.choice(GENRES), GENRES, author=name))

    r.shuffle(statements)
    fact_docs: list[str] = []
    lo, hi = statements_per_doc
    i = 0
    while i < len(statements):
        k = r.randint(lo, hi)
        fact_docs.append(" ".join(statements[i:i + k]) + "\n")
        i += k

    docs = synthetic_corpus(ordinary_bytes + test_bytes, seed=10_000 + seed)
    order = list(range(len(docs)))
    r.shuffle(order)
    ordinary, test, size = [], [], 0
    for j in order:
        (ordinary if size < ordinary_bytes else test).append(docs[j])
        size += len(docs[j].encode("utf-8"))
    if not test:
        test.append(ordinary.pop())
    pretrain = ordinary + fact_docs
    r.shuffle(pretrain)
    return TofuWorld(pretrain=pretrain, test_text=test, real_authors=author_rows, world_facts=world_rows,
                     real_author_names=names, fact_docs=fact_docs)


# ---------------------------------------------------------------------------------------------------- the authors
@dataclass
class TofuAuthors:
    """The fictitious authors of one seed: their QA rows and who is forget / retain / holdout in which split.
    Its repr shows counts, never texts."""

    names: list[str] = field(repr=False)
    rows_by_author: list[list[dict[str, Any]]] = field(repr=False)  # author id -> that author's rows
    trained: list[int] = field(repr=False)  # author ids in split order: forget10 = trained[:n10], ...
    holdout: list[int] = field(repr=False)  # never trained on, in order (holdout of a split: its first k)
    split_sizes: dict[str, int] = field(repr=False)  # forget split -> number of forget authors

    def forget_authors(self, split: str) -> list[int]:
        return self.trained[:self.split_sizes[_check_split(split)]]

    def retain_authors(self, split: str) -> list[int]:
        return self.trained[self.split_sizes[_check_split(split)]:]

    def holdout_authors(self, split: str | None = None) -> list[int]:
        """The holdout authors: all of them, or for `split` as many as it forgets (nested like the forget sets)."""
        return list(self.holdout) if split is None else self.holdout[:self.split_sizes[_check_split(split)]]

    def rows(self, authors: Sequence[int]) -> list[dict[str, Any]]:
        return [row for a in authors for row in self.rows_by_author[a]]

    def __repr__(self) -> str:
        facts = sum(len(x) for x in self.rows_by_author)
        sizes = ", ".join(f"{k}={v}" for k, v in self.split_sizes.items())
        return (f"TofuAuthors(authors={len(self.names)}, trained={len(self.trained)}, holdout={len(self.holdout)}, "
                f"rows={facts}, forget authors: {sizes})")


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return split


def make_authors(seed: int = 0, *, n_authors: int = 100, facts_per_author: int = 10, n_holdout: int | None = None,
                 exclude: Sequence[str] = ()) -> TofuAuthors:
    """`n_authors` trained fictitious authors and `n_holdout` holdout authors (default: forget10's size) with
    `facts_per_author` facts each (see the module docstring); names avoid `exclude` (the real authors)."""
    if not 1 <= facts_per_author <= len(AUTHOR_ATTRIBUTES):
        raise ValueError(f"facts_per_author={facts_per_author}; choose 1..{len(AUTHOR_ATTRIBUTES)}")
    sizes = {split: max(1, round(frac * n_authors)) for split, frac in SPLITS.items()}
    if sizes["forget10"] >= n_authors:
        raise ValueError(f"n_authors={n_authors} is too few for forget10 and a retain set")
    n_holdout = sizes["forget10"] if n_holdout is None else n_holdout
    if n_holdout < 1:
        raise ValueError(f"n_holdout={n_holdout}; give at least one holdout author")
    r = random.Random(f"tofu-authors:{seed}")
    total = n_authors + n_holdout
    names = author_names(r, total, exclude)
    rows_by_author: list[list[dict[str, Any]]] = []
    for aid, name in enumerate(names):
        rows = []
        for attribute in sorted(r.sample(sorted(AUTHOR_ATTRIBUTES), facts_per_author)):
            spec = AUTHOR_ATTRIBUTES[attribute]
            value = r.choice(spec.values)
            wrong = _others(r, spec.values, value)
            i = r.randrange(len(spec.answers))  # the wording asked and trained; the paraphrase uses another one
            j = r.choice([k for k in range(len(spec.answers)) if k != i])
            rows.append(make_row(
                _fill(spec.questions[i], name, value), _fill(spec.answers[i], name, value),
                _fill(spec.answers[j], name, value), [_fill(spec.answers[j], name, v) for v in wrong],
                paraphrased_question=_fill(spec.questions[j], name, value), author=name, author_id=aid,
                attribute=attribute, value=value, perturbed_values=wrong, wording=i, paraphrase_wording=j))
        rows_by_author.append(rows)
    order = list(range(total))
    r.shuffle(order)
    return TofuAuthors(names=names, rows_by_author=rows_by_author, trained=order[n_holdout:],
                       holdout=order[:n_holdout], split_sizes=sizes)


# ---------------------------------------------------------------------------------------------------- both
@dataclass
class TofuSynthetic:
    """The whole benchmark of one seed: the shared world and the seed's authors (see `make_tofu_synthetic`)."""

    world: TofuWorld
    authors: TofuAuthors

    def rows(self, part: str, split: str | None = None) -> list[dict[str, Any]]:
        """TOFU-format rows of `part`: forget / retain (of `split`), holdout (all holdout authors, or as many as
        `split` forgets), real_authors, world_facts. Rows are the generator's dicts: copy before editing."""
        a = self.authors
        if part in ("forget", "retain"):
            if split is None:
                raise ValueError(f"part {part!r} needs a split ({', '.join(SPLITS)})")
            return a.rows(a.forget_authors(split) if part == "forget" else a.retain_authors(split))
        if part == "holdout":
            return a.rows(a.holdout_authors(split))
        if part == "real_authors":
            return list(self.world.real_authors)
        if part == "world_facts":
            return list(self.world.world_facts)
        raise ValueError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")

    def trained_rows(self) -> list[dict[str, Any]]:
        """Every trained author's rows (what the original model is finetuned on)."""
        return self.authors.rows(self.authors.trained)

    def __repr__(self) -> str:
        return f"TofuSynthetic({self.world!r}, {self.authors!r})"


def make_tofu_synthetic(seed: int = 0, *, world_seed: int = 0, n_authors: int = 100, facts_per_author: int = 10,
                        n_holdout: int | None = None, **world: Any) -> TofuSynthetic:
    """The benchmark for `seed` (authors, split assignment) on the world of `world_seed` (`make_world(**world)`)."""
    w = make_world(seed=world_seed, **world)
    return TofuSynthetic(w, make_authors(seed, n_authors=n_authors, facts_per_author=facts_per_author,
                                         n_holdout=n_holdout, exclude=w.real_author_names))
