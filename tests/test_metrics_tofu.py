"""TOFU / MUSE metrics against values worked out by hand, and `tofu_evaluation` on a tiny real model."""

import itertools
import math
import warnings

import pytest
import torch
from scipy import stats
from tofu_fixtures import SECRET, tiny_tokenizer_and_model, tofu_parts

from lightning_unlearn.data.qa import qa_text
from lightning_unlearn.metrics import (
    MODEL_UTILITY_KEYS,
    AnswerProbability,
    ForgetQuality,
    ModelUtility,
    NormalisedAnswerProbability,
    PrivLeak,
    RougeLRecall,
    TruthRatio,
    answer_probability,
    forget_quality,
    forget_truth_ratios,
    mia_auc,
    min_k_auc,
    min_k_scores,
    model_utility,
    model_utility_interval,
    muse_privleak,
    normalised_answer_probability,
    rouge_l_recall,
    tofu_evaluation,
    truth_ratio,
    truth_ratios,
)
from lightning_unlearn.metrics.answer_scoring import encode_qa, generate_answers, greedy_generate, score_answers
from lightning_unlearn.metrics.privacy_leak import min_k_scores_from_logits
from lightning_unlearn.metrics.rouge import rouge_l_recall_scores

E = math.e


# ------------------------------------------------------------------------------------------------ truth ratio
def test_truth_ratio_by_hand():
    correct = torch.tensor([1.0, 2.0, 0.5])
    wrong = torch.tensor([[1.5, 2.5], [1.0, 1.0], [0.5, 1.5]])  # means 2.0, 1.0, 1.0
    r = truth_ratios(correct, wrong)
    assert torch.allclose(r, torch.tensor([E ** -1, E ** 1, E ** -0.5], dtype=torch.float64), rtol=1e-8)
    # P(wrong) is the geometric mean of the perturbed answers' probabilities
    geo = torch.exp(-wrong.double()).prod(-1).sqrt()
    assert torch.allclose(r, geo / torch.exp(-correct.double()), rtol=1e-8)
    closer = truth_ratio(correct, wrong, "closer_to_1_better")
    assert closer.item() == pytest.approx((E ** -1 + E ** -1 + E ** -0.5) / 3, rel=1e-8)
    true_better = truth_ratio(correct, wrong, "true_better")
    assert true_better.item() == pytest.approx((1 - E ** -1 + 0 + 1 - E ** -0.5) / 3, rel=1e-8)
    # a row with fewer perturbed answers is NaN-padded; a row without a scored correct answer is left out
    padded = truth_ratios(torch.tensor([0.0, float("nan")]), torch.tensor([[1.0, float("nan")], [1.0, 1.0]]))
    assert padded[0].item() == pytest.approx(E ** -1) and math.isnan(padded[1].item())
    assert truth_ratio(torch.tensor([0.0, float("nan")]), torch.tensor([[1.0, float("nan")], [1.0, 1.0]]),
                       "true_better").item() == pytest.approx(1 - E ** -1)
    with pytest.raises(ValueError, match="unknown truth ratio aggregation"):
        truth_ratio(correct, wrong, "mean")


def test_truth_ratio_metric_merges_updates():
    correct, wrong = torch.tensor([1.0, 2.0, 0.5, 0.1]), torch.tensor([[1.5, 2.5], [1.0, 1.0], [0.5, 1.5], [3, 1]])
    metric = TruthRatio("true_better")
    metric.update(correct[:1], wrong[:1])
    metric.update(correct[1:], wrong[1:])
    assert metric.compute().item() == pytest.approx(truth_ratio(correct, wrong, "true_better").item())
    assert torch.allclose(metric.values(), truth_ratios(correct, wrong))


# --------------------------------------------------------------------------------------------- forget quality
def _exact_ks_pvalue(a, b):
    """P(D >= d_observed) over all equally likely assignments of the pooled values to the two samples."""
    def d(x, y):
        grid = sorted(set(x) | set(y))
        return max(abs(sum(v <= g for v in x) / len(x) - sum(v <= g for v in y) / len(y)) for g in grid)

    pooled, observed = list(a) + list(b), d(a, b)
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), len(a)):
        x = [pooled[i] for i in idx]
        y = [pooled[i] for i in range(len(pooled)) if i not in idx]
        hits += d(x, y) >= observed - 1e-12
        total += 1
    return observed, hits / total


def test_forget_quality_is_ks_pvalue_of_truth_ratios_from_nlls():
    model_tr = [0.1, 0.2, 0.3, 0.4]
    retain_tr = [0.35, 0.5, 0.6, 0.7, 0.8]
    d, p_exact = _exact_ks_pvalue(model_tr, retain_tr)
    assert d == pytest.approx(0.8)  # at 0.4: F_model = 1, F_retain = 1/5
    assert p_exact == pytest.approx(stats.ks_2samp(model_tr, retain_tr).pvalue)
    # ratios from NLLs: correct loss 0, one wrong answer of loss -log r
    from_nlls = truth_ratios(torch.zeros(4), -torch.log(torch.tensor(model_tr, dtype=torch.float64)))
    reference = truth_ratios(torch.zeros(5), -torch.log(torch.tensor(retain_tr, dtype=torch.float64)))
    assert torch.allclose(from_nlls, torch.tensor(model_tr, dtype=torch.float64), rtol=1e-8)
    assert forget_quality(from_nlls, reference).item() == pytest.approx(p_exact)
    metric = ForgetQuality()
    metric.update(from_nlls[:2], reference)
    metric.update(from_nlls[2:])
    assert metric.compute().item() == pytest.approx(p_exact)
    assert forget_quality(torch.tensor([0.5, 0.6, 0.7]), torch.tensor([0.5, 0.6, 0.7])).item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------- answer probability
def test_answer_probability_plain_and_normalised_by_hand():
    losses = torch.tensor([0.0, math.log(2), math.log(4), float("nan")])
    assert answer_probability(losses).item() == pytest.approx((1 + 0.5 + 0.25) / 3)
    correct = torch.tensor([math.log(2), 0.0])
    wrong = torch.tensor([[math.log(4), math.log(4)], [math.log(2), float("nan")]])
    # 0.5 / (0.5 + 0.25 + 0.25) and 1 / (1 + 0.5)
    assert normalised_answer_probability(correct, wrong).item() == pytest.approx((0.5 + 2 / 3) / 2)
    plain, norm = AnswerProbability(), NormalisedAnswerProbability()
    plain.update(losses[:2])
    plain.update(losses[2:])
    norm.update(correct[:1], wrong[:1])
    norm.update(correct[1:], wrong[1:])
    assert plain.compute().item() == pytest.approx(answer_probability(losses).item())
    assert norm.compute().item() == pytest.approx((0.5 + 2 / 3) / 2)


# ----------------------------------------------------------------------------------------------------- ROUGE
def test_rouge_l_recall_by_hand():
    # LCS of [the cat sat on the mat] and [the cat is on a mat] is "the cat on mat": 4 of the reference's 6 tokens
    assert rouge_l_recall("the cat is on a mat", "the cat sat on the mat").item() == pytest.approx(4 / 6)
    # Porter stems of words longer than 3 characters: running/runs -> run, quickly -> quickli (quick stays): 1 / 4
    assert rouge_l_recall("he runs quick", "She was running quickly").item() == pytest.approx(1 / 4)
    # case and punctuation do not count; recall ignores extra generated words; an empty generation scores 0
    scores = rouge_l_recall_scores(["paris, FRANCE! and more words", ""], ["Paris France.", "Paris"])
    assert scores.tolist() == pytest.approx([1.0, 0.0])
    metric = RougeLRecall()
    metric.update(["the cat is on a mat"], ["the cat sat on the mat"])
    metric.update("he runs quick", "She was running quickly")
    assert metric.compute().item() == pytest.approx((4 / 6 + 1 / 4) / 2)


def test_rouge_matches_google_rouge_score_as_tofu_calls_it():
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_score.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [("The author's father was a chef; mother: a nurse.", "His father was a well-known chef."),
             ("Generalizations connected organizational running", "generalization connection organize runs"),
             ("Born in 1975 in Taipei, Taiwan.", "The author was born in Taipei in 1975."), ("", "abc")]
    ours = rouge_l_recall_scores([g for g, _ in pairs], [r for _, r in pairs])
    theirs = [scorer.score(r, g)["rougeL"].recall for g, r in pairs]
    assert ours.tolist() == pytest.approx(theirs, abs=1e-6)


# ---------------------------------------------------------------------------------------------- model utility
def test_model_utility_harmonic_mean_of_nine():
    values = dict(zip(MODEL_UTILITY_KEYS, [0.5, 0.25, 1.0] * 3))
    assert model_utility(values).item() == pytest.approx(9 / (3 * (2 + 4 + 1)))  # = 3/7
    assert model_utility(values).item() == pytest.approx(stats.hmean(list(values.values())))
    with pytest.raises(ValueError, match="missing: world_facts_rouge"):
        model_utility({k: v for k, v in values.items() if k != "world_facts_rouge"})
    with pytest.warns(UserWarning, match="components are 0: real_authors_truth_ratio"):
        assert model_utility({**values, "real_authors_truth_ratio": 0.0}).item() == 0.0
    for bad in (float("nan"), float("inf"), -0.1, 1.5):
        with pytest.raises(ValueError, match="NaN, infinite, negative or above 1: retain_rouge="):
            model_utility({**values, "retain_rouge": bad})
    metric = ModelUtility()
    metric.update({**values, "retain_probability": 0.4})
    metric.update({"retain_probability": 0.6})  # one item each: averaged to 0.5
    assert metric.compute().item() == pytest.approx(3 / 7)


def test_model_utility_metric_weights_updates_by_their_items():
    values = dict(zip(MODEL_UTILITY_KEYS, [0.5, 0.25, 1.0] * 3))
    one_go = ModelUtility()
    one_go.update({**values, "retain_probability": torch.tensor([0.9] * 10 + [0.1])})
    in_parts = ModelUtility()  # 10 items at 0.9, then 1 item at 0.1: the mean of the 11 items, not of the 2 means
    in_parts.update({**values, "retain_probability": 0.9}, counts={"retain_probability": 10})
    in_parts.update({"retain_probability": torch.tensor([0.1])})
    per_item = ModelUtility()  # per-item values; NaN items (rows without scored tokens) are skipped
    per_item.update({**values, "retain_probability": torch.tensor([0.9] * 4 + [float("nan")])})
    per_item.update({"retain_probability": [0.9] * 6 + [0.1]})
    for metric in (one_go, in_parts, per_item):
        assert metric.components()["retain_probability"] == pytest.approx((9.0 + 0.1) / 11)
        assert metric.compute().item() == pytest.approx(one_go.compute().item())
    with pytest.raises(ValueError, match="item count of retain_probability must be a positive int"):
        ModelUtility().update(values, counts=0)


# ------------------------------------------------------------------------------------------ Min-K%, AUC, privleak
def test_min_k_auc_and_privleak_by_hand():
    lp = torch.tensor([[-0.1, -2.0, -0.5, -3.0, -1.0]])
    assert min_k_scores(lp, k=0.4).item() == pytest.approx(-2.5)  # int(5 * 0.4) = 2 lowest: -3, -2
    assert min_k_scores(lp, k=0.1).item() == pytest.approx(-3.0)  # at least one token
    mask = torch.tensor([[True, True, True, False, True]])
    assert min_k_scores(lp, mask, k=0.4).item() == pytest.approx(-2.0)  # int(4 * 0.4) = 1
    # from logits: log-softmax of uniform logits over 4 classes is log(1/4) everywhere
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[-100, 1, 2]])
    assert min_k_scores_from_logits(logits, labels).item() == pytest.approx(math.log(0.25))
    # AUC: members [0.9, 0.6, 0.4] vs non-members [0.5, 0.3]: 5 of 6 pairs ranked right; a tie counts half
    auc = mia_auc(torch.tensor([0.9, 0.6, 0.4]), torch.tensor([0.5, 0.3]))
    assert auc.dtype == torch.float64 and auc.item() == 5 / 6  # exact in float64, not 0.8333333730697632
    assert muse_privleak(0.75, 0.5).item() == pytest.approx(-50.0, abs=1e-7)
    assert mia_auc(torch.tensor([1.0, 0.0]), torch.tensor([1.0])).item() == pytest.approx(0.25)
    # privleak = ((1 - AUC) - (1 - AUC_ref)) / (1 - AUC_ref) * 100
    assert muse_privleak(0.9, 0.5).item() == pytest.approx(-80.0)  # under-unlearning is negative (MUSE)
    assert muse_privleak(0.5, 0.5).item() == pytest.approx(0.0, abs=1e-6)
    assert muse_privleak(0.3, 0.6).item() == pytest.approx(75.0)
    metric = PrivLeak(reference_auc=0.5)
    metric.update_scores(torch.tensor([0.9, 0.6]), member=True)
    metric.update_scores(torch.tensor([0.4]), member=True)
    metric.update_scores(torch.tensor([0.5, 0.3]), member=False)
    out = metric.compute()
    assert out["auc"].item() == pytest.approx(5 / 6) and out["privleak"].item() == pytest.approx(
        ((1 / 6) - 0.5) / 0.5 * 100)
    mixed = PrivLeak(reference_auc=0.5)  # one batch of forget and holdout examples, flagged per example
    mixed.update_scores(torch.tensor([0.9, 0.5, 0.6, 0.3, 0.4]), member=torch.tensor([1, 0, 1, 0, 1]).bool())
    assert mixed.compute()["auc"].item() == out["auc"].item()
    with pytest.raises(ValueError, match="member has 2 flags for a batch of 3 examples"):
        mixed.update_scores(torch.tensor([0.1, 0.2, 0.3]), member=torch.tensor([True, False]))
    for degenerate in (0.0, 1.0):  # a retain model that separates forget from holdout perfectly: privleak blows up
        with pytest.warns(UserWarning, match=f"retain\\) model's AUC is {degenerate:g}: forget and holdout"):
            muse_privleak(0.9, degenerate)


# ---------------------------------------------------------------------------------------- scoring a real model
@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    parts = tofu_parts()
    tok, model = tiny_tokenizer_and_model(parts)
    return parts, tok, model


def test_answer_loss_matches_hf_loss_and_batching(tiny):
    parts, tok, model = tiny
    rows = parts["forget"] + parts["retain"]
    questions, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
    batched = score_answers(model, tok, questions, answers, batch_size=4)
    single = score_answers(model, tok, questions, answers, batch_size=1)
    assert torch.allclose(batched.loss, single.loss, atol=1e-5)
    with_eos = score_answers(model, tok, questions, answers, batch_size=4, score_eos=True)
    for i, (q, a) in enumerate(zip(questions, answers)):
        item = encode_qa(tok, [q], [a], score_eos=True)[0]
        ids = torch.tensor([item["input_ids"]])
        for labels, expected in ((item["labels"], batched.loss[i]), (item["labels_eos"], with_eos.loss[i])):
            hf = model(ids, labels=torch.tensor([labels])).loss  # HF's own shifted mean CE over labels != -100
            assert expected.item() == pytest.approx(hf.item(), abs=1e-5)
        answer_tokens = tok.decode([t for t, lab in zip(item["input_ids"], item["labels"]) if lab != -100])
        assert answer_tokens.strip() == a and item["labels_eos"][-1] == tok.eos_token_id
    assert (with_eos.n_tokens == batched.n_tokens).all() and not torch.allclose(with_eos.loss, batched.loss)


class _TensorOnly(torch.nn.Module):
    """A plain module mapping ids to logits (no cache, no mask): generation must recompute every step."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return self.inner(input_ids).logits


def test_greedy_generation_matches_hf_generate(tiny):
    parts, tok, model = tiny
    prompts = [tok(qa_text(r["question"], "")[0].rstrip(), add_special_tokens=False)["input_ids"]
               for r in parts["forget"] + parts["holdout"]]
    ours = greedy_generate(model, prompts, 6, eos_token_id=None, batch_size=2)
    plain = greedy_generate(_TensorOnly(model), prompts, 6, eos_token_id=None, batch_size=3)
    assert ours == plain and all(len(o) == 6 for o in ours)
    for prompt, new in zip(prompts, ours):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=None)
        assert ref[0, len(prompt):].tolist() == new
    # per-row budgets, the model's positions, stop at eos (exclusive)
    total = max(len(p) for p in prompts[:2]) + 3
    capped = greedy_generate(model, prompts[:2], [2, 6], max_total_length=total)
    assert [len(c) for c in capped] == [min(2, total - len(prompts[0])), total - len(prompts[1])]
    assert capped[0] == ours[0][:len(capped[0])] and capped[1] == ours[1][:len(capped[1])]
    i, j = next(((i, j) for i, o in enumerate(ours) for j in range(1, len(o)) if o[j] not in o[:j]), (0, 0))
    assert greedy_generate(model, prompts[i:i + 1], 6, eos_token_id=ours[i][j])[0] == ours[i][:j]


def _train_on(model, tok, rows, steps=60):
    from lightning_unlearn.data.tokenize import Collate

    items = [{**i, "example_id": n} for n, i in enumerate(
        encode_qa(tok, [r["question"] for r in rows for _ in range(2)],
                  [a for r in rows for a in (r["answer"], r["paraphrased_answer"])]))]
    batch = Collate(tok.pad_token_id)(items)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        opt.step()
    return model.eval()


def test_tofu_evaluation_on_tiny_model(tiny, capsys):
    parts, tok, model = tiny
    import copy

    untrained = copy.deepcopy(model)
    before = forget_truth_ratios(untrained, tok, parts["forget"])
    trained = _train_on(copy.deepcopy(model), tok, parts["forget"])
    trained.train()  # evaluation puts it in eval mode and restores the mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a component of 0 is legal for an untrained model
        result = tofu_evaluation(trained, tok, parts, retain_model_truth_ratios=before, retain_model_privleak_auc=0.6)
    assert trained.training
    after = torch.tensor(result.per_item["forget_truth_ratio"], dtype=torch.float64)
    assert (after < before).all()  # the paraphrase now beats the perturbed answers on every forget question
    expected_keys = {"forget_quality", "forget_truth_ratio", "forget_probability", "forget_rouge",
                     "extraction_strength", "model_utility", "mia_auc_min_k", "privleak", "privleak_reference_auc",
                     *MODEL_UTILITY_KEYS}
    assert set(result) == expected_keys
    assert all(math.isfinite(v) for v in result.values())
    for key in expected_keys - {"privleak"}:
        assert 0.0 <= result[key] <= 1.0, key
    # the forget set was trained on, the holdout was not: Min-K% recognises it, and the model answers it
    assert result["mia_auc_min_k"] == pytest.approx(1.0)
    assert result["privleak"] == pytest.approx(((1 - 1.0) - 0.4) / 0.4 * 100)
    assert result["forget_rouge"] > 0.5 and result["extraction_strength"] > 0.5
    assert result["forget_probability"] > answer_probability(score_answers(
        untrained, tok, [r["question"] for r in parts["forget"]], [r["answer"] for r in parts["forget"]]).loss)
    assert result["forget_quality"] == pytest.approx(stats.ks_2samp(after.numpy(), before.numpy()).pvalue)
    # the per-row values of the nine utility components, whose means are the components (what the bootstrap draws)
    for key in MODEL_UTILITY_KEYS:
        rows = torch.tensor(result.per_item[key], dtype=torch.float64)
        part = key.rsplit("_", 2)[0] if key.endswith("truth_ratio") else key.rsplit("_", 1)[0]
        assert rows.numel() == len(parts[part]), key
        assert float(rows[~torch.isnan(rows)].mean()) == pytest.approx(result[key], abs=1e-12), key
    interval = model_utility_interval(result.per_item, resamples=200)
    assert interval["value"] == pytest.approx(result["model_utility"], abs=1e-12)
    assert SECRET not in capsys.readouterr().out
    with pytest.raises(ValueError, match="forget row 1 has no 'paraphrased_answer' field"):
        broken = [dict(r) for r in parts["forget"]]
        del broken[1]["paraphrased_answer"]
        tofu_evaluation(untrained, tok, {"forget": broken})


LONG_QUESTION = "Where was " + "the very long-named person " * 30 + "born?"  # past the tiny model's 64 positions


def test_rows_without_a_scored_answer_are_dropped_from_every_number(tiny):
    parts, tok, model = tiny
    parts = {k: [dict(r) for r in v] for k, v in parts.items()}
    shortened = {k: [dict(r) for r in v] for k, v in parts.items()}
    for part in ("retain", "real_authors", "world_facts"):
        parts[part][0]["question"] = LONG_QUESTION  # its answer is truncated away
        del shortened[part][0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tofu_evaluation(model, tok, parts, max_new_tokens=4)
    messages = [str(w.message) for w in caught]
    assert "1 of 3 retain rows were dropped from every retain number" in " ".join(messages)
    assert any(m.startswith("1 of 3 texts are longer than 64 tokens") for m in messages)  # counted, not "some"
    assert result.rows_dropped == {"forget": 0, "retain": 1, "real_authors": 1, "world_facts": 1, "holdout": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = tofu_evaluation(model, tok, shortened, max_new_tokens=4)
    for key in MODEL_UTILITY_KEYS:  # ROUGE too: the row is not scored 0, it is left out like everywhere else
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key
    # a part that loses every row is an error naming max_length, not a NaN component later
    every_row = {**parts, "real_authors": [{**r, "question": LONG_QUESTION} for r in parts["real_authors"]]}
    with pytest.raises(ValueError, match="every one of the 3 real_authors rows was dropped: .*capped at the model's 64 "
                                         "positions"):
        tofu_evaluation(model, tok, every_row, max_new_tokens=4)
    with pytest.raises(ValueError, match="every one of the 3 real_authors rows was dropped: .*raise max_length"):
        tofu_evaluation(model, tok, every_row, max_new_tokens=4, max_length=64)


def test_holdout_rows_must_be_of_the_forget_rows_kind(tiny):
    parts, tok, model = tiny
    texts = [qa_text(r["question"], r["answer"])[0] for r in parts["holdout"]]
    with pytest.raises(ValueError, match="the holdout rows are texts \\(MUSE\\) but the forget rows are TOFU QA rows"):
        tofu_evaluation(model, tok, {"forget": parts["forget"]}, holdout_rows=texts)
    with pytest.raises(ValueError, match="the forget rows are QA rows but the holdout rows are texts"):
        min_k_auc(model, tok, parts["forget"], texts)


def test_plain_module_past_its_positions_names_max_length(tiny):
    parts, tok, model = tiny
    plain = _TensorOnly(model)  # no config: its 64 positions are unknown to the scorer
    longer = "Where was " + "the very long-named person " * 5 + "born?"  # about 120 tokens, within max_length=512
    questions, answers = [longer, parts["forget"][0]["question"]], ["Paris.", parts["forget"][0]["answer"]]
    with pytest.raises(ValueError, match="IndexError on sequences of .* tokens.*pass max_length .* at most its "
                                         "positions"):
        score_answers(plain, tok, questions, answers)
    with pytest.raises(ValueError, match="pass max_length"):
        generate_answers(plain, tok, questions, answers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        capped = score_answers(plain, tok, questions, answers, max_length=64)  # within its positions: it works
        generated = generate_answers(plain, tok, questions, answers, max_length=64)
    assert math.isnan(capped.loss[0].item()) and math.isfinite(capped.loss[1].item())
    assert generated[0] == ""  # no room for an answer within max_length
