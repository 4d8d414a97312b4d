"""evaluate(): every metric in one call, on plain loaders and on the real ForgetRetainDataModule."""

import math

import pytest
import torch
from text_fixtures import batches, char_tokenizer

from lightning_unlearn.metrics import CanarySpec, evaluate
from lightning_unlearn.metrics.membership import auroc
from lightning_unlearn.models import small_causal_lm

FORGET = [f"patient {n} was seen on day {n % 7}" for n in range(7)]
HOLDOUT = [f"visitor {n} arrived at gate {n % 5}" for n in range(8)]
TEST = ["the weather is mild today", "a short test sentence"]
CANARIES = [CanarySpec(0, "my pin is ", "4 0 9 1", repetitions=4),
            CanarySpec(1, "my pin is ", "7 7 2 5", repetitions=0)]


def test_evaluate_plain_loaders_keys_and_consistency():
    tok = char_tokenizer()
    model = small_causal_lm("gpt2", vocab_size=64).train()
    res = evaluate(model, forget=batches(tok, FORGET), holdout=batches(tok, HOLDOUT), test=batches(tok, TEST),
                   canaries=CANARIES, tokenizer=tok, progress=False)
    assert model.training  # mode restored
    for key in ("forget/perplexity", "holdout/perplexity", "test/perplexity", "forget/loss",
                "forget/extraction_strength", "forget/exact_memorization", "mia/loss/auroc", "mia/zlib/auroc",
                "mia/min_k/auroc", "mia/min_k_pp/auroc", "exposure/mean", "exposure/reference_mean",
                "exposure/reps_4", "exposure/canary/0"):
        assert key in res and math.isfinite(res[key]), key
    assert "forget_quality" not in res and "mia/reference/auroc" not in res
    assert all(isinstance(v, float) for v in res.values())
    forget, holdout = torch.tensor(res.per_example["forget/loss"]), torch.tensor(res.per_example["holdout/loss"])
    members = torch.cat([torch.ones(len(forget)), torch.zeros(len(holdout))]).bool()
    assert res["mia/loss/auroc"] == pytest.approx(auroc(-torch.cat([forget, holdout]), members).item())
    assert res["exposure/reps_4"] == res["exposure/canary/0"] == res["exposure/mean"]
    assert 0.0 <= res["exposure/mean"] <= math.log2(10**4)


def test_evaluate_against_itself_as_reference_is_perfect_forgetting():
    tok = char_tokenizer()
    model = small_causal_lm("gpt2", vocab_size=64)
    res = evaluate(model, forget=batches(tok, FORGET), holdout=batches(tok, HOLDOUT), tokenizer=tok,
                   reference=small_causal_lm("gpt2", vocab_size=64), progress=False)
    assert res["forget_quality"] == pytest.approx(1.0) and res["mia/loss/privleak"] == pytest.approx(0.0, abs=1e-6)
    assert res["mia/reference/auroc"] == pytest.approx(0.5)  # reference == target: every score difference is 0
    other = evaluate(model, forget=batches(tok, FORGET), holdout=batches(tok, HOLDOUT), tokenizer=tok,
                     reference=small_causal_lm("gpt2", vocab_size=64, seed=3), progress=False)
    assert other["forget_quality"] < 1.0
    assert other["mia/loss/privleak"] == pytest.approx(
        (other["mia/loss/auroc"] - other["mia/loss/reference_auroc"]) / other["mia/loss/reference_auroc"] * 100)


def test_evaluate_takes_the_forget_retain_datamodule():
    from lightning_unlearn.data import ForgetRetainDataModule

    tok = char_tokenizer()
    texts = [f"record {i} holds value {i * 7 % 10}" for i in range(30)]
    dm = ForgetRetainDataModule(texts, forget_ids=[0, 1, 2, 3], tokenizer=tok, holdout_fraction=0.25,
                                test_fraction=0.2, batch_size=4)
    res = evaluate(small_causal_lm("gpt2", vocab_size=64), dm, progress=False)
    assert len(res.per_example["forget/loss"]) == 4
    assert {"test/perplexity", "holdout/perplexity", "mia/zlib/auroc"} <= set(res)


def test_exposure_needs_a_tokenizer():
    with pytest.raises(ValueError, match="needs the tokenizer"):
        evaluate(small_causal_lm("gpt2", vocab_size=64), canaries=CANARIES, progress=False)
