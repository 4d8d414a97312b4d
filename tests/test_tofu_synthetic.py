"""The TOFU-faithful synthetic benchmark: the generator (determinism, nested disjoint splits, TOFU-format rows whose
perturbed answers share the paraphrase's wording with other values, answer spans) and the smoke-size
`TofuExperiment` (trains, caches, loads without training, batches with labels on the answers only)."""

import pytest
import torch

from lightning_unlearn.data import IGNORE
from lightning_unlearn.data.qa import qa_prompt
from lightning_unlearn.data.tofu_synthetic import (
    AUTHOR_ATTRIBUTES,
    N_PERTURBED,
    REAL_AUTHOR_FACTS,
    SPLITS,
    WORLD_FACTS,
    _fill,
    make_tofu_synthetic,
)
from lightning_unlearn.tofu_experiment import MODELS, TofuConfig, TofuExperiment, answer_scores

SMALL = dict(n_authors=100, facts_per_author=6, ordinary_bytes=5_000, test_bytes=2_000, n_countries=8,
             n_real_authors=8, fact_repeats=2)


@pytest.fixture(scope="module")
def bench():
    return make_tofu_synthetic(0, **SMALL)


def test_generator_deterministic_and_seeded(bench):
    again, other = make_tofu_synthetic(0, **SMALL), make_tofu_synthetic(1, **SMALL)
    for part in ("forget", "retain", "holdout", "real_authors", "world_facts"):
        assert bench.rows(part, "forget10") == again.rows(part, "forget10")
    assert bench.world.pretrain == again.world.pretrain and bench.world.test_text == again.world.test_text
    # the seed changes the authors and the split, not the world (one pretrained base serves every seed)
    assert bench.rows("forget", "forget10") != other.rows("forget", "forget10")
    assert bench.authors.names != other.authors.names
    assert bench.world.pretrain == other.world.pretrain and bench.rows("world_facts") == other.rows("world_facts")
    shown = repr(bench)
    assert "Answer" not in shown and bench.authors.names[0] not in shown  # counts only


def test_splits_nested_disjoint_and_sized(bench):
    a = bench.authors
    forget = {s: set(a.forget_authors(s)) for s in SPLITS}
    assert [len(forget[s]) for s in SPLITS] == [1, 5, 10]
    assert forget["forget01"] < forget["forget05"] < forget["forget10"]
    trained, holdout = set(a.trained), set(a.holdout)
    assert len(trained) == 100 and len(holdout) == len(forget["forget10"]) and not trained & holdout
    for s in SPLITS:
        retain = set(a.retain_authors(s))
        assert not retain & forget[s] and retain | forget[s] == trained
        forget_rows, retain_rows = bench.rows("forget", s), bench.rows("retain", s)
        assert {r["author_id"] for r in forget_rows} == forget[s]
        assert {r["author_id"] for r in retain_rows} == retain
        assert len(forget_rows) == 6 * len(forget[s])
        assert set(a.holdout_authors(s)) <= holdout and len(a.holdout_authors(s)) == len(forget[s])
    assert {r["author_id"] for r in bench.rows("holdout")} == holdout
    assert len(bench.trained_rows()) == 600
    # no fictitious author is a real one; the world rows name no fictitious author
    assert not set(a.names) & set(bench.world.real_author_names)


def test_rows_tofu_format_perturbed_wording_and_spans(bench):
    author_rows = bench.rows("forget", "forget10") + bench.rows("retain", "forget10") + bench.rows("holdout")
    world_rows = bench.rows("real_authors") + bench.rows("world_facts")
    assert len(bench.rows("world_facts")) == 8 * len(WORLD_FACTS)
    assert len(bench.rows("real_authors")) == 8 * len(REAL_AUTHOR_FACTS)
    for row in author_rows + world_rows:
        assert {"question", "answer", "paraphrased_answer", "perturbed_answer"} <= set(row)
        perturbed = row["perturbed_answer"]
        assert len(perturbed) == N_PERTURBED == len(set(perturbed))
        assert row["answer"] not in perturbed and row["paraphrased_answer"] not in perturbed
        assert row["value"] not in row["perturbed_values"] and len(set(row["perturbed_values"])) == N_PERTURBED
        s, e = row["answer_span"]
        assert row["text"][s:e] == row["answer"] and row["text"][:s] == qa_prompt(row["question"])
        value = row["value"].lower()  # a sentence may start with the value, capitalised
        assert value in row["answer"].lower() and value in row["paraphrased_answer"].lower()
    for row in author_rows:
        spec = AUTHOR_ATTRIBUTES[row["attribute"]]
        i, j = row["wording"], row["paraphrase_wording"]
        assert i != j and row["value"] in spec.values and set(row["perturbed_values"]) <= set(spec.values)
        assert row["question"] == _fill(spec.questions[i], row["author"], row["value"])
        assert row["answer"] == _fill(spec.answers[i], row["author"], row["value"])
        assert row["paraphrased_answer"] == _fill(spec.answers[j], row["author"], row["value"])
        assert row["paraphrased_answer"] != row["answer"]
        assert perturbed_wording(spec.answers[j], row)
    # every wording is trained with some facts (so a paraphrase's wording is known, its fact in it is not)
    trained = bench.trained_rows()
    assert {(r["attribute"], r["wording"]) for r in trained} == {
        (a, k) for a, spec in AUTHOR_ATTRIBUTES.items() for k in range(len(spec.answers))}
    for row in world_rows:
        phrasing = (WORLD_FACTS[row["attribute"]][2] if row["attribute"] in WORLD_FACTS
                    else REAL_AUTHOR_FACTS[row["attribute"]][1])[0]
        assert row["paraphrased_answer"] == row["answer"]  # as in TOFU's real_authors / world_facts files
        assert perturbed_wording(phrasing, row, subject=row["subject"])
        # every world fact is stated in the pretraining text in the answer's wording
        assert sum(row["answer"] in doc for doc in bench.world.pretrain) >= 1


def perturbed_wording(template, row, subject=None):
    """The perturbed answers are `template` (the paraphrase's wording) filled with the row's other values."""
    subject = subject or row["author"]
    return row["perturbed_answer"] == [_fill(template, subject, v) for v in row["perturbed_values"]]


# ---------------------------------------------------------------------------------------------------- the models
@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tofu")
    exp = TofuExperiment(TofuConfig.smoke(), out, accelerator="cpu")
    exp.build()
    return exp


def answer_tokens(tok, text, span):
    """The answer's tokens as `Tokenise` labels them: the tokens of the whole text that overlap the span."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    s, e = span
    return [t for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if a < e and s < b]


def test_smoke_experiment_trains_caches_and_loads(experiment, monkeypatch):
    assert all(experiment.is_cached(name) for name in MODELS)
    assert set(experiment.timings) == set(MODELS) and all(t > 0 for t in experiment.timings.values())
    record = experiment.training_record("base")
    assert record["flatness"]["steps"] == experiment.config.flat_steps and record["test_loss_curve"]
    original = experiment.training_record("original")
    retain = experiment.training_record("retain_forget10")
    assert original["epochs"] == retain["epochs"] and original["examples"] > retain["examples"]
    # a second experiment on the same folder loads everything without training
    again = TofuExperiment(TofuConfig.smoke(), experiment.output, accelerator="cpu")
    monkeypatch.setattr(TofuExperiment, "_train", lambda self, name: pytest.fail(f"{name} was retrained"))
    a, b = again.original_model(), again.original_model()
    with torch.no_grad():  # fresh copies: editing one touches neither the other nor the cache
        next(a.parameters()).add_(1.0)
    assert not torch.equal(next(a.parameters()), next(b.parameters()))
    assert torch.equal(next(b.parameters()), next(again.original_model().parameters()))
    again.retain_model("forget01")
    assert again.base_dir == experiment.base_dir  # the base is shared across seeds
    assert TofuExperiment(TofuConfig.smoke(seed=1), experiment.output).base_dir == experiment.base_dir
    with pytest.raises(ValueError):
        again.retain_model("forget99")


def test_smoke_batches_label_only_answers(experiment):
    tok = experiment.tokenizer
    for split in SPLITS:
        rows = experiment.rows("forget", split)
        batches = experiment.forget_batches(split)
        assert sum(int(b["input_ids"].shape[0]) for b in batches) == len(rows)
        flat = [(ids, labels, mask) for b in batches for ids, labels, mask in
                zip(b["input_ids"], b["labels"], b["attention_mask"])]
        for row, (ids, labels, mask) in zip(rows, flat):
            n = int(mask.sum())
            assert tok.decode(ids[:n - 1].tolist()) == row["text"]  # the last token is the appended eos
            assert [int(t) for t in labels[:n] if t != IGNORE] == answer_tokens(tok, row["text"], row["answer_span"])
            assert (labels[n:] == IGNORE).all()
    retain = experiment.retain_batches("forget10", 2)
    assert len(retain) <= 2 and all(set(b) >= {"input_ids", "attention_mask", "labels"} for b in retain)
    held = experiment.held_retain_batch("forget10")
    for b in [*retain, held, *experiment.holdout_batches()]:
        labelled = (b["labels"] != IGNORE).sum(1)
        assert (labelled > 0).all() and (labelled < b["attention_mask"].sum(1)).all()
    test = experiment.test_batches()
    assert all(((b["labels"] != IGNORE) == b["attention_mask"].bool()).all() for b in test)
    nll, exact = answer_scores(experiment.original_model(), experiment.forget_batches("forget10"))
    assert nll.shape == exact.shape == (len(experiment.rows("forget", "forget10")),) and torch.isfinite(nll).all()


def test_smoke_measure_reports_every_model(experiment):
    out = experiment.measure(mc_rows=6)
    assert set(out["models"]) == set(MODELS) and "relative_improvement" in out["flatness"]
    original, gold = out["models"]["original"], out["models"]["retain_forget05"]
    assert {f"forget/{s}" for s in SPLITS} <= set(original) and "retain/forget10" in original
    assert {"forget/forget05", "retain/forget05", "holdout", "real_authors", "world_facts"} <= set(gold)
    for scores in (original["forget/forget10"], gold["world_facts"]):
        assert 0 <= scores["exact"] <= 1 and 0 <= scores["choice"] <= 1 and scores["nll"] > 0
    assert experiment.measure() == out  # cached beside the models
