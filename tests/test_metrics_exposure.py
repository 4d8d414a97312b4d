"""Exposure: exact prefix-tree ranks against brute force, TF-Privacy ties, sampling, skew-normal extrapolation."""

import math
import string

import numpy as np
import pytest
import torch
from scipy import stats
from tokenizers import Tokenizer, models
from torch import nn
from transformers import PreTrainedTokenizerFast

from lightning_unlearn.metrics import CanarySpec, Exposure
from lightning_unlearn.metrics.candidates import RandomnessSpace, enumerate_scores, tokenize_space
from lightning_unlearn.metrics.exposure import exposure_from_rank, rank_with_ties, skewnorm_exposure
from lightning_unlearn.models import small_causal_lm


def char_tokenizer(merges=()) -> PreTrainedTokenizerFast:
    """Character-level BPE; `merges` add multi-character tokens (so some symbols take two tokens, others one)."""
    chars = list(string.ascii_lowercase + string.digits + " .,:!?'-")
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=list(merges))))


class TableLM(nn.Module):
    """A toy LM whose next-token logits are a fixed table indexed by (position, current token): known probabilities."""

    def __init__(self, vocab: int = 64, max_len: int = 64, seed: int = 0, scale: float = 3.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(scale * torch.randn(max_len, vocab, vocab, generator=g), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        return self.table[pos, input_ids]


def brute_force_nll(model, tokenizer, prefix: str, space: RandomnessSpace) -> torch.Tensor:
    """Naive loop: tokenise each full text, run the model on it, sum the candidate tokens' NLL."""
    n_prefix = len(tokenizer.encode(prefix.rstrip(), add_special_tokens=False))
    by_length: dict[int, list[tuple[int, list[int]]]] = {}
    for index in range(space.size):
        symbols = [(index // len(space.alphabet) ** (space.length - 1 - i)) % len(space.alphabet)
                   for i in range(space.length)]
        ids = tokenizer.encode(prefix + space.render(symbols), add_special_tokens=False)
        by_length.setdefault(len(ids), []).append((index, ids))
    out = torch.empty(space.size, dtype=torch.float64)
    for group in by_length.values():  # same-length texts batch without padding: still one full forward each
        ids = torch.tensor([g[1] for g in group])
        raw = model(ids)
        logits = raw if isinstance(raw, torch.Tensor) else raw.logits
        lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        out[torch.tensor([g[0] for g in group])] = -lp[:, n_prefix - 1:].sum(-1)
    return out


def test_rank_ties_like_tf_privacy():
    # candidates tied with the secret are ranked before it
    assert rank_with_ties(np.array([1.0, 2.0, 2.0, 3.0]), 2.0) == 4
    assert rank_with_ties(np.array([3.0, 4.0]), 2.0) == 1
    assert exposure_from_rank(1, 1024) == 10.0
    assert exposure_from_rank(1024, 1024) == 0.0


def test_exposure_equals_brute_force_on_toy_table_model():
    tok = char_tokenizer(merges=[(" ", "1"), (" ", "3"), (" ", "7")])  # symbols of 1 or 2 tokens
    model = TableLM()
    space = RandomnessSpace(tuple("0123456789"), 4, " ")
    prefix = "the code is "
    nll = brute_force_nll(model, tok, prefix, space)
    metric = Exposure(tok)
    for cid, secret in enumerate(["1 2 3 4", "7 7 0 9", "5 3 1 8"]):
        symbols = space.parse(secret)
        at = space.index(symbols)
        expected_rank = 1 + int((torch.cat([nll[:at], nll[at + 1:]]) <= nll[at]).sum())
        result = metric.score(model, CanarySpec(cid, prefix, secret, repetitions=1))
        assert result["rank"] == expected_rank
        assert result["exposure"] == pytest.approx(math.log2(space.size) - math.log2(expected_rank))
        assert result["log_perplexity"] == pytest.approx(float(nll[at]), abs=1e-4)
    tokens = tokenize_space(tok, prefix, space, space.parse("1 2 3 4"))
    torch.testing.assert_close(-enumerate_scores(model, tokens, batch_size=64), nll, atol=1e-4, rtol=0)


def test_ties_rank_secret_last_on_a_uniform_model():
    class Uniform(nn.Module):
        def forward(self, input_ids):
            return torch.zeros(*input_ids.shape, 64)

    result = Exposure(char_tokenizer()).score(Uniform(), CanarySpec(0, "pin ", "1 2 3", repetitions=2))
    assert result["rank"] == 1000 and result["exposure"] == 0.0


def test_exposure_on_random_gpt2_matches_naive_loop_with_and_without_cache():
    tok = char_tokenizer(merges=[(" ", "2"), (" ", "5")])
    model = small_causal_lm("gpt2", vocab_size=64)
    space = RandomnessSpace(tuple("0123456789"), 3, " ")
    prefix = "my pin is "
    nll = brute_force_nll(model, tok, prefix, space)
    tokens = tokenize_space(tok, prefix, space, space.parse("2 0 5"))
    cached = -enumerate_scores(model, tokens, batch_size=128, use_cache=True)
    plain = -enumerate_scores(model, tokens, batch_size=128, use_cache=False)
    torch.testing.assert_close(cached, nll, atol=1e-4, rtol=0)
    torch.testing.assert_close(plain, nll, atol=1e-4, rtol=0)
    result = Exposure(tok).score(model, CanarySpec(5, prefix, "2 0 5", repetitions=4))
    at = space.index(space.parse("2 0 5"))
    assert result["rank"] == 1 + int((torch.cat([nll[:at], nll[at + 1:]]) <= nll[at]).sum())


def test_sampled_exposure_estimates_the_exact_one():
    tok = char_tokenizer()
    model = TableLM(scale=1.0)
    canary = CanarySpec(3, "code ", "4 1 2", repetitions=1)
    exact = Exposure(tok).score(model, canary)
    sampled = Exposure(tok, max_exact=10, num_samples=20_000).score(model, canary)
    assert exact["exact"] == 1.0 and sampled["exact"] == 0.0
    assert sampled["log_perplexity"] == pytest.approx(exact["log_perplexity"], abs=1e-4)
    assert sampled["exposure"] == pytest.approx(exact["exposure"], abs=0.15)


def test_skewnorm_extrapolation_matches_scipy():
    rng = np.random.default_rng(0)
    values = stats.skewnorm.rvs(4.0, loc=20.0, scale=3.0, size=3000, random_state=rng)
    a, loc, scale = stats.skewnorm.fit(values)
    for secret in (14.0, 18.0, 25.0):
        expected = -math.log2(stats.skewnorm.cdf(secret, a, loc, scale))
        assert skewnorm_exposure(values, secret) == pytest.approx(expected, rel=1e-6)


def test_exposure_merge_equals_single_update_and_aggregates():
    tok = char_tokenizer()
    model = TableLM()
    canaries = [CanarySpec(0, "pin ", "1 2 3", repetitions=5), CanarySpec(1, "pin ", "9 9 1", repetitions=5),
                CanarySpec(2, "key ", "0 4 4", repetitions=1), CanarySpec(3, "key ", "3 3 3", repetitions=0)]
    whole = Exposure(tok)
    whole.update(model, canaries)
    a, b = Exposure(tok), Exposure(tok)
    a.update(model, canaries[2:])
    b.update(model, canaries[:2])
    a.merge_state(b)
    one, two = whole.compute(), a.compute()
    for key in ("canary_id", "exposure", "rank", "exposure_extrapolated"):
        torch.testing.assert_close(one[key], two[key])
    assert one["canary_id"].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(one["mean"], one["exposure"][:3].mean())
    torch.testing.assert_close(one["reference_mean"], one["exposure"][3])
    torch.testing.assert_close(one["by_repetitions"][5], one["exposure"][:2].mean())


def test_secret_outside_its_space_is_a_clear_error_without_the_secret():
    with pytest.raises(ValueError, match="not a sequence of 3 symbols") as info:
        Exposure(char_tokenizer()).score(TableLM(), CanarySpec(0, "pin ", "1 2 x", length=3))
    assert "1 2 x" not in str(info.value)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "opt"])
def test_cached_tree_walk_equals_full_recomputation_across_architectures(arch):
    tok = char_tokenizer(merges=[(" ", "2")])
    space = RandomnessSpace(tuple("0123456789"), 2, " ")
    model = small_causal_lm(arch, vocab_size=64)
    tokens = tokenize_space(tok, "my pin is ", space, space.parse("2 0"))
    cached = enumerate_scores(model, tokens, batch_size=32, use_cache=True)
    torch.testing.assert_close(cached, enumerate_scores(model, tokens, use_cache=False), atol=1e-4, rtol=0)


def test_canaries_sharing_a_prefix_share_one_enumeration_with_the_same_result(monkeypatch):
    import lightning_unlearn.metrics.exposure as exposure_module

    tok = char_tokenizer(merges=[(" ", "2"), (" ", "5")])
    model = small_causal_lm("gpt2", vocab_size=64)
    canaries = [CanarySpec(i, "my pin is ", s, repetitions=r)
                for i, (s, r) in enumerate([("2 0 5", 3), ("9 1 4", 1), ("5 5 0", 0)])]
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return enumerate_scores(*args, **kwargs)

    monkeypatch.setattr(exposure_module, "enumerate_scores", counting)
    shared = Exposure(tok)
    shared.update(model, canaries)
    assert len(calls) == 1
    separate = [Exposure(tok).score(model, c) for c in canaries]
    assert len(calls) == 4
    torch.testing.assert_close(shared.compute()["rank"], torch.tensor([s["rank"] for s in separate],
                                                                      dtype=torch.float64))
