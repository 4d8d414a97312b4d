"""What the step search costs: the budget measured on demand (`lazy_budget`) and the guided bisection
(`guided_search`) take the step lengths of the plain search for fewer forward passes.

Unit tests on `StepSearch` with synthetic measurements, then the default request's recipe on the tiny memorised GPT-2
of `canary_corpus.memorise`, its forward passes counted with a hook on the input embedding.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from canary_corpus import memorise

from lightning_unlearn.methods import build_unlearner
from lightning_unlearn.methods.step_search import Point, StepSearch

AIM = 0.5


def _synthetic(crossing: float, budget_edge: float, calls: dict[str, int]):
    """(evaluate, budget) of a line search whose score rises with η (the aim at `crossing`) and whose held retain
    loss leaves the budget at `budget_edge`; `calls` counts the score and budget measurements."""

    def score(eta: float) -> float:
        return min(1.0, AIM * eta / crossing)

    def budget(eta: float) -> tuple[float, bool]:
        calls["budget"] += 1
        return eta, eta <= budget_edge

    def evaluate_lazy(eta: float) -> Point:
        calls["score"] += 1
        s = score(eta)
        return Point((s, s), None, True, s >= AIM)

    def evaluate_eager(eta: float) -> Point:
        calls["score"] += 1
        s = score(eta)
        retain, ok = budget(eta)
        return Point((s, s), retain, ok, ok and s >= AIM)

    return evaluate_lazy, evaluate_eager, budget


@pytest.mark.parametrize("budget_edge", [10.0, 0.2])
def test_lazy_budget_takes_the_plain_search_step(budget_edge):
    """Within the budget, the budget is measured once and the same η is taken; where the budget binds before the
    aim, the search looks below the aim on the budget alone and takes the plain search's η (to its tolerance) and
    reason for fewer forget scores."""
    plain_calls, lazy_calls = {"score": 0, "budget": 0}, {"score": 0, "budget": 0}
    _, eager, _ = _synthetic(0.3, budget_edge, plain_calls)
    plain = StepSearch(eager, (0.0, 0.0)).run(1.0, 6)
    lazy, _, budget = _synthetic(0.3, budget_edge, lazy_calls)
    taken = StepSearch(lazy, (0.0, 0.0), budget).run(1.0, 6)
    if budget_edge > 1:
        assert taken == plain
        assert taken[2] == "target_reached" and lazy_calls["budget"] == 1 < plain_calls["budget"]
    else:
        tolerance = StepSearch.growth ** (0.5 ** 6)
        assert taken[2] == plain[2] == "retain_budget"
        assert budget_edge / tolerance <= taken[0] <= budget_edge
        assert abs(math.log(taken[0] / plain[0])) <= math.log(tolerance)
        # the search for the aim (as without a binding budget), then one forget score: the bisection below the aim
        # measures the budget alone
        free_calls = {"score": 0, "budget": 0}
        free, _, free_budget = _synthetic(0.3, 10.0, free_calls)
        StepSearch(free, (0.0, 0.0), free_budget).run(1.0, 6)
        assert taken[1][0][0] > 0.0 and lazy_calls["score"] == free_calls["score"] + 1, (lazy_calls, free_calls)


def test_guided_search_closes_the_bracket_in_fewer_points():
    """A guess at the crossing (here exact) brackets it as tightly as six bisections, in fewer points."""
    calls = {"score": 0, "budget": 0}
    _, eager, _ = _synthetic(0.3, 10.0, calls)
    plain = StepSearch(eager, (0.0, 0.0))
    eta_plain, _, _ = plain.run(1.0, 6)
    guided = StepSearch(eager, (0.0, 0.0), guess=lambda lo, hi: 0.3)
    eta_guided, _, reason = guided.run(1.0, 6)
    tolerance = StepSearch.growth ** (0.5 ** 6)
    assert reason == "target_reached" and 0.3 <= eta_guided <= 0.3 * tolerance
    assert guided.evaluations < plain.evaluations - 2, (guided.evaluations, plain.evaluations)
    assert abs(math.log(eta_guided / eta_plain)) <= math.log(tolerance)


class _Forwards:
    """Examples through the model's input embedding (one row per example and forward pass)."""

    def __init__(self, model):
        self.examples = 0
        self._handle = model.get_input_embeddings().register_forward_hook(self._count)

    def _count(self, module, args, output):
        self.examples += int(args[0].shape[0])

    def close(self):
        self._handle.remove()


def test_cheaper_search_reaches_the_same_outcome_with_fewer_forward_passes():
    """The default recipe on the memorised canaries of a tiny GPT-2: with the budget measured on demand and the
    guided bisection, the run reaches the same status, forget score (±0.02) and held retain loss (rise within 10 %)
    for at most half the forward examples of the plain search."""
    base, forget, retain, held, holdout = memorise("gpt2")
    outcomes = {}
    for name, knobs in (("plain", {"lazy_budget": False, "guided_search": False}),
                        ("cheap", {"lazy_budget": True, "guided_search": True})):
        model = copy.deepcopy(base)
        u = build_unlearner("newton", model, **knobs)
        counter = _Forwards(model)
        try:
            u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
        finally:
            counter.close()
        s = u.summary()
        evaluations = sum(r.evaluations or 0 for r in u.history)
        outcomes[name] = (u.status, s["forget_score_after"], s["retain_loss_after"] - s["retain_loss_before"],
                          counter.examples, evaluations)
    plain, cheap = outcomes["plain"], outcomes["cheap"]
    assert plain[0] == cheap[0] == "target_reached", outcomes
    assert cheap[1] >= plain[1] - 0.02, outcomes
    assert cheap[2] <= plain[2] + 0.1 * abs(plain[2]) + 1e-3, outcomes
    assert cheap[3] <= 0.5 * plain[3], outcomes
    assert cheap[4] < plain[4], outcomes


def _count_measurements(unlearner, method: str = "measure_forget_score") -> list[int]:
    """A list that grows by one whenever `unlearner` measures a forget score (a forward pass over forget and
    holdout), or calls `method`."""
    measured: list[int] = []
    measure = getattr(unlearner, method)
    setattr(unlearner, method, lambda *a, **k: measured.append(1) or measure(*a, **k))
    return measured


def test_a_forget_score_is_measured_once_per_weights_and_data():
    """`score_memo`: the forget score of weights and data already measured is not measured again. A default run
    measures at least `steps + 1` times less than it asks for (each step's start and the run's end are weights the
    search or `begin` measured), and the held retain loss once less (the run's end), and ends with the same weights
    and summary as measuring every time; a write to a parameter or new batch tensors with the same values are
    measured again."""
    base, forget, retain, held, holdout = memorise("gpt2")
    runs = {}
    for remember in (True, False):
        model = copy.deepcopy(base)
        u = build_unlearner("newton", model)
        if not remember:
            u._score_memo.get = lambda key, reduce: None  # every request for a score measures
            u._score_memo.remember_held = lambda *args: None  # and for the held retain loss
        measured = _count_measurements(u)
        held_measured = _count_measurements(u, "measure")
        u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
        runs[remember] = (model.state_dict(), len(measured), u.summary(), len(held_measured))
    (weights, remembered, summary, held_n), (weights_every, every, summary_every, held_every) = runs[True], runs[False]
    assert summary == summary_every  # the held retain loss after the run too, to the last bit
    assert all(torch.equal(weights[n], weights_every[n]) for n in weights)
    assert summary["steps_accepted"] >= 2 and remembered <= every - summary["steps_accepted"] - 1, (remembered, every)
    assert held_n == held_every - 1, (held_n, held_every)  # `finish` reads the last step's measurement

    u = build_unlearner("newton", copy.deepcopy(base))
    u.calibrate([holdout])
    measured = _count_measurements(u)
    first = u.forget_score([forget])
    assert u.forget_score([forget]) == first and len(measured) == 1
    assert u.forget_score([{k: v.clone() for k, v in forget.items()}]) == first and len(measured) == 2
    with torch.no_grad():
        next(iter(u.model.parameters())).mul_(1.5)
    assert u.forget_score([forget]) != first and len(measured) == 3
