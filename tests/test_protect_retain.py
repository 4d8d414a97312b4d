"""Retain protection (`protect_retain=k`): the step leaves the mean loss of k groups of retain examples unchanged to
first order, as the holdout protection does for the holdout; measured on memorised canaries (tiny GPT-2)."""

from __future__ import annotations

import copy

import pytest
import torch
from canary_corpus import memorise

from lightning_unlearn.methods import build_unlearner


@pytest.fixture(scope="module")
def memorised():
    model, forget, retain, held, holdout = memorise("gpt2")
    return model, forget, retain, held, holdout


def _flat(v: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([v[n].reshape(-1).double() for n in names])


@pytest.mark.parametrize("k", [0, 4])
def test_the_step_is_orthogonal_to_the_protected_retain_gradients(memorised, k):
    base, forget, retain, held, holdout = memorised
    model = copy.deepcopy(base)
    u = build_unlearner("newton", model, protect_retain=k, steps=1,
                        max_retain_increase=None)
    probe = build_unlearner("gradient_ascent", copy.deepcopy(base))  # the retain groups' gradients at the start
    groups = [probe.forget_gradient([{key: v[j::4] for key, v in b.items()} for b in retain[:1]], kind="nll")
              for j in range(4)]  # the first step's retain batch, grouped as the protection groups it
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    records = u.fit([forget], retain, held_retain_batch=held, holdout_batches=[holdout])
    assert records[-1].accepted
    names = [n for n in groups[0] if n in before]
    delta = torch.cat([(dict(model.named_parameters())[n].detach() - before[n]).reshape(-1).double() for n in names])
    cosines = [float(_flat(g, names) @ delta / (_flat(g, names).norm() * delta.norm())) for g in groups]
    if k:
        assert max(abs(c) for c in cosines) < 1e-4, cosines
    else:  # without the constraint the step is not orthogonal to them: the test above can fail
        assert max(abs(c) for c in cosines) > 1e-3, cosines


def test_protect_retain_is_checked():
    from lightning_unlearn.models import small_causal_lm

    with pytest.raises(ValueError, match="protect_retain must be >= 0"):
        build_unlearner("newton", small_causal_lm("gpt2"), protect_retain=-1)


@pytest.mark.parametrize("reuse", [False, True])
def test_reuse_protection_keeps_the_holdout_gradients_and_takes_each_step_s_retain_groups(memorised, reuse):
    base, forget, retain, held, holdout = memorised
    u = build_unlearner("newton", copy.deepcopy(base), protect_retain=2, steps=3, final_repeats=0,
                        max_retain_increase=None, reuse_protection=reuse)
    calls = {"holdout": 0, "retain": []}
    holdout_gradients, group_gradients = u.holdout_gradients, u.group_gradients

    def counted_holdout():
        calls["holdout"] += 1
        return holdout_gradients()

    def counted_groups(batches, k):
        if batches is not u.holdout:
            calls["retain"].append(id(batches[0]))
        return group_gradients(batches, k)

    u.holdout_gradients, u.group_gradients = counted_holdout, counted_groups
    records = u.fit([forget], retain[:3], held_retain_batch=held, holdout_batches=[holdout])
    steps = len(records)
    assert steps >= 2
    assert calls["holdout"] == (1 if reuse else steps)
    assert len(calls["retain"]) == steps and len(set(calls["retain"])) > 1  # every step its own retain batch
