"""The default recipe on whole lines about people (tiny untied Llama, Qwen2 and GPT-NeoX; `line_corpus`).

Two budgets, two honest outcomes:
- budget on held-out retain text (prose never trained on, the model's general ability): the run takes the knowledge
  regime (its retain batches hold memorised lines beside a memorised forget set) with the 5 % budget (the prose is
  not memorised), reaches the target (the forget lines at the never-trained lines' median loss), the held-out retain
  loss stays within 5 % and the other people's lines, never shown to the unlearner, stay far below the
  never-trained lines' loss (the secret recipe took them to 2.1-4.5 nats, the holdout's level);
- budget on the retain *lines* (other people's memorised lines, the knowledge to keep): the run stays within that
  budget and says it stopped there (`budget_exhausted`) rather than claiming the target.

And the retain repair's ceiling: on a tiny StableLM's lines (seed 1) the repair lowered the holdout lines' losses
with the retain loss and took the forget score 0.50 → 0.83; the run now ends within the target plus 2 null standard
deviations of the score (`repair.REPAIR_SCORE_BAND`).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from line_corpus import V, batch, memorise_lines

from lightning_unlearn.curvature.layers import UncoveredParametersWarning
from lightning_unlearn.methods import build_unlearner
from lightning_unlearn.methods.repair import REPAIR_SCORE_BAND
from lightning_unlearn.methods.target import null_score_sd, retain_budget_nats
from lightning_unlearn.models import small_causal_lm

ARCHS = ["llama", "qwen2", "gpt_neox"]


@pytest.fixture(scope="module", params=ARCHS)
def memorised(request):
    torch.manual_seed(0)
    return request.param, memorise_lines(request.param)


def test_default_recipe_reaches_the_target_within_the_held_out_retain_budget(memorised):
    arch, (model, forget, retain, held, (unseen_prose, retain_lines), holdout) = memorised
    model = _copy(model)
    u = build_unlearner("newton", model)  # no knob set
    f0, h0, c0 = u.measure(forget), u.measure(holdout), u.measure(unseen_prose)
    assert f0 < 1.0 < h0, f"{arch}: lines not memorised (forget {f0:.2f}, holdout {h0:.2f})"
    records = u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    f1, c1 = u.measure(forget), u.measure(unseen_prose)
    print(f"{arch}: forget {f0:.3f} -> {f1:.3f}, held-out retain {c0:.4f} -> {c1:.4f} "
          f"({100 * (c1 / c0 - 1):+.2f} %), retain lines {u.measure(retain_lines):.3f}, {len(records)} step(s)")
    assert u.status == "target_reached", [r.reason for r in records]
    assert u.summary()["forget_score_after"] >= 0.5 and f1 > f0 + 1.0
    assert c1 <= 1.05 * c0, (c0, c1)
    assert u.knowledge_regime and u.max_retain_increase == 0.05  # memorised retain lines; the budget on prose
    assert u.measure(retain_lines) < 0.3 * h0  # the other people's lines are still known


def test_default_recipe_unlearns_through_fused_experts():
    """transformers 5 keeps a mixture-of-experts model's experts as fused 3-D parameters, which no layer-wise curvature
    covered: they never moved (75 % of the weights of this model), and a real MoE model keeps most of its knowledge
    there. K-FAC now has a block per expert and one per router (`test_curvature_experts.py`). Measured on these lines,
    seeds 0 and 1, against the experts and routers left out: Mixtral's other lines 1.23 / 0.90 nats (left out
    1.13 / 1.30), Qwen3-MoE's 1.01 / 0.97 (0.67 / 1.04), the held-out prose −2.3 to −0.1 %; every run
    `target_reached`."""
    torch.manual_seed(0)
    model, forget, retain, held, (unseen_prose, retain_lines), holdout = memorise_lines("mixtral")
    fused = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 3}
    assert len(fused) == 4
    u = build_unlearner("newton", model)
    h0, c0 = u.measure(holdout), u.measure(unseen_prose)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    uncovered = [str(w.message) for w in caught if issubclass(w.category, UncoveredParametersWarning)]
    assert not uncovered, uncovered  # the experts and the routers are covered
    assert u.status == "target_reached"
    assert u.measure(unseen_prose) <= 1.05 * c0
    assert u.measure(retain_lines) < 0.5 * h0
    params = dict(model.named_parameters())
    moved = {n: float((params[n].detach() - w).norm() / w.norm()) for n, w in fused.items()}
    assert all(m > 1e-3 for m in moved.values()), moved


LORA_TARGETS = {"llama": ["q_proj", "v_proj", "up_proj", "down_proj"],
                "qwen2": ["q_proj", "v_proj", "up_proj", "down_proj"],
                "gpt_neox": ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"]}


@pytest.mark.parametrize("variant", ["lora", "lora-B-only"])
def test_default_recipe_unlearns_through_fresh_lora_adapters(memorised, variant):
    """PEFT's default LoRA adapters start with B = 0: the trust region used to be relative to ‖A‖ (its run bound spent
    by the first step: `budget_exhausted` at forget score 0.00) or, with A frozen, to ‖B‖ = 0 (every step refused),
    and A's blocks see no curvature (their output gradients are Bᵀg = 0), so their Newton direction was their gradient
    over the damping floor. Now B, with no size to be relative to, is left to the curvature's trust region, and A stays
    in place, with a warning naming it. A rank-8 update keeps the other people's lines less well than the full
    weights' (measured: 1.85 / 1.36 / 2.92 nats on Llama / Qwen2 / GPT-NeoX, 0.45 / 0.30 / 0.74 of the never-trained
    lines' loss, against 0.47 / 0.52 / 0.80 nats for the full weights), still below the never-seen level."""
    _unlearn_through_adapters(memorised, variant)


def test_default_recipe_unlearns_through_fresh_dora_adapters():
    """DoRA runs its adapters once more on an identity matrix, detached, to measure its weight's norm: K-FAC refused
    that ("saw a forward but no backward"); the call now adds nothing (`test_curvature_kfac.py`). On Llama's lines the
    request reaches its target (Qwen2's too: other lines 1.09 nats); on GPT-NeoX's its first step spends the whole 5 %
    budget and it ends `budget_exhausted` at forget score 0.00 (the unstaged budget of held-out text, `docs/recipe.md`
    §9)."""
    torch.manual_seed(0)
    _unlearn_through_adapters(("llama", memorise_lines("llama")), "dora")


def _unlearn_through_adapters(memorised, variant):
    peft = pytest.importorskip("peft")
    arch, (model, forget, retain, held, (unseen_prose, retain_lines), holdout) = memorised
    torch.manual_seed(0)
    train_a = variant != "lora-B-only"
    adapted = peft.get_peft_model(_copy(model), peft.LoraConfig(r=8, target_modules=LORA_TARGETS[arch],
                                                                use_dora=variant == "dora"))
    if not train_a:
        for name, p in adapted.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    assert all(not p.any() for n, p in before.items() if "lora_B" in n)  # fresh adapters
    u = build_unlearner("newton", adapted)  # no knob set
    f0, h0, c0 = u.measure(forget), u.measure(holdout), u.measure(unseen_prose)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    f1, c1, lines = u.measure(forget), u.measure(unseen_prose), u.measure(retain_lines)
    print(f"{arch} {variant}: forget {f0:.3f} -> {f1:.3f}, held-out retain "
          f"{100 * (c1 / c0 - 1):+.2f} %, retain lines {lines:.3f} (holdout {h0:.3f}), {len(records)} step(s)")
    assert u.status == "target_reached", [r.reason for r in records]
    assert u.summary()["forget_score_after"] >= 0.5 and f1 > f0 + 1.0
    assert c1 <= 1.05 * c0, (c0, c1)
    assert lines < 0.8 * h0  # the other people's lines are still known better than never-seen ones
    params = dict(adapted.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in before.items() if "lora_" not in n)  # the base stays
    assert all(torch.equal(params[n], p) for n, p in before.items() if "lora_A" in n)  # A: no curvature, in place
    assert any(not torch.equal(params[n], p) for n, p in before.items() if "lora_B" in n)
    left = [str(w.message) for w in caught if issubclass(w.category, UncoveredParametersWarning)]
    assert bool(left) == train_a and all("lora_A" in m for m in left), left


def test_default_recipe_keeps_a_knowledge_budget_and_says_where_it_stopped(memorised):
    arch, (model, forget, retain, _, (_, retain_lines), holdout) = memorised
    model = _copy(model)
    held_lines = {k: v[:64] for k, v in retain_lines.items()}
    u = build_unlearner("newton", model)
    r0, f0 = u.measure(held_lines), u.measure(forget)
    records = u.fit([forget], retain, held_retain_batch=held_lines, holdout_batches=[holdout])
    r1, f1 = u.measure(held_lines), u.measure(forget)
    print(f"{arch}: forget {f0:.3f} -> {f1:.3f}, held retain lines {r0:.4f} -> {r1:.4f}, status {u.status}")
    assert any(r.accepted for r in records) and f1 > f0
    assert r1 <= r0 + retain_budget_nats(u.max_retain_increase, r0) + 1e-9
    assert math.isclose(u.summary()["retain_loss_after"], r1, rel_tol=1e-9)
    if u.status != "target_reached":  # the budget stopped it: the summary says so, the score is below the target
        assert u.status == "budget_exhausted" and u.summary()["forget_score_after"] < 0.5


def test_the_retain_repair_leaves_the_forget_score_within_its_band():
    """Seed 1's StableLM: without the ceiling the repair kept its longest trial, forget score 0.83 (the retain lines
    1.32 nats, from 0.27); with it the run ends at most 2 null standard deviations of the score above the target
    (0.5 + 2 × 0.115 for 8 forget and 32 holdout lines) and not below the repair's slack under it, with the held-out
    prose no worse. Whether the repair keeps a step here depends on float rounding (the last step lands on the target
    to 0.001 and the repair's constraint holds the forget losses to first order only: on one CPU it kept one, on
    another none); where it keeps one, that step lowered the held retain loss. The ceiling itself is tested exactly
    below."""
    torch.manual_seed(0)
    model, forget, retain, held, (unseen_prose, retain_lines), holdout = memorise_lines("stablelm", seed=1)
    u = build_unlearner("newton", model)
    c0 = u.measure(unseen_prose)
    u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    s = u.summary()
    ceiling = s["target"] + REPAIR_SCORE_BAND * null_score_sd(8, 32)
    print(f"stablelm: score {s['forget_score_after']:.3f} (ceiling {ceiling:.3f}), retain lines "
          f"{u.measure(retain_lines):.3f}, held-out prose {c0:.4f} -> {u.measure(unseen_prose):.4f}, repair kept: "
          f"{s['retain_loss_before_repair'] is not None}")
    assert u.status == "target_reached" and s["knowledge_regime"]
    assert s["target"] - 1e-3 <= s["forget_score_after"] <= ceiling + 1e-9
    if s["retain_loss_before_repair"] is not None:
        assert s["retain_loss_after"] < s["retain_loss_before_repair"]
    assert u.measure(unseen_prose) <= 1.05 * c0


def test_the_repair_ceiling_is_the_target_plus_two_null_sds_or_where_the_steps_left_the_score():
    """`repair_score_ceiling`: with a holdout target, max(the score the steps left, target + `REPAIR_SCORE_BAND` null
    standard deviations of n forget and m holdout examples); a repair trial above it is refused (`_repair_trial`)."""
    model = small_causal_lm("gpt2", vocab_size=V, hidden=16, heads=2, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    u = build_unlearner("newton", model)
    u.calibrate([batch(torch.randint(0, V, (32, 12), generator=g))])
    ceiling = u.current_target() + REPAIR_SCORE_BAND * null_score_sd(8, 32)
    assert ceiling == pytest.approx(0.5 + 2 * math.sqrt(41 / (12 * 8 * 32)))
    assert u.repair_score_ceiling(0.3, 8) == pytest.approx(ceiling)
    assert u.repair_score_ceiling(0.95, 8) == 0.95
    forget = batch(torch.randint(0, V, (8, 12), generator=g))
    u.fit_curvature([forget])  # the parameters a trial moves
    snapshot = u._snapshot()
    zero = {n: torch.zeros_like(p) for n, p in snapshot.items()}
    score = u.forget_score([forget])[0]
    held = batch(torch.randint(0, V, (8, 12), generator=g))
    bar = u.measure(held) + 1.0
    assert u._repair_trial(snapshot, zero, 1.0, [forget], held, (score - 1e-6, score + 1e-6), bar) is not None
    assert u._repair_trial(snapshot, zero, 1.0, [forget], held, (score + 1e-3, 1.0), bar) is None  # below the band
    assert u._repair_trial(snapshot, zero, 1.0, [forget], held, (0.0, score - 1e-3), bar) is None  # above the ceiling


def test_the_null_sd_of_the_forget_score_is_that_of_every_ranking():
    """`null_score_sd(n, m)` against the score's exact distribution when every ranking of n forget and m holdout
    examples is equally likely (enumerated): the mean is 0.5, the standard deviation sqrt((n + m + 1) / (12 n m))."""
    from itertools import combinations

    for n, m in ((1, 1), (2, 3), (3, 4), (4, 4)):
        scores = []
        for forget_ranks in combinations(range(n + m), n):
            below = sum(sum(1 for h in range(n + m) if h not in forget_ranks and h < f) for f in forget_ranks)
            scores.append(below / (n * m))
        mean = sum(scores) / len(scores)
        sd = math.sqrt(sum((x - mean) ** 2 for x in scores) / len(scores))
        assert mean == pytest.approx(0.5) and sd == pytest.approx(null_score_sd(n, m), rel=1e-12), (n, m)
    assert null_score_sd(2, 3) == pytest.approx(math.sqrt(1 / 12))  # (2 + 3 + 1) / (12 · 2 · 3) = 1/12, by hand
    assert null_score_sd(0, 5) == math.inf


def _copy(model):
    import copy

    return copy.deepcopy(model)
