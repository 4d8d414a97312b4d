"""The default recipe, with no knob set, on five architectures; scale-free damping; the step search; the statuses.

Every model here is trained inside the test until it has memorised four digit canaries (`canary_corpus.memorise`);
the holdout canaries are drawn the same way and never trained on, so their loss is the level "never seen".
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from canary_corpus import memorise

from lightning_unlearn.methods import build_curvature, build_unlearner
from lightning_unlearn.methods.records import NothingAcceptedWarning

ARCHS = ["gpt2", "llama", "qwen2", "gpt_neox", "opt"]


@pytest.fixture(scope="module")
def gpt2():
    return memorise("gpt2")


@pytest.mark.parametrize("arch", ARCHS)
def test_default_recipe_forgets_on_five_architectures(arch):
    model, forget, retain, held, holdout = memorise(arch)
    u = build_unlearner("newton", model)  # no knob set
    f0, h0, r0 = u.measure(forget), u.measure(holdout), u.measure(held)
    assert f0 < 0.5 < 1.5 < h0, f"{arch}: canaries not memorised (forget {f0:.2f}, holdout {h0:.2f})"
    records = u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    f1, h1, r1 = u.measure(forget), u.measure(holdout), u.measure(held)
    print(f"{arch}: forget {f0:.3f} -> {f1:.3f} (holdout {h0:.3f} -> {h1:.3f}), held retain {r0:.4f} -> {r1:.4f} "
          f"({100 * (r1 / r0 - 1):+.2f} %), {len(records)} step(s), status {u.status}")
    assert u.status == "target_reached", [r.reason for r in records]
    summary = u.summary()
    # the forget examples sit at the holdout's median (forget score 0.5 = LOSS-attack AUC 0.5) under the new weights
    assert records[-1].target == 0.5 and summary["forget_score_after"] >= 0.5
    assert summary["forget_score_before"] < 0.1 and f1 > f0 + 1.0
    # +0.4 to +1.7 % in a fresh process; +2.4 % for OPT in a test worker that ran other files first (its trained
    # model differs: held retain 3.536 against 3.503 before unlearning), so the bound leaves that spread room
    assert r1 <= 1.03 * r0, (r0, r1)
    assert summary["status"] == "target_reached" and summary["target_source"] == "holdout"
    assert summary["forget_loss_after"] == pytest.approx(f1) and summary["steps_accepted"] >= 1


def _scaled(curvature, c: float):
    """The same curvature with C -> c C (what multiplying a loss by c does to its Hessian/GGN)."""
    if curvature.name == "kfac":
        for name, (u_a, s_a, u_g, s_g) in curvature.eigen.items():
            curvature.eigen[name] = (u_a, s_a, u_g, c * s_g)
    elif curvature.name == "diagonal":
        curvature.diagonal = {n: c * d for n, d in curvature.diagonal.items()}
    elif curvature.name == "woodfisher":
        for entry in curvature._decomp:
            entry["eig"] = c * entry["eig"]
            entry["gram"] = c * entry["gram"]
        curvature.rows = {n: math.sqrt(c) * r for n, r in curvature.rows.items()}
    else:  # cg: products of c C
        product = curvature._matvec_flat
        curvature._matvec_flat = lambda v: c * product(v)
    curvature._scales = curvature._raw = None
    return curvature


@pytest.mark.parametrize("backend", ["kfac", "diagonal", "woodfisher", "cg"])
def test_relative_damping_is_scale_free(gpt2, backend):
    """Scaling the loss by a constant scales C and the gradient alike: the relatively damped Newton direction is
    unchanged, the absolutely damped one is not."""
    model, forget, retain, _, _ = gpt2
    kwargs = {"max_iter": 200, "rtol": 1e-8, "progress_tol": 0} if backend == "cg" else {}
    fit = retain[:1] if backend in ("woodfisher", "cg") else retain
    base = build_curvature(backend, model, **kwargs).fit(fit)
    scaled = _scaled(build_curvature(backend, model, **kwargs).fit(fit), 1000.0)
    g = build_unlearner("gradient_ascent", model).forget_gradient([forget])
    g = {n: g[n] for n in base.param_names}
    g_scaled = {n: 1000.0 * v for n, v in g.items()}

    def flat(v):
        return torch.cat([t.flatten().double() for t in v.values()])

    def gap(a, b):
        return float((a - b).norm() / a.norm())

    rel = flat(base.apply(g, 0.1, mode="relative")), flat(scaled.apply(g_scaled, 0.1, mode="relative"))
    assert gap(*rel) < 1e-4, (backend, gap(*rel))
    ab = flat(base.apply(g, 0.1, mode="absolute")), flat(scaled.apply(g_scaled, 0.1, mode="absolute"))
    assert gap(*ab) > 1e-2, (backend, gap(*ab))


def test_step_search_stops_at_the_target(gpt2):
    """The accepted step reaches the target and a 5 % shorter one along the same direction does not."""
    base, forget, retain, held, _ = gpt2
    model = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = build_unlearner("gradient_ascent", base)
    target = probe.measure(forget) + 2.0
    u = build_unlearner("newton", model, forget_target=target, steps=1, max_retain_increase=None)
    (record,) = u.fit([forget], retain, held_retain_batch=held)
    assert record.reason == "target_reached" and record.forget_loss >= target and record.evaluations > 2
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n] + 0.95 * (p - before[n]))
    assert u.measure(forget) < target


def test_nothing_accepted_warns_and_leaves_the_model_unchanged(gpt2):
    base, forget, retain, _, holdout = gpt2
    model = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the held batch is the forget batch with its first (unlabelled) token changed, and no budget: every step that
    # forgets the secrets breaks the budget (the forget batch itself is refused as retain data)
    near = {k: v.clone() for k, v in forget.items()}
    near["input_ids"][:, 0] = (near["input_ids"][:, 0] + 1) % model.config.vocab_size
    u = build_unlearner("newton", model, max_retain_increase=0.0, max_retries=1)
    with pytest.warns(NothingAcceptedWarning, match="no step was accepted"):
        records = u.fit([forget], retain, held_retain_batch=near, holdout_batches=[holdout])
    assert u.status == "nothing_accepted" and records and not any(r.accepted for r in records)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_retain_free_request_is_bounded_by_the_curvature(gpt2):
    """full_minus_forget with no retain data at unlearning time: the predicted retain increase ½ΔᵀCΔ bounds the
    step (the first build's retain-free request wrecked the model)."""
    base, forget, retain, held, holdout = gpt2
    model = copy.deepcopy(base)
    full = build_curvature("kfac", model).fit([*retain, forget])
    u = build_unlearner("newton", model, curvature_data="full_minus_forget", full_curvature=full)
    r0 = u.measure(held)
    records = u.fit([forget], holdout_batches=[holdout])
    accepted = [r for r in records if r.accepted]
    assert accepted and all(r.predicted_increase is not None for r in accepted)
    budget = u.max_retain_increase * u.holdout_loss
    assert all(r.predicted_increase <= budget * (1 + 1e-6) for r in accepted)
    assert u.measure(held) <= 1.10 * r0, (r0, u.measure(held))
    assert u.measure(forget) > u.summary()["forget_loss_before"] + 1.0


def test_a_retain_free_budget_read_on_the_holdout_says_so_when_it_stops_the_run(gpt2):
    """Without retain data the budget is read on the holdout, data of the forget set's kind that unlearning moves too:
    when it ends the run (`budget_exhausted`) the run says so and names the fix (one held retain batch); with that
    batch the budget is read on it and nothing of the kind is said."""
    from lightning_unlearn.methods import HoldoutBudgetWarning

    base, forget, retain, held, holdout = gpt2
    outcomes = {}
    for given in (None, held):
        model = copy.deepcopy(base)
        full = build_curvature("kfac", model).fit([*retain, forget])
        u = build_unlearner("newton", model, curvature_data="full_minus_forget", full_curvature=full,
                            max_retain_increase=0.002)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            u.fit([forget], [], held_retain_batch=given, holdout_batches=[holdout])
        said = [w for w in caught if issubclass(w.category, HoldoutBudgetWarning)]
        outcomes["held" if given is not None else "holdout"] = (u.status, said)
    status, said = outcomes["holdout"]
    assert status == "budget_exhausted" and len(said) == 1, outcomes
    assert "held retain batch" in str(said[0].message)
    assert outcomes["held"][1] == [], outcomes


def test_a_curvature_of_another_model_object_is_refused_and_its_state_dict_serves(gpt2):
    """A `Curvature` fitted on another copy of the model would take the gradients and steps to that copy's parameters
    (the request's model never moved: `nothing_accepted`, `no_progress` on every trial): refused, naming the fix; its
    `state_dict()` is loaded onto the request's model and serves."""
    from lightning_unlearn.errors import UserInputError
    from lightning_unlearn.request import serve_request
    from lightning_unlearn.settings import UnlearnSettings

    base, forget, retain, held, holdout = gpt2
    full = build_curvature("kfac", base).fit([*retain, forget])
    model = copy.deepcopy(base)
    with pytest.raises(UserInputError, match="another model object.*state_dict"):
        serve_request(model, [forget], None, [holdout],
                      settings=UnlearnSettings(curvature_data="full_minus_forget", full_curvature=full))
    for kw in ({"curvature_data": "full_minus_forget", "full_curvature": full}, {"curvature": full}):
        with pytest.raises(UserInputError, match="another model object.*state_dict"):
            build_unlearner("newton", model, **kw)  # the engine refuses it too, not only the request path
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))
    result = serve_request(model, [forget], None, [holdout],
                           settings=UnlearnSettings(curvature_data="full_minus_forget",
                                                    full_curvature=full.state_dict()))
    assert result.summary["steps_accepted"] >= 1
    assert result.summary["forget_loss_after"] > result.summary["forget_loss_before"]


def test_eigenvalue_correction_through_build_unlearner(gpt2):
    base, forget, retain, held, holdout = gpt2
    u = build_unlearner("newton", copy.deepcopy(base), curvature_kwargs={"eigenvalue_correction": True})
    u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    assert u.curvature.corrected and u.status in ("target_reached", "budget_exhausted")
