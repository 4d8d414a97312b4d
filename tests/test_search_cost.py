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
    search or `begin` measured), and the held retain loss once less for every read of weights a search measured (the
    run's end; the start of a step the final budget share caps), and ends with the same weights and summary as
    measuring every time; a write to a parameter or new batch tensors with the same values are measured again."""
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
        held_reads = _count_measurements(u._score_memo, "held_loss")
        u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
        runs[remember] = (model.state_dict(), len(measured), u.summary(), len(held_measured), len(held_reads))
    (weights, remembered, summary, held_n, reads), (weights_every, every, summary_every, held_every, _) = (
        runs[True], runs[False])
    assert summary == summary_every  # the held retain loss after the run too, to the last bit
    assert all(torch.equal(weights[n], weights_every[n]) for n in weights)
    assert summary["steps_accepted"] >= 2 and remembered <= every - summary["steps_accepted"] - 1, (remembered, every)
    assert reads >= 1 and held_n == held_every - reads, (held_n, held_every, reads)  # each read was a search's

    u = build_unlearner("newton", copy.deepcopy(base))
    u.calibrate([holdout])
    measured = _count_measurements(u)
    first = u.forget_score([forget])
    assert u.forget_score([forget]) == first and len(measured) == 1
    assert u.forget_score([{k: v.clone() for k, v in forget.items()}]) == first and len(measured) == 2
    with torch.no_grad():
        next(iter(u.model.parameters())).mul_(1.5)
    assert u.forget_score([forget]) != first and len(measured) == 3


@pytest.mark.parametrize("lazy", [False, True])
def test_a_point_close_enough_to_a_waypoint_ends_the_search(lazy):
    """`good_enough`: the first point that reaches the aim by at most the band is taken, in fewer points than
    closing the bracket below it; with the budget measured on demand, once, at that point."""
    band = 0.05
    runs = {}
    for name, good in (("closing", None), ("waypoint", lambda p: p.forget[0] <= AIM + band)):
        calls = {"score": 0, "budget": 0}
        evaluate_lazy, eager, budget = _synthetic(0.3, 10.0, calls)
        search = StepSearch(evaluate_lazy if lazy else eager, (0.0, 0.0), budget if lazy else None,
                            guess=None, good_enough=good)
        runs[name] = (search.run(1.0, 6), dict(calls))
    (eta, ((score, _), _), reason), calls = runs["waypoint"]
    (eta_closing, _, reason_closing), calls_closing = runs["closing"]
    assert reason == reason_closing == "target_reached"
    assert AIM <= score <= AIM + band and eta >= eta_closing
    assert calls["score"] < calls_closing["score"], (calls, calls_closing)
    if lazy:
        assert calls["budget"] == 1


def test_a_first_point_within_the_band_is_taken_at_once_and_one_beyond_it_is_not():
    calls = {"score": 0, "budget": 0}
    _, eager, _ = _synthetic(0.3, 10.0, calls)
    search = StepSearch(eager, (0.0, 0.0), good_enough=lambda p: p.forget[0] <= AIM + 0.05)
    assert search.run(0.31, 6)[0] == 0.31 and search.evaluations == 1  # score 0.517: within the band
    search = StepSearch(eager, (0.0, 0.0), good_enough=lambda p: p.forget[0] <= AIM + 0.05)
    eta, ((score, _), _), _ = search.run(0.4, 6)  # score 0.667: beyond it, so the search goes on below
    assert eta < 0.4 and AIM <= score <= AIM + 0.05 and search.evaluations > 1


def test_staged_waypoints_end_their_searches_early_and_the_target_still_takes_the_smallest_step():
    """The recipe with a staged budget (the knowledge regime's, set here by hand) on the memorised canaries of a tiny
    GPT-2, with and without the waypoint band: the same status, the last step still at the target to the search's
    tolerance (only waypoints get the band), fewer forget scores measured. Without a staged budget (the default on
    these canaries) there is no band."""
    from lightning_unlearn.methods.newton import SecondOrderUnlearner

    base, forget, retain, held, holdout = memorise("gpt2")
    default = build_unlearner("newton", copy.deepcopy(base))
    default.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    assert not default.staged_budget and default._waypoint_reached(0.2, 0.5) is None
    outcomes = {}
    for band in (0.0, SecondOrderUnlearner.WAYPOINT_BAND):
        model = copy.deepcopy(base)
        u = build_unlearner("newton", model, staged_budget=True)
        u.WAYPOINT_BAND = band
        measured = _count_measurements(u)
        u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
        s = u.summary()
        outcomes[band] = (u.status, s["forget_score_after"], s["retain_loss_after"] - s["retain_loss_before"],
                          len(measured), u)
    (status0, score0, rise0, n0, _), (status, score, rise, n, u) = outcomes[0.0], outcomes[0.5]
    assert status0 == status == "target_reached", outcomes
    assert 0.5 <= score <= 0.5 + 0.05 and abs(score - score0) <= 0.05, outcomes
    assert rise <= rise0 + 0.1 * abs(rise0) + 1e-3, outcomes
    assert n < n0, outcomes
    assert u._waypoint_reached(0.5, 0.5) is None  # the target itself: no band
    waypoint = u._waypoint_reached(0.2, 0.5)
    band = 0.5 * (0.5 - u._stage_start) / u.steps
    assert waypoint(Point((0.2 + 0.99 * band, 0.0), None, True, True))
    assert not waypoint(Point((0.2 + 1.01 * band, 0.0), None, True, True))


@pytest.mark.parametrize("lazy", [False, True])
def test_a_stalled_bracket_takes_the_point_before_the_flat_stretch(lazy):
    """`stall`: along a direction whose score rises to 0.4 by η = 1 and then barely moves (the aim only at η = 1000),
    the search with a stall ratio stops growing once ×4 adds less than that ratio of the gain so far and takes the
    point before (its budget checked once when measured on demand); without it, it goes on to the aim."""

    def score(eta: float) -> float:
        return 0.4 * min(eta, 1.0) + 0.1 * max(0.0, math.log(max(eta, 1.0)) / math.log(1000.0))

    def run(stall):
        calls = {"score": 0, "budget": 0}

        def budget(eta):
            calls["budget"] += 1
            return eta, True

        def evaluate(eta):
            calls["score"] += 1
            s = score(eta)
            retain, ok = (None, True) if lazy else budget(eta)
            return Point((s, s), retain, ok, s >= AIM)

        search = StepSearch(evaluate, (0.0, 0.0), budget if lazy else None, stall=stall)
        return search.run(0.25, 6), calls

    (eta, ((s, _), _), reason), calls = run(0.25)
    assert eta == 1.0 and s == pytest.approx(0.4) and reason == "accepted"
    if lazy:
        assert calls["budget"] == 1
    (eta_plain, ((s_plain, _), _), reason_plain), _ = run(None)
    assert reason_plain == "target_reached" and eta_plain > 100 and s_plain >= AIM
    # a ratio no growth falls below never stalls
    (eta_tiny, _, reason_tiny), _ = run(1e-6)
    assert reason_tiny == "target_reached" and eta_tiny > 100


@pytest.mark.parametrize("share", [None, 0.5])
def test_the_final_budget_share_caps_the_target_step_while_a_repeat_remains(share):
    """`final_budget_share=r` without a staged budget: the K-th step and every repeat but the last may spend
    spent + r (1 - spent) of the budget; the waypoints and the last repeat the whole of it; a staged budget (the
    knowledge regime's) is left as it is. A capped step that spent its cap takes a repeat."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_unlearn.methods.records import StepRecord

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    u = build_unlearner("newton", model, final_budget_share=share, knowledge=False)
    assert (u.steps, u.final_repeats) == (5, 2)
    u._budget_spent = 0.4
    fractions = {}
    for done in range(1, 8):
        u.step_count = done
        fractions[done] = u.budget_fraction()
    capped = 0.4 + 0.5 * 0.6
    expected = {d: 1.0 for d in range(1, 8)} if share is None else {**{d: 1.0 for d in range(1, 8)}, 5: capped,
                                                                    6: capped}
    assert fractions == pytest.approx(expected)
    spent = StepRecord(step=4, damping=0.1, scale=1e-3, forget_loss=5.0, retain_loss=1.0, accepted=True,
                       reason="retain_budget", trial=0, target=0.5, evaluations=3, forget_score=0.45)
    u.step_count = 5
    assert u.repeats_last_stage(spent) is (share is not None)
    u.step_count = 7  # the last repeat spends the whole budget: nothing after it
    assert not u.repeats_last_stage(spent)
    staged = build_unlearner("newton", model, final_budget_share=share, knowledge=False, staged_budget=True)
    staged._budget_spent = 0.4
    staged.step_count = 5
    assert staged.budget_fraction() == 1.0


@pytest.mark.parametrize("budget_edge", [10.0, 0.05])
def test_a_direction_that_peaks_short_of_the_aim_gets_its_budget_measured_at_its_best_point(budget_edge):
    """No point reaches the aim (the score peaks at 0.3 at η = 0.2): with the budget measured on demand, the best
    point's budget is measured once (within the budget: it is taken, as the plain search takes it), or the largest η
    below it within the budget is found on the budget alone (one more forget score, at the η taken), to the plain
    search's η and reason, with no more held-batch passes than the plain search."""

    def score(eta: float) -> float:
        return 0.3 * (eta / 0.2) * math.exp(1.0 - eta / 0.2)

    def counted(edge: float):
        calls = {"score": 0, "budget": 0}

        def budget(eta: float) -> tuple[float, bool]:
            calls["budget"] += 1
            return eta, eta <= edge

        def lazy(eta: float) -> Point:
            calls["score"] += 1
            return Point((score(eta), 0.0), None, True, False)

        def eager(eta: float) -> Point:
            calls["score"] += 1
            retain, ok = budget(eta)
            return Point((score(eta), 0.0), retain, ok, False)

        return calls, lazy, eager, budget

    plain_calls, _, eager, _ = counted(budget_edge)
    plain = StepSearch(eager, (0.0, 0.0)).run(0.01, 6)
    calls, lazy, _, budget = counted(budget_edge)
    taken = StepSearch(lazy, (0.0, 0.0), budget).run(0.01, 6)
    free_calls, free, _, free_budget = counted(10.0)
    StepSearch(free, (0.0, 0.0), free_budget).run(0.01, 6)  # the same search for the aim, the budget never binding
    assert taken[2] == plain[2] == ("accepted" if budget_edge > 1 else "retain_budget")
    if budget_edge > 1:
        assert taken[0] == plain[0] and calls["budget"] == 1 and calls["score"] <= plain_calls["score"]
    else:
        tolerance = StepSearch.growth ** (0.5 ** 6)
        assert budget_edge / tolerance <= taken[0] <= budget_edge
        assert abs(math.log(taken[0] / plain[0])) <= math.log(tolerance)
        assert calls["score"] <= free_calls["score"] + 1 and calls["budget"] <= plain_calls["budget"], calls


def test_a_direction_that_never_raises_the_score_ends_with_no_progress_after_one_budget_check():
    """The score falls from the first point on: with the budget measured on demand the shortest point's budget is
    measured once and the search ends with the plain search's reason, instead of a second search with a held-batch
    pass at every point."""
    calls = {"score": 0, "budget": 0}

    def budget(eta: float) -> tuple[float, bool]:
        calls["budget"] += 1
        return eta, eta <= 10.0

    def lazy(eta: float) -> Point:
        calls["score"] += 1
        return Point((-eta, 0.0), None, True, False)

    def eager(eta: float) -> Point:
        retain, ok = budget(eta)
        return Point((-eta, 0.0), retain, ok, False)

    plain = StepSearch(eager, (0.0, 0.0)).run(0.01, 6)
    plain_checks, calls["budget"] = calls["budget"], 0
    taken = StepSearch(lazy, (0.0, 0.0), budget).run(0.01, 6)
    assert taken[0] is None and plain[0] is None and taken[2] == plain[2] == "no_progress"
    assert calls["budget"] == 1 < plain_checks
