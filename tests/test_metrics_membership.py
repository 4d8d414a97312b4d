"""Membership inference: hand-computed scores, AUROC on known separations, the sign convention, privleak, merging."""

import math
import zlib

import pytest
import torch
from scipy import stats

from lightning_unlearn.metrics import MembershipInference, privleak
from lightning_unlearn.metrics.membership import attack_scores, auroc, zlib_length


def hand_logits():
    """One example, 5 positions, vocab 3; labels score positions 1..3 (the shifted targets of positions 0..2)."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 0, 2, 1, -100]])
    return logits, labels


def test_scores_equal_hand_computed_values():
    logits, labels = hand_logits()
    lsm = torch.log_softmax(logits[0].double(), -1)
    lps = [lsm[0, 0], lsm[1, 2], lsm[2, 1]]  # log p of labels 0, 2, 1 predicted at positions 0, 1, 2
    loss = -sum(lps) / 3
    text = "a secret text"
    s = attack_scores(logits, labels, k=0.4, texts=[text])
    assert s["loss"].item() == pytest.approx(-loss.item(), rel=1e-6)
    assert s["zlib"].item() == pytest.approx(-loss.item() / len(zlib.compress(text.encode())), rel=1e-6)
    assert zlib_length(text) == len(zlib.compress(text.encode("utf-8")))
    # Min-40% of 3 tokens: max(1, int(1.2)) = 1 token, the lowest log-probability
    assert s["min_k"].item() == pytest.approx(min(lps).item(), rel=1e-6)
    assert attack_scores(logits, labels, k=0.7)["min_k"].item() == pytest.approx(
        sorted(x.item() for x in lps)[:2][0] / 2 + sorted(x.item() for x in lps)[1] / 2, rel=1e-6)
    # Min-K%++: (log p - mu) / sigma under each position's distribution
    zs = []
    for pos, lab in ((0, 0), (1, 2), (2, 1)):
        p = lsm[pos].exp()
        mu = (p * lsm[pos]).sum()
        sigma = math.sqrt(max((p * lsm[pos] ** 2).sum() - mu**2, 1e-6))
        zs.append((lsm[pos, lab] - mu) / sigma)
    assert s["min_k_pp"].item() == pytest.approx(min(zs).item(), rel=1e-5)
    assert math.isnan(s["reference"].item())
    ref = attack_scores(logits, labels, reference_logits=torch.zeros_like(logits))
    assert ref["reference"].item() == pytest.approx(math.log(3) - loss.item(), rel=1e-6)


def test_auroc_on_known_separation_and_sign_convention_both_ways():
    g = torch.Generator().manual_seed(0)
    n = 4000
    holdout_loss = torch.randn(n, generator=g, dtype=torch.float64) + 3.0
    forget_loss = torch.randn(n, generator=g, dtype=torch.float64) + 3.0 - 1.0  # members: lower loss
    expected = stats.norm.cdf(1.0 / math.sqrt(2))  # P(X_holdout > X_forget) for unit normals 1 apart
    members = torch.cat([torch.ones(n), torch.zeros(n)]).bool()
    m = MembershipInference()
    m.update_scores({"loss": -forget_loss}, True)
    m.update_scores({"loss": -holdout_loss}, False)
    auc = m.compute()["loss"].item()
    assert auc == pytest.approx(expected, abs=0.02)  # memorised forget set: AUC well above 0.5
    # the other way round: forget data look less familiar than holdout (over-unlearning) -> AUC below 0.5
    flipped = auroc(torch.cat([-holdout_loss, -forget_loss]), members).item()
    assert flipped == pytest.approx(1 - expected, abs=0.02)
    # identical distributions -> 0.5; perfect separation -> 1.0
    same = auroc(torch.cat([-holdout_loss, -holdout_loss]), members).item()
    assert same == pytest.approx(0.5, abs=1e-6)
    assert auroc(torch.tensor([5.0, 6.0, 1.0, 2.0]), torch.tensor([1, 1, 0, 0]).bool()).item() == 1.0


def test_auroc_keeps_order_of_large_scores():
    # raw scores far outside [0, 1] would saturate a sigmoid; ranks keep them apart
    scores = torch.tensor([1000.0, 999.0, 998.0, 997.0])
    assert auroc(scores, torch.tensor([1, 1, 0, 0]).bool()).item() == 1.0


def test_auroc_is_float64_mann_whitney_with_ties_averaged():
    from torchmetrics.classification import BinaryAUROC

    g = torch.Generator().manual_seed(2)
    for n_members, n_others in ((7, 5), (40, 60)):
        scores = torch.randint(0, 6, (n_members + n_others,), generator=g).double() / 3  # many ties
        members = torch.arange(n_members + n_others) < n_members
        pos, neg = scores[members], scores[~members]
        pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
        exact = pairs.sum().item() / (n_members * n_others)  # every pair counted, ties half
        auc = auroc(scores, members)
        assert auc.dtype == torch.float64 and auc.item() == pytest.approx(exact, abs=1e-15)
        assert auc.item() == pytest.approx(BinaryAUROC()(scores.float() / 2, members.long()).item(), abs=1e-6)
    # 5 of 6 pairs right: 5/6 exactly, not float32's 0.8333333730697632
    assert auroc(torch.tensor([0.9, 0.6, 0.4, 0.5, 0.3]), torch.tensor([1, 1, 1, 0, 0]).bool()).item() == 5 / 6
    with pytest.raises(ValueError, match="both member"):
        auroc(torch.tensor([0.1, 0.2]), torch.tensor([True, True]))


def test_privleak_warns_when_the_reference_auc_is_degenerate():
    with pytest.warns(UserWarning, match="reference \\(retain\\) model's AUC is 0: forget and holdout"):
        privleak(0.5, 0.0)


def test_privleak_follows_muse_formula():
    assert privleak(0.5, 0.5) == pytest.approx(0.0)
    assert privleak(0.75, 0.5) == pytest.approx(50.0)
    assert privleak(0.25, 0.5) == pytest.approx(-50.0)


def test_membership_merge_equals_single_update():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 6, 11, generator=g)
    labels = torch.randint(0, 11, (8, 6), generator=g)
    labels[:, 0] = -100
    texts = [f"text number {i}" for i in range(8)]
    ref = torch.randn(8, 6, 11, generator=g)
    member = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0]).bool()
    whole = MembershipInference(k=0.5)
    whole.update(logits, labels, member, texts=texts, reference_logits=ref)
    a, b = MembershipInference(k=0.5), MembershipInference(k=0.5)
    a.update(logits[:3], labels[:3], member[:3], texts=texts[:3], reference_logits=ref[:3])
    b.update(logits[3:], labels[3:], member[3:], texts=texts[3:], reference_logits=ref[3:])
    a.merge_state(b)
    one, two = whole.compute(), a.compute()
    assert set(one) == {"loss", "zlib", "min_k", "min_k_pp", "reference"}
    for key in one:
        torch.testing.assert_close(one[key], two[key])


def test_membership_needs_both_classes():
    m = MembershipInference()
    m.update_scores({"loss": torch.zeros(3)}, True)
    with pytest.raises(ValueError, match="both forget"):
        m.compute()
    with pytest.raises(ValueError, match="fraction"):
        MembershipInference(k=40)
