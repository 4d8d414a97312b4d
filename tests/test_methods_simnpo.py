"""SimNPO (Fan et al., 2024): the loss against the formula by hand, its gradient, the method on a tiny GPT-2."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_unlearn.methods import METHODS, build_unlearner, is_second_order
from lightning_unlearn.methods.first_order import SimNPO
from lightning_unlearn.methods.losses import forget_objective, simnpo_objective
from lightning_unlearn.models import small_causal_lm
from lightning_unlearn.settings import UnlearnSettings

torch.set_num_threads(1)


class Fixed(torch.nn.Module):
    """A 'model' whose logits are given: the loss is then a function of numbers written in the test."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None):
        return self.logits


def _batch(x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone() if labels is None else labels}


def _log_softmax(row: list[float]) -> list[float]:
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


def test_simnpo_loss_equals_the_formula_by_hand():
    # 3 examples, 4 positions, 3 classes; logits at t predict labels[t + 1]
    logits = [
        [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]],
        [[0.0, 1.0, 0.0], [-1.0, 2.0, 0.5], [0.3, 0.2, 0.1], [1.0, 0.0, 0.0]],
        [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]],
    ]
    labels = [
        [-100, 0, 1, 2],        # 3 labelled targets: predicted at t = 0, 1, 2
        [-100, -100, 1, -100],  # 1 labelled target, predicted at t = 1
        [-100, -100, -100, -100],  # nothing to forget: not counted
    ]
    beta, gamma = 2.5, 0.3
    terms = []
    for ex_logits, ex_labels in zip(logits, labels):
        log_pi, length = 0.0, 0
        for t in range(3):
            if ex_labels[t + 1] != -100:
                log_pi += _log_softmax(ex_logits[t])[ex_labels[t + 1]]
                length += 1
        if length:
            z = -(beta / length) * log_pi - gamma
            terms.append(-(2.0 / beta) * math.log(1.0 / (1.0 + math.exp(-z))))  # -(2/β) log σ(z)
    expected = sum(terms) / len(terms)

    batch = {"input_ids": torch.zeros(3, 4, dtype=torch.long), "labels": torch.tensor(labels)}
    loss, weight = simnpo_objective(Fixed(torch.tensor(logits)), batch, beta, gamma)
    assert weight == 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # the method's forget term is this objective
    u = build_unlearner("simnpo", small_causal_lm("gpt2", vocab_size=32, hidden=16), beta=beta, gamma=gamma)
    u.model = Fixed(torch.tensor(logits))
    assert float(u.forget_term(batch, [])[0]) == pytest.approx(expected, rel=1e-6)
    # no labelled position: weight 0, like the other objectives
    empty = {"input_ids": batch["input_ids"], "labels": torch.full((3, 4), -100)}
    assert simnpo_objective(Fixed(torch.tensor(logits)), empty, beta)[1] == 0


def test_simnpo_gradient_is_a_fading_multiple_of_the_nll_ascent_gradient():
    # ∇ simnpo = 2σ(γ - β·mean NLL) × ∇ (NLL ascent), per example: no larger than NLL ascent's when
    # γ = 0, and it does NOT escape NLL ascent's vanishing on saturated tokens (unlike unlikelihood)
    for first_logit, gamma in ((12.0, 0.0), (1.0, 0.0), (1.0, 1.0)):
        logits = torch.tensor([[[first_logit, 0.0, 0.0], [0.0, 0.0, 0.0], [0.5, -0.5, 0.0]]], requires_grad=True)
        b = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.tensor([[-100, 0, 1]])}
        beta = 2.5
        g_sim = torch.autograd.grad(simnpo_objective(Fixed(logits), b, beta, gamma)[0], logits)[0]
        g_nll = torch.autograd.grad(forget_objective(Fixed(logits), b, "nll")[0], logits)[0]
        with torch.no_grad():
            mean_nll = -forget_objective(Fixed(logits), b, "nll")[0]
        weight = 2 * torch.sigmoid(gamma - beta * mean_nll)
        torch.testing.assert_close(g_sim, weight * g_nll)
        if gamma == 0.0:
            assert float(weight) < 1.0 and float(g_sim.abs().max()) <= float(g_nll.abs().max())
    # saturated first token (p ~ 1): its logit's gradient vanishes as NLL ascent's does
    logits = torch.tensor([[[12.0, 0.0, 0.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    b = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.tensor([[-100, 0]])}
    g = torch.autograd.grad(simnpo_objective(Fixed(logits), b, 2.5)[0], logits)[0][0, 0, 0]
    assert abs(float(g)) < 1e-4


@pytest.mark.parametrize("retain_weight", [None, 1.0])
def test_simnpo_fit_on_tiny_gpt2_raises_the_forget_loss(retain_weight):
    x = torch.randint(0, 31, (6, 10), generator=torch.Generator().manual_seed(0))
    forget, retain, held = _batch(x[:2]), _batch(x[2:4]), _batch(x[4:])
    torch.manual_seed(0)
    model = small_causal_lm("gpt2", vocab_size=32, hidden=16)
    u = build_unlearner("simnpo", model, lr=1e-2, steps=3, max_retain_increase=None, retain_weight=retain_weight)
    assert isinstance(u, SimNPO) and u.beta == 2.5 and u.gamma == 0.0
    assert u.retain_weight == (0.0 if retain_weight is None else 1.0)  # like npo: no retain term by default
    before = u.measure(forget)
    records = u.fit([forget], [retain], held_retain_batch=held)
    assert len(records) == 3 and all(r.accepted for r in records)
    assert u.measure(forget) > before
    assert records[0].scale == pytest.approx(1e-2) and records[0].damping == 1.0


def test_simnpo_refuses_bad_hyper_parameters_naming_the_knob():
    model = small_causal_lm("gpt2", vocab_size=32, hidden=16)
    for beta in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="simnpo: beta .*must be a finite number > 0"):
            build_unlearner("simnpo", model, beta=beta)
    with pytest.raises(ValueError, match="simnpo: gamma .*finite"):
        build_unlearner("simnpo", model, gamma=float("nan"))
    with pytest.raises(ValueError, match="unknown setting 'reference'"):  # reference-free
        build_unlearner("simnpo", model, reference=model)


def test_simnpo_is_a_registered_first_order_method():
    assert METHODS["simnpo"] is SimNPO and not is_second_order("simnpo")
    settings = UnlearnSettings(method="simnpo", method_kwargs={"beta": 4.5, "gamma": 0.0, "retain_weight": 8.0})
    assert not settings.second_order
