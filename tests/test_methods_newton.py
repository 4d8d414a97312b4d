"""Newton unlearning on a tiny GPT-2 that memorises digit canaries inside the test, plus the engine's safety."""

from __future__ import annotations

import copy

import pytest
import torch
from canary_corpus import batch, memorise
from torch import nn

from lightning_unlearn.curvature import CrossEntropyObjective, DiagonalFisher
from lightning_unlearn.curvature.layers import UncoveredParametersWarning
from lightning_unlearn.methods import METHODS, Newton, build_curvature, build_unlearner
from lightning_unlearn.models import small_causal_lm


@pytest.fixture(scope="module")
def memorised():
    """A tiny GPT-2 trained with Adam (~10 s) on the retain text plus 4 canaries repeated 8 times."""
    model, forget, retain_batches, held, _ = memorise("gpt2")
    return model, forget, retain_batches, held


def test_kfac_newton_forgets_canaries_at_less_retain_cost_than_gradient_ascent(memorised):
    base, forget, retain, held = memorised
    probe = build_unlearner("gradient_ascent", base)
    f0, r0 = probe.measure(forget), probe.measure(held)
    assert f0 < 0.5, f"the canaries should be memorised before unlearning (span NLL {f0:.3f})"

    newton = build_unlearner("newton", copy.deepcopy(base), curvature_backend="kfac", damping=1e-3, scale=3e-3)
    records = newton.fit([forget], retain, held_retain_batch=held)
    assert records[-1].accepted
    f_newton, r_newton = newton.measure(forget), newton.measure(held)
    # a clear margin: about chance level for six random digits (ln 10 = 2.3 nats per digit)
    assert f_newton > f0 + 1.5, (f0, f_newton)

    ascent = build_unlearner("gradient_ascent", copy.deepcopy(base), forget_loss="nll", lr=1e-3, steps=200,
                             max_retain_increase=None, forget_target=f_newton)
    ga_records = ascent.fit([forget], retain, held_retain_batch=held)
    assert ga_records[-1].reason == "target_reached"
    f_ga, r_ga = ascent.measure(forget), ascent.measure(held)
    print(f"forget NLL {f0:.3f} -> newton {f_newton:.3f} / ascent {f_ga:.3f}; "
          f"held retain NLL {r0:.4f} -> newton {r_newton:.4f} / ascent {r_ga:.4f}")
    assert r_newton - r0 < r_ga - r0, (r0, r_newton, r_ga)


def test_unlikelihood_default_beats_nll_ascent_for_same_newton_step(memorised):
    base, forget, retain, held = memorised
    out = {}
    for loss in ("unlikelihood", "nll"):
        # the fixed step of the first build (absolute λ, no step search): the objectives compared at equal η
        u = build_unlearner("newton", copy.deepcopy(base), curvature_backend="kfac", forget_loss=loss, damping=1e-3,
                            damping_mode="absolute", step_search=False, steps=1, scale=3e-3,
                            max_retain_increase=None)
        u.fit([forget], retain, held_retain_batch=held)
        out[loss] = u.measure(forget)
    assert out["unlikelihood"] > out["nll"] + 1.0, out


def test_huge_step_is_rolled_back_bit_identically(memorised):
    base, forget, retain, held = memorised
    model = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log = []
    u = build_unlearner("newton", model, curvature_backend="kfac", damping=1e-3, damping_mode="absolute",
                        step_search=False, steps=1, scale=1e6, max_retries=2, log=log.append)
    records = u.fit([forget], retain, held_retain_batch=held)
    assert [r.accepted for r in records] == [False, False, False]
    assert all(r.reason in ("retain_increase", "non_finite", "trust_region") for r in records)
    assert [r.damping for r in records] == pytest.approx([1e-3, 1e-2, 1e-1])
    assert log == u.history == records
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_iterative_newton_stops_at_forget_target_and_refreshes_curvature(memorised):
    base, forget, retain, held = memorised
    u = build_unlearner("newton", copy.deepcopy(base), curvature_backend="diagonal", damping=1e-3, scale=1e-3,
                        steps=10, refresh_every=2, forget_target=1.0)
    records = u.fit([forget], retain[:1], held_retain_batch=held)
    assert records[-1].reason == "target_reached" and records[-1].forget_loss >= 1.0
    accepted = [r for r in records if r.accepted]
    assert len(accepted) >= 1 and all(r.retain_loss <= records[0].retain_loss * 1.06 for r in accepted)


def test_a_last_step_short_of_the_target_is_repeated_with_a_fresh_direction():
    """`final_repeats`: when the last planned step ends short of the target for no other reason (here the trust region
    caps it), `fit` takes up to `final_repeats` more steps at the full target, and stops at the target; with
    `final_repeats=0`, an explicit `steps` and no `final_repeats`, or a first-order method, the run ends after `steps`.
    A bad value is refused."""
    base, forget, retain, held, holdout = memorise("gpt2")
    runs = {}
    for repeats in (None, 0, 2):
        u = build_unlearner("newton", copy.deepcopy(base), steps=1, max_step_norm=0.1, final_repeats=repeats)
        records = u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
        runs[repeats] = ([r.reason for r in records], u.summary())
    assert runs[0] == runs[None] and runs[0][0] == ["accepted"] and runs[0][1]["status"] == "budget_exhausted", runs
    reasons, summary = runs[2]
    assert reasons[0] == "accepted" and reasons[-1] == "target_reached" and 2 <= len(reasons) <= 3, reasons
    assert summary["status"] == "target_reached" and summary["forget_score_after"] >= 0.5, summary
    ascent = build_unlearner("gradient_ascent", copy.deepcopy(base), steps=1)
    assert len(ascent.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])) == 1
    with pytest.raises(ValueError, match="final_repeats"):
        build_unlearner("newton", copy.deepcopy(base), final_repeats=-1)


def test_full_minus_forget_recovers_retain_curvature_direction_diagonal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    obj = CrossEntropyObjective(shift=False)
    xs = torch.randn(40, 4)
    ys = torch.randint(0, 3, (40,))
    retain = [{"inputs": xs[i:i + 10], "labels": ys[i:i + 10]} for i in range(0, 30, 10)]
    forget = [{"inputs": xs[30:], "labels": ys[30:]}]

    def fitted(batches):
        c = DiagonalFisher(model, fisher_type="empirical", objective=obj)
        for b in batches:
            c.accumulate(b)
        return c.finalize()

    full, retain_c = fitted(retain + forget), fitted(retain)
    full_state = {k: v.clone() for k, v in full.diagonal.items()}
    u = Newton(model, curvature_data="full_minus_forget", full_curvature=full, damping=1e-3,
               curvature_kwargs={"fisher_type": "empirical", "objective": obj})
    u.curvature_backend = "diagonal"
    derived = u.fit_curvature(forget)
    for k in full_state:  # the checkpoint itself is untouched
        assert torch.equal(full.diagonal[k], full_state[k])
    g = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    a, b = derived.apply(g, 1e-3), retain_c.apply(g, 1e-3)
    va, vb = torch.cat([a[n].flatten() for n in a]), torch.cat([b[n].flatten() for n in b])
    assert torch.nn.functional.cosine_similarity(va, vb, dim=0) > 0.999


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_newton_runs_on_tiny_hf_models(arch):
    model = small_causal_lm(arch, vocab_size=32, hidden=16)
    x = torch.randint(0, 31, (4, 10), generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    u = build_unlearner("newton", model, curvature_backend="kfac", scale=0.1, max_retain_increase=None)
    records = u.fit([batch(x[:2])], [batch(x[2:])])
    assert records[-1].accepted
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(n in u.param_names for n in changed)


def test_newton_on_peft_lora_updates_adapters_only():
    peft = pytest.importorskip("peft")
    base = small_causal_lm("llama", vocab_size=32, hidden=16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_alpha=4,
                                                      init_lora_weights=False))
    x = torch.randint(0, 31, (4, 10), generator=torch.Generator().manual_seed(2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for backend in ("kfac", "diagonal"):
        u = build_unlearner("newton", model, curvature_backend=backend, scale=0.1, max_retain_increase=None)
        assert u.fit([batch(x[:2])], [batch(x[2:])])[-1].accepted
        assert all("lora_" in n for n in u.param_names)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)


def test_blocks_that_saw_no_curvature_are_named_and_left_in_place():
    """Fresh LoRA adapters (PEFT's default, B = 0): A's output gradients are Bᵀg = 0, so A's blocks see no curvature
    at all; every backend names them (`uncurved_parameters`), and relatively damped Newton steps leave them in place
    (the damping floor would make their direction 1e6 × a typical block's), warning once; B moves."""
    peft = pytest.importorskip("peft")
    x = torch.randint(0, 31, (6, 10), generator=torch.Generator().manual_seed(2))
    for backend in ("kfac", "diagonal"):
        torch.manual_seed(0)
        model = peft.get_peft_model(small_causal_lm("llama", vocab_size=32, hidden=16),
                                    peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_alpha=4))
        lora_a = {n for n, p in model.named_parameters() if "lora_A" in n}
        curvature = build_curvature(backend, model).fit([batch(x[2:])])
        assert set(curvature.uncurved_parameters()) == lora_a, backend
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        u = build_unlearner("newton", model, curvature=curvature, scale=0.1, max_retain_increase=None)
        with pytest.warns(UncoveredParametersWarning, match="saw no curvature.*lora_A"):
            assert u.fit([batch(x[:2])], [batch(x[2:])])[-1].accepted
        assert u.uncurved == lora_a
        params = dict(model.named_parameters())
        assert all(torch.equal(params[n], before[n]) for n in lora_a), backend
        assert any(not torch.equal(params[n], before[n]) for n in params if "lora_B" in n), backend
        # absolute damping is the caller's own λ, not the floor: nothing is left out
        moved = {n: p.detach().clone() for n, p in params.items()}
        u = build_unlearner("newton", model, curvature=curvature, scale=0.1, max_retain_increase=None,
                            damping_mode="absolute", damping=1.0)
        assert u.fit([batch(x[:2])], [batch(x[2:])])[-1].accepted
        assert any(not torch.equal(p, moved[n]) for n, p in model.named_parameters() if n in lora_a), backend
    adapted = peft.get_peft_model(small_causal_lm("llama", vocab_size=32, hidden=16),
                                  peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    assert build_curvature("kfac", adapted).fit([batch(x[2:])]).uncurved_parameters() == ()


def test_unknown_method_and_backend_errors_name_the_choices():
    model = small_causal_lm("gpt2", vocab_size=32, hidden=16)
    with pytest.raises(ValueError, match="unknown unlearning method 'retrain'.*gradient_ascent.*newton.*npo"):
        build_unlearner("retrain", model)
    with pytest.raises(ValueError, match="unknown curvature backend 'lbfgs'.*kfac, cg, woodfisher, diagonal"):
        build_curvature("lbfgs", model)
    with pytest.raises(ValueError, match="unknown curvature backend 'lbfgs'"):
        build_unlearner("newton", model, curvature_backend="lbfgs")
    with pytest.raises(ValueError, match="unknown forget_loss 'hinge'.*unlikelihood"):
        build_unlearner("newton", model, forget_loss="hinge")
    with pytest.raises(ValueError, match="full_minus_forget.*needs full_curvature"):
        build_unlearner("newton", model, curvature_data="full_minus_forget")
    with pytest.raises(ValueError, match="needs retain batches"):
        x = torch.randint(0, 31, (2, 8))
        build_unlearner("newton", model).fit([batch(x)])
    assert set(METHODS) == {"newton", "fisher_removal", "fisher_forgetting", "gradient_ascent",
                            "gradient_difference", "npo", "simnpo"}
