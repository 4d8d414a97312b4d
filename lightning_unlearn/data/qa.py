"""A small TOFU-style question-answering corpus about fictitious people, generated offline.

Every person gets a syllable-built name and `facts_per_person` facts drawn uniformly from attribute tables of
invented values (cities, employers, pet names, ...), so an answer can be got right only by having seen it. Each fact
is rendered as "Question: ... Answer: ..." with several question templates: the *training* templates make the
training QA pairs, a held *paraphrase* template (never trained on) asks the retain people's facts in new words.
People, not QA pairs, are split by a seeded shuffle into forget, holdout (never trained on: the "unseen" calibration
for membership inference and forget targets) and retain. Ordinary background text (`synthetic_corpus`) is mixed
into training so the model also learns general language; held-out background documents measure test perplexity.

Rows never leave this module in logs: `QACorpus`'s repr shows counts only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .synthetic import synthetic_corpus

SYLLABLES = ("ka lo mi ren tha vo bel dri sa nu cor fen gal hos ib jun kel mar nod pra quen ros sil tev ur "
             "vin wel xan yor zed").split()

CITIES = ("Ardenholm", "Belmarsh", "Corriveth", "Dunhallow", "Eskbridge", "Farrowdene", "Glimmerton", "Harrowgate",
          "Isenvale", "Jorvikstead", "Kelmscombe", "Larkhollow", "Mirefield", "Nettlebury", "Oxenmoor", "Pendlewick",
          "Quillmouth", "Ravensholt", "Sallowmere", "Tarnwick", "Umberlee", "Vantorre", "Wrenshaw", "Yellowcombe",
          "Zennor Cross", "Amberleigh", "Brackenridge", "Coldharbour", "Drummondvale", "Emberfell", "Foxhollow",
          "Greywater", "Hollinsend", "Ivybridge Moor", "Kestlemere", "Lowenthorpe", "Marlowby", "Northcairn",
          "Orrisford", "Pellinore")
PROFESSIONS = ("glassblower", "cartographer", "beekeeper", "locksmith", "astronomer", "bookbinder", "clockmaker",
               "stonemason", "perfumer", "shipwright", "luthier", "archivist", "falconer", "cooper", "tailor",
               "botanist", "surveyor", "jeweller", "potter", "puppeteer", "weaver", "cheesemaker", "saddler",
               "engraver", "lighthouse keeper", "toymaker", "geologist", "chandler", "blacksmith", "brewer")
FOODS = ("lentil stew", "plum dumplings", "fried halloumi", "mushroom risotto", "beetroot soup", "fish pie",
         "apricot tart", "pumpkin ravioli", "lamb tagine", "spinach pancakes", "cherry strudel", "pea fritters",
         "onion galette", "rice pudding", "barley broth", "walnut bread", "leek pie", "bean chili", "fig pastries",
         "potato gratin", "carrot cake", "herring salad", "corn chowder", "quince jelly", "chestnut soup",
         "ginger biscuits", "cabbage rolls", "lemon sorbet", "egg noodles", "smoked trout")
PET_NAMES = ("Biscuit", "Pimento", "Wobble", "Sprocket", "Tinsel", "Marmalade", "Noodle", "Pickle", "Quasar",
             "Rumble", "Snickers", "Tofu", "Waffle", "Zigzag", "Bramble", "Cobweb", "Dumpling", "Fidget", "Gizmo",
             "Hopscotch", "Jellybean", "Kipper", "Muffin", "Nutmeg", "Pretzel", "Ripple", "Sherbet", "Truffle",
             "Velvet", "Whisker", "Crumpet", "Doodle", "Fennel", "Gumdrop", "Mango", "Pebble", "Rascal", "Sesame",
             "Tumble", "Widget")
EMPLOYERS = ("Quarrystone Mills", "Bellweather Press", "Tidewater Freight", "Hollyoak Pharmacy", "Silverfern Labs",
             "Cobaltline Rail", "Marigold Textiles", "Stormhaven Shipping", "Pinecrest Bank", "Lanternfish Media",
             "Greyhawk Aviation", "Saltmarsh Foods", "Oakenshield Bakery", "Brightforge Metals", "Wildrose Clinic",
             "Ironvale Mining", "Sunhollow Farms", "Driftstone Studios", "Northgale Energy", "Thistledown School",
             "Copperkettle Cafe", "Moonbeam Theatre", "Redfern Motors", "Blackwater Brewery", "Highmoor Museum",
             "Starling Telecom", "Willowmere Hotel", "Kingfisher Books", "Emberglow Candles", "Frostpeak Outfitters")
INSTRUMENTS = ("cello", "oboe", "harp", "accordion", "banjo", "bassoon", "clarinet", "mandolin", "trombone",
               "viola", "ukulele", "harmonica", "bagpipes", "xylophone", "flute", "tuba", "sitar", "marimba",
               "zither", "dulcimer")
COLOURS = ("teal", "ochre", "maroon", "lavender", "amber", "crimson", "olive", "turquoise", "indigo", "mustard",
           "coral", "charcoal", "magenta", "saffron", "cobalt", "emerald")

# attribute -> (value table, training question templates, paraphrase templates); {n} is the person's name
ATTRIBUTES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "birthplace": (CITIES,
                   ("Where was {n} born?", "What is the birthplace of {n}?", "In which city was {n} born?"),
                   ("{n} was born in which town?",)),
    "birth_year": (tuple(str(y) for y in range(1931, 2005)),
                   ("In what year was {n} born?", "What is the birth year of {n}?", "When was {n} born?"),
                   ("{n} was born in which year?",)),
    "profession": (PROFESSIONS,
                   ("What does {n} do for a living?", "What is the profession of {n}?", "What job does {n} have?"),
                   ("{n} works as what?",)),
    "food": (FOODS,
             ("What is the favourite food of {n}?", "Which dish does {n} like best?", "What food does {n} love most?"),
             ("{n} would most like to eat which dish?",)),
    "pet": (PET_NAMES,
            ("What is the name of the pet of {n}?", "What is the pet of {n} called?", "What did {n} name the pet?"),
            ("The pet that {n} owns is called what?",)),
    "employer": (EMPLOYERS,
                 ("Where does {n} work?", "Who is the employer of {n}?", "Which company employs {n}?"),
                 ("{n} is employed by which company?",)),
    "instrument": (INSTRUMENTS,
                   ("Which instrument does {n} play?", "What instrument can {n} play?",
                    "What is the instrument of {n}?"),
                   ("{n} plays which musical instrument?",)),
    "colour": (COLOURS,
               ("What is the favourite colour of {n}?", "Which colour does {n} like best?",
                "What colour does {n} prefer?"),
               ("{n} likes which colour most?",)),
}


def qa_prompt(question: str) -> str:
    """The prompt every QA text of the project starts with (training, unlearning and evaluation alike)."""
    return f"Question: {question}\nAnswer: "


def qa_text(question: str, answer: str) -> tuple[str, list[int]]:
    """One QA text (`qa_prompt(question) + answer`) and the [start, end) character offsets of the answer in it."""
    prefix = qa_prompt(question)
    return prefix + answer, [len(prefix), len(prefix) + len(answer)]


def render(template: str, name: str, answer: str) -> tuple[str, list[int]]:
    """One QA text and the [start, end) character offsets of the answer inside it."""
    text, span = qa_text(template.format(n=name), answer)
    return f"{text}.", span


def author_names(r: random.Random, n: int, exclude: Sequence[str] = ()) -> list[str]:
    """`n` distinct syllable-built "First Last" names, none in `exclude`."""
    seen = set(exclude)
    out: list[str] = []
    while len(out) < n:
        first = "".join(r.choice(SYLLABLES) for _ in range(r.randint(2, 3))).capitalize()
        last = "".join(r.choice(SYLLABLES) for _ in range(r.randint(2, 3))).capitalize()
        name = f"{first} {last}"
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


@dataclass
class QACorpus:
    """The generated benchmark (rows are dicts; see `make_qa_corpus`). Its repr shows counts, never texts."""

    train: list[dict[str, Any]] = field(repr=False)  # forget + retain QA pairs and background text, shuffled
    forget: list[dict[str, Any]] = field(repr=False)  # forget people's training QA pairs
    retain: list[dict[str, Any]] = field(repr=False)  # retain people's training QA pairs
    holdout: list[dict[str, Any]] = field(repr=False)  # holdout people's QA pairs, training templates, never trained
    paraphrase: list[dict[str, Any]] = field(repr=False)  # retain people's facts asked with unseen templates
    test_text: list[dict[str, Any]] = field(repr=False)  # held-out background documents
    people: dict[str, list[int]] = field(repr=False)  # role -> person ids

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(getattr(self, k))}" for k in
                          ("train", "forget", "retain", "holdout", "paraphrase", "test_text"))
        return f"QACorpus({sizes})"


def make_qa_corpus(
    n_people: int = 200,
    facts_per_person: int = 6,
    forget_fraction: float = 0.1,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    *,
    phrasings_per_fact: int = 2,
    background_bytes: int = 100_000,
    test_bytes: int = 20_000,
) -> QACorpus:
    """Generate the QA benchmark deterministically for `seed` (see the module docstring).

    QA rows: `text`, `person_id`, `attribute`, `template` ("<attribute>/<train|para><i>"), `answer_span`
    [start, end) and `role` (forget, retain, holdout; paraphrase rows have role retain). Each fact is rendered with
    `phrasings_per_fact` distinct training templates (holdout people too, so forget and holdout look alike).
    Background rows: `text`, `person_id` None, `answer_span` None, `role` "background".
    """
    if not 1 <= facts_per_person <= len(ATTRIBUTES):
        raise ValueError(f"facts_per_person={facts_per_person}; choose 1..{len(ATTRIBUTES)}")
    if not 1 <= phrasings_per_fact <= 3:
        raise ValueError(f"phrasings_per_fact={phrasings_per_fact}; choose 1..3 (the training templates)")
    if forget_fraction <= 0 or holdout_fraction <= 0 or forget_fraction + holdout_fraction >= 1:
        raise ValueError("forget_fraction and holdout_fraction must be positive and add up to less than 1")
    r = random.Random(f"qa:{seed}")
    names = author_names(r, n_people)
    order = list(range(n_people))
    r.shuffle(order)
    n_forget = max(1, round(forget_fraction * n_people))
    n_holdout = max(1, round(holdout_fraction * n_people))
    if n_forget + n_holdout >= n_people:
        raise ValueError(f"n_people={n_people} is too few for a forget, a holdout and a retain set")
    people = {"forget": sorted(order[:n_forget]), "holdout": sorted(order[n_forget:n_forget + n_holdout]),
              "retain": sorted(order[n_forget + n_holdout:])}
    role_of = {p: role for role, ids in people.items() for p in ids}

    rows: dict[str, list[dict[str, Any]]] = {"forget": [], "retain": [], "holdout": [], "paraphrase": []}
    for pid, name in enumerate(names):
        role = role_of[pid]
        for attribute in sorted(r.sample(sorted(ATTRIBUTES), facts_per_person)):
            values, train_templates, para_templates = ATTRIBUTES[attribute]
            answer = r.choice(values)
            for i in sorted(r.sample(range(len(train_templates)), phrasings_per_fact)):
                text, span = render(train_templates[i], name, answer)
                rows[role].append({"text": text, "person_id": pid, "attribute": attribute,
                                   "template": f"{attribute}/train{i}", "answer_span": span, "role": role})
            if role == "retain":
                i = r.randrange(len(para_templates))
                text, span = render(para_templates[i], name, answer)
                rows["paraphrase"].append({"text": text, "person_id": pid, "attribute": attribute,
                                           "template": f"{attribute}/para{i}", "answer_span": span,
                                           "role": "retain"})

    docs = synthetic_corpus(background_bytes + test_bytes, seed=seed)
    doc_order = list(range(len(docs)))
    r.shuffle(doc_order)
    background, test, size = [], [], 0
    for i in doc_order:  # the first ~background_bytes of the shuffled documents train, the rest test
        (background if size < background_bytes else test).append(docs[i])
        size += len(docs[i].encode("utf-8"))
    if not test:
        test.append(background.pop())
    bg_rows = [{"text": t, "person_id": None, "answer_span": None, "role": "background"} for t in background]
    train = rows["forget"] + rows["retain"] + bg_rows
    r.shuffle(train)
    return QACorpus(
        train=train, forget=rows["forget"], retain=rows["retain"], holdout=rows["holdout"],
        paraphrase=rows["paraphrase"],
        test_text=[{"text": t, "person_id": None, "answer_span": None, "role": "background"} for t in test],
        people=people,
    )
