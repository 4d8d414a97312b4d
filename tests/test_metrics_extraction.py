"""Extraction strength, exact memorization, forget quality and torchmetrics perplexity on hand-made logits."""

import pytest
import torch
from scipy import stats
from torchmetrics.text import Perplexity

from lightning_unlearn.metrics import ExactMemorization, ExtractionStrength, ForgetQuality
from lightning_unlearn.metrics.extraction import exact_memorization, extraction_strength


def logits_predicting(preds: list[list[int]], vocab: int = 5) -> torch.Tensor:
    """Logits whose argmax at position t is preds[b][t] (position t predicts label t+1)."""
    out = torch.zeros(len(preds), len(preds[0]), vocab)
    for b, row in enumerate(preds):
        for t, p in enumerate(row):
            out[b, t, p] = 5.0
    return out


def test_extraction_strength_and_exact_memorization_by_hand():
    # labels: prompt (ignored) then a 4-token span; predictions at positions 1..4 predict labels 2..5
    labels = torch.tensor([[-100, -100, 1, 2, 3, 4], [-100, -100, 1, 2, 3, 4], [-100, -100, 1, 2, 3, 4]])
    preds = [
        [0, 1, 2, 3, 4, 0],  # everything right: ES 1, EM 1
        [0, 0, 2, 0, 4, 0],  # misses labels 1 and 3: the exact suffix is the last token only: ES 1/4, EM 2/4
        [0, 1, 2, 3, 0, 0],  # misses the last token: k = L, ES 0, EM 3/4
    ]
    logits = logits_predicting(preds)
    assert extraction_strength(logits, labels).tolist() == [1.0, 0.25, 0.0]
    assert exact_memorization(logits, labels).tolist() == [1.0, 0.5, 0.75]


def test_extraction_metrics_merge_equals_single_update():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 7, 4, generator=g)
    labels = torch.randint(0, 4, (10, 7), generator=g)
    labels[:, :2] = -100
    for cls in (ExtractionStrength, ExactMemorization):
        whole, a, b = cls(), cls(), cls()
        whole.update(logits, labels)
        a.update(logits[:4], labels[:4])
        b.update(logits[4:], labels[4:])
        a.merge_state(b)
        torch.testing.assert_close(whole.compute(), a.compute())


def test_extraction_metrics_without_update_are_nan():
    import math
    import warnings

    for cls in (ExtractionStrength, ExactMemorization):  # NaN, as the other metrics, not "No samples to concatenate"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchmetrics: compute before update
            value = cls().compute()
        assert value.dtype == torch.float64 and math.isnan(value.item())
        assert cls().values().numel() == 0


def test_forget_quality_is_ks_pvalue_and_merges():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, generator=g), torch.randn(60, generator=g) + 0.5
    fq = ForgetQuality()
    fq.update(x, y)
    assert fq.compute().item() == pytest.approx(stats.ks_2samp(x.numpy(), y.numpy()).pvalue)
    a, b = ForgetQuality(), ForgetQuality()
    a.update(x[:20], y[:30])
    b.update(values=x[20:])
    b.update(reference_values=y[30:])
    a.merge_state(b)
    assert a.compute().item() == pytest.approx(fq.compute().item())
    only_model = ForgetQuality()
    only_model.update(x)
    with pytest.raises(ValueError, match="reference model"):
        only_model.compute()


def test_torchmetrics_perplexity_with_hf_shift():
    logits, labels = torch.zeros(2, 4, 5), torch.tensor([[-100, 1, 2, -100], [-100, 3, 4, 0]])
    ppl = Perplexity(ignore_index=-100)
    ppl.update(logits[:, :-1], labels[:, 1:])
    assert ppl.compute().item() == pytest.approx(5.0)  # uniform over 5 tokens
