"""The embedded synthetic corpus and the locally trained tokenizer."""

import re
import time

import pytest

from lightning_unlearn.data import load_tokenizer, synthetic_corpus, synthetic_dataset, train_bpe_tokenizer


def test_synthetic_corpus_deterministic_and_sized():
    start = time.perf_counter()
    big = synthetic_corpus(1_000_000, seed=0)
    assert time.perf_counter() - start < 5
    assert sum(len(t.encode()) for t in big) >= 1_000_000
    assert synthetic_corpus(50_000, seed=0) == big[:len(synthetic_corpus(50_000, seed=0))]
    assert synthetic_corpus(50_000, seed=1) != synthetic_corpus(50_000, seed=0)
    ds = synthetic_dataset(50_000, seed=2)
    assert set(ds["kind"]) == {"record", "email", "letter"}
    assert len(set(ds["text"])) == len(ds)  # no accidental duplicates
    joined = "\n".join(ds["text"])
    assert re.search(r"[\w.]+@[\w.]+", joined) and re.search(r"Phone: ", joined) and "Dear " in joined
    with pytest.raises(ValueError, match="ask for a positive size"):
        synthetic_corpus(0)


def test_trained_tokenizer_round_trips_and_saves(tmp_path):
    texts = synthetic_corpus(60_000, seed=0)
    tok = train_bpe_tokenizer(texts, vocab_size=512, save_dir=tmp_path / "tok")
    assert len(tok) <= 512 and tok.pad_token == "<|pad|>" and tok.eos_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    samples = texts[:20] + ["Ünïcödé ✓ — emoji 🙂, tabs\tand  double  spaces\n", "  leading space"]
    for text in samples:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert len(tok.encode(texts[0])) < 0.7 * len(texts[0].encode())  # it learned merges
    again = load_tokenizer(tmp_path / "tok")
    assert again.encode(texts[1]) == tok.encode(texts[1]) and again.padding_side == "right"
    with pytest.raises(FileNotFoundError, match="tokenizer path .* does not exist; give a saved tokenizer directory"):
        load_tokenizer(tmp_path / "missing")
