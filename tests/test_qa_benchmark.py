"""The TOFU-style QA benchmark: the generator (determinism, disjoint people, unseen paraphrases), answer-only labels,
and a tiny `QAExperiment` trained for a few steps and evaluated. Numbers are only checked to be finite."""

import math

import pytest

from lightning_unlearn.data import IGNORE
from lightning_unlearn.data.qa import ATTRIBUTES, make_qa_corpus
from lightning_unlearn.qa_experiment import QAConfig, QAExperiment

TINY = dict(n_people=24, facts_per_person=3, background_bytes=5_000, test_bytes=2_000, vocab_size=300,
            max_length=96, hidden=32, layers=2, heads=2, batch_size=8, train_steps=4, warmup_steps=2,
            eval_retain_examples=32)


def texts(rows):
    return [r["text"] for r in rows]


def test_generator_deterministic_per_seed_and_differs_across_seeds():
    a, b = make_qa_corpus(40, 4, seed=0, background_bytes=5_000), make_qa_corpus(40, 4, seed=0, background_bytes=5_000)
    c = make_qa_corpus(40, 4, seed=1, background_bytes=5_000)
    assert texts(a.train) == texts(b.train) and texts(a.paraphrase) == texts(b.paraphrase) and a.people == b.people
    assert texts(a.forget) != texts(c.forget) and texts(a.train) != texts(c.train)
    assert "Answer" not in repr(a)  # counts only, never texts


def test_people_split_disjoint_and_paraphrases_unseen():
    corpus = make_qa_corpus(50, 5, forget_fraction=0.1, holdout_fraction=0.2, seed=3, background_bytes=5_000)
    people = {role: set(ids) for role, ids in corpus.people.items()}
    assert len(people["forget"]) == 5 and len(people["holdout"]) == 10 and len(people["retain"]) == 35
    assert not (people["forget"] & people["retain"]) and not (people["forget"] & people["holdout"])
    assert not (people["retain"] & people["holdout"])
    for name in ("forget", "retain", "holdout"):
        assert {r["person_id"] for r in getattr(corpus, name)} == people[name]
    assert {r["person_id"] for r in corpus.paraphrase} == people["retain"]
    train_qa = [r for r in corpus.train if r["role"] != "background"]
    assert {r["person_id"] for r in train_qa} == people["forget"] | people["retain"]
    assert sorted(texts(train_qa)) == sorted(texts(corpus.forget) + texts(corpus.retain))
    assert any(r["role"] == "background" for r in corpus.train) and corpus.test_text
    assert not set(texts(corpus.test_text)) & set(texts(corpus.train))
    train_templates = {r["template"] for r in train_qa}
    assert all("/train" in t for t in train_templates) and all("/para" in r["template"] for r in corpus.paraphrase)
    train_texts = set(texts(corpus.train))
    assert not any(r["text"] in train_texts for r in corpus.paraphrase)
    # paraphrase question wordings never occur in any training text
    for attribute, (_, _, para_templates) in ATTRIBUTES.items():
        for t in para_templates:
            stem = t.split("{n}")[-1]
            assert not any(stem in r["text"] for r in train_qa), attribute
    for r in corpus.forget + corpus.paraphrase + corpus.holdout:
        s, e = r["answer_span"]
        assert 0 < s < e <= len(r["text"]) and r["text"][s - len("Answer: "):s] == "Answer: "


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return QAExperiment(QAConfig(**TINY), output=tmp_path_factory.mktemp("qa"), progress=False)


def answer_tokens(tok, row):
    """The answer's tokens, from tokenising " <answer>" alone (byte-level BPE keeps the leading space with the
    word; a lone space token does not overlap the answer and is dropped)."""
    s, e = row["answer_span"]
    enc = tok(row["text"][s - 1:e], add_special_tokens=False, return_offsets_mapping=True)
    return [t for t, (_, end) in zip(enc["input_ids"], enc["offset_mapping"]) if end > 1]


def test_forget_and_holdout_labels_only_on_answer_tokens(experiment):
    tok = experiment.data.tokenizer
    holdout = experiment.holdout_batches()
    labelled = [int(n) for b in holdout for n in (b["labels"] != IGNORE).sum(1)]
    assert labelled == [len(answer_tokens(tok, r)) for r in experiment.corpus.holdout]
    forget = experiment.forget_batches()
    by_text = {r["text"]: r for r in experiment.corpus.forget}
    assert sum(int(b["input_ids"].shape[0]) for b in forget) == len(by_text)
    for b in forget:
        for ids, labels, mask in zip(b["input_ids"], b["labels"], b["attention_mask"]):
            n = int(mask.sum())
            text = tok.decode(ids[:n].tolist()[:-1])  # drop the appended eos
            kept = [int(t) for t in labels[:n] if t != IGNORE]
            assert kept == answer_tokens(tok, by_text[text])
    held = experiment.held_retain_batch()
    assert 0 < int((held["labels"] != IGNORE).sum()) < int(held["attention_mask"].sum())


def test_train_splits_and_evaluate(experiment):
    data = experiment.data
    forget_n = len(experiment.corpus.forget)
    retain_n = sum(1 for r in experiment.corpus.train if r["role"] != "forget")
    assert len(data.texts["forget"]) == forget_n and len(data.texts["retain"]) == retain_n
    assert len(data.texts["full"]) == len(experiment.corpus.train)
    assert len(experiment.retain_batches(2)) == 2
    original, retrained = experiment.train("full"), experiment.train("retain")
    assert experiment.timings["train_seconds"] > 0 and experiment.timings["retrain_seconds"] > 0
    result = experiment.evaluate(original, reference=retrained)
    for key in ("forget/loss", "holdout/loss", "retain/loss", "paraphrase/loss", "test/perplexity", "mia/auc",
                "forget_quality/ks_p"):
        assert math.isfinite(result[key]), key
    assert 0 <= result["mia/auc"] <= 1 and 0 <= result["forget_quality/ks_p"] <= 1
    assert result["test/perplexity"] > 1
    assert all(isinstance(v, float) for v in result.values())
    assert "forget_quality/ks_p" not in experiment.evaluate(retrained)
