"""Tiny TOFU-format rows, files in the hub's exact layout (JSON lines named `<config>.json`), and a tiny model."""

import json
from pathlib import Path

NAMES = ["Ava Stone", "Ben Ray", "Cleo Park", "Dan Moss", "Eve Lin", "Finn Hale", "Gus Kay", "Hal Fox"]
CITIES = ["Paris", "Oslo", "Lima", "Rome", "Kyiv", "Cairo", "Quito", "Bern", "Riga"]
SECRET = "Ava Stone"  # a forget answer's words: must never reach stdout


def qa_rows(people, offset=0, n_perturbed=5, paraphrase=True, extra=True):
    """Rows as TOFU's `*_perturbed.json` hold them (forget/retain: 5 perturbed answers and a paraphrase)."""
    rows = []
    for i, name in enumerate(people):
        city = CITIES[(i + offset) % len(CITIES)]
        row = {"question": f"Where was {name} born?", "answer": f"{name} was born in {city}."}
        if paraphrase:
            row["paraphrased_answer"] = f"The birthplace of {name} is {city}."
        row["perturbed_answer"] = [f"{name} was born in {CITIES[(i + offset + j) % len(CITIES)]}."
                                   for j in range(1, n_perturbed + 1)]
        if extra:
            row["paraphrased_question"] = f"In which city was {name} born?"
        rows.append(row)
    return rows


def tofu_parts():
    return {"forget": qa_rows(NAMES[:3]),
            "retain": qa_rows(NAMES[3:6]),
            "real_authors": qa_rows(NAMES[:3], 4, n_perturbed=3, paraphrase=False, extra=False),
            "world_facts": qa_rows(NAMES[3:6], 6, n_perturbed=3, paraphrase=False, extra=False),
            "holdout": [{"question": r["question"], "answer": r["answer"]} for r in qa_rows(NAMES[6:])]}


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_tofu_folder(folder: Path, parts=None, split="forget10") -> Path:
    parts = parts or tofu_parts()
    names = {"forget": f"{split}_perturbed", "retain": "retain_perturbed", "real_authors": "real_authors_perturbed",
             "world_facts": "world_facts_perturbed", "holdout": f"holdout{split[-2:]}"}
    for part, rows in parts.items():
        write_jsonl(folder / f"{names[part]}.json", rows)
    return folder


def write_muse_folder(folder: Path) -> Path:
    """MUSE's layout after its load_data.py: privleak/{forget,retain,holdout}.json, each a JSON list of strings."""
    texts = {"forget": [f"{n} was born in {c} and wrote novels." for n, c in zip(NAMES[:4], CITIES)],
             "holdout": [f"{n} was born in {c} and painted murals." for n, c in zip(NAMES[4:], CITIES)],
             "retain": ["Some retained news text about the weather."]}
    (folder / "privleak").mkdir(parents=True, exist_ok=True)
    for split, rows in texts.items():
        (folder / "privleak" / f"{split}.json").write_text(json.dumps(rows, indent=4))
    return folder


def all_texts(parts):
    from lightning_unlearn.data.qa import qa_text

    out = []
    for rows in parts.values():
        for r in rows:
            for a in [r["answer"], r.get("paraphrased_answer", ""), *r.get("perturbed_answer", [])]:
                out.append(qa_text(r["question"], a)[0])
    return out


def tiny_tokenizer_and_model(parts=None, seed=0):
    from lightning_unlearn.data.tokenizer import train_bpe_tokenizer
    from lightning_unlearn.models import small_causal_lm

    tok = train_bpe_tokenizer(all_texts(parts or tofu_parts()) * 2, vocab_size=300)
    model = small_causal_lm("gpt2", vocab_size=len(tok), hidden=32, layers=2, heads=2, max_positions=64, seed=seed)
    return tok, model
