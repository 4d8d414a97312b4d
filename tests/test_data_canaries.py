"""Secret-Sharer canaries: reproducible insertion, exact repetitions, the registry, references never trained on."""

import json
from collections import Counter

import pytest

from lightning_unlearn.data import (
    CanaryRegistry,
    CanarySpace,
    ForgetRetainDataModule,
    insert_canaries,
    make_canaries,
    synthetic_corpus,
    train_bpe_tokenizer,
)

TEXTS = synthetic_corpus(20_000, seed=5)


def test_canaries_inserted_with_exact_repetitions_and_recorded(tmp_path):
    reg = make_canaries(3, (1, 2, 8), n_references=20, seed=4)
    data = insert_canaries(TEXTS, reg, seed=9)
    counts = Counter(data["text"])
    assert len(reg.inserted) == 9 and {c.repetitions for c in reg.inserted} == {1, 2, 8}
    for c in reg.inserted:
        assert counts[c.text] == c.repetitions
        assert Counter(data["canary_id"])[c.id] == c.repetitions
    assert len(data) == len(TEXTS) + 3 * (1 + 2 + 8)
    assert [t for t, cid in zip(data["text"], data["canary_id"]) if not cid] == TEXTS  # order of the corpus kept
    assert insert_canaries(TEXTS, reg, seed=9)["text"] == data["text"]  # reproducible
    assert insert_canaries(TEXTS, reg, seed=10)["text"] != data["text"]
    assert make_canaries(3, (1, 2, 8), n_references=20, seed=4).to_dict() == reg.to_dict()

    loaded = CanaryRegistry.load(reg.save(tmp_path / "canaries.json"))
    assert loaded.to_dict() == reg.to_dict()
    raw = json.loads((tmp_path / "canaries.json").read_text())
    assert raw["space"] == {"alphabet": "0123456789", "length": 6, "separator": " ", "size": 10**6}
    c = loaded.inserted[0]
    assert c.text == c.prefix + c.secret + c.suffix and c.prefix == "my PIN is " and c.template.startswith("my PIN")
    assert len(c.secret.split(" ")) == loaded.length == 6 and loaded.size == 10**6 and loaded.alphabet == "0123456789"
    assert loaded[c.id] == c


def test_reference_canaries_never_in_training_text():
    reg = make_canaries(5, (1, 4), n_references=50, seed=1)
    data = insert_canaries(TEXTS, reg, seed=2)
    secrets = {c.secret for c in reg.inserted}
    assert all(r.secret not in secrets for r in reg.references) and len({r.secret for r in reg.references}) == 50
    assert all(r.repetitions == 0 for r in reg.references)
    joined = "\n".join(data["text"])
    assert not any(r.text in joined or r.secret in joined for r in reg.references)


def test_secrets_are_not_shown_by_repr():
    reg = make_canaries(2, (3,), n_references=2)
    shown = repr(reg) + repr(reg.inserted) + repr(reg.references) + str(reg.inserted[0])
    assert not any(c.secret in shown for c in reg.inserted + reg.references)
    assert "repetitions=3" in repr(reg.inserted[0])


def test_space_enumeration_and_templates():
    space = CanarySpace("ab", 3, "-")
    assert space.size == 8 and list(space.candidates())[:3] == ["a-a-a", "a-a-b", "a-b-a"]
    assert all(space.index(space.secret(i)) == i for i in range(8))
    reg = make_canaries(2, (1,), template="the code is {secret}.", alphabet="XYZ", length=4, separator="",
                        n_references=3)
    c = reg.inserted[0]
    assert c.suffix == "." and len(c.secret) == 4 and set(c.secret) <= set("XYZ") and reg.size == 81
    reg = make_canaries(1, (1,), template="card {d}{d}{d}{d} expires", length=4, separator="", n_references=1)
    assert reg.length == 4 and reg.separator == "" and reg.inserted[0].suffix == " expires"
    with pytest.raises(ValueError, match="do not fit a space of 8"):
        make_canaries(5, (1, 2), template="{secret}", alphabet="ab", length=3, n_references=0)
    with pytest.raises(ValueError, match="has 6 \\{d\\} slots joined by ' ' but length=4"):
        make_canaries(1, (1,), length=4)
    with pytest.raises(ValueError, match="has no slot"):
        make_canaries(1, (1,), template="no slot here")


def test_canaries_as_span_level_forget_set():
    reg = make_canaries(2, (2,), n_references=4, seed=3)
    data = insert_canaries(TEXTS[:40], reg, seed=3)
    tok = train_bpe_tokenizer(data["text"], vocab_size=300)
    dm = ForgetRetainDataModule(data, forget_column="canary_id", span="offsets", tokenizer=tok, max_length=512,
                                test_fraction=0, holdout_fraction=0)
    batch = next(iter(dm.curvature_dataloader("forget")))
    assert batch["input_ids"].shape[0] == 4
    secrets = {c.secret for c in reg.inserted}
    for labels in batch["labels"]:
        assert tok.decode(labels[labels != -100]).strip() in secrets
    retain_text = [tok.decode(b) for batch in dm.curvature_dataloader("retain") for b in batch["input_ids"]]
    assert not any(s in t for s in secrets for t in retain_text)
