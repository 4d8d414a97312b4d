"""Per-example losses measured with batches joined in one forward (`example_losses_joined`, one process) are those
of one forward per batch (`example_losses`): the same examples in the same order, the same sums; batches of other
shapes, or too many positions together, run apart; and a request's forget score does not depend on it."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_unlearn.curvature.base import identity
from lightning_unlearn.methods import build_unlearner
from lightning_unlearn.methods.losses import JOINT_POSITIONS, example_losses, example_losses_joined
from lightning_unlearn.models import small_causal_lm


def _batch(rows: int, length: int, seed: int, blank_row: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # a span, like the canaries' secrets
    if blank_row:
        labels[1] = -100  # an example with no valid position: it has no loss
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _forwards(model: torch.nn.Module):
    calls = []
    return calls, model.register_forward_hook(lambda *_: calls.append(1))


def test_joined_losses_equal_one_forward_per_batch_in_order():
    model = small_causal_lm("gpt2", vocab_size=64, hidden=32, seed=0).eval()
    forget = [_batch(3, 12, 1, blank_row=True)]
    holdout = [_batch(5, 12, 2), _batch(2, 12, 3), _batch(4, 9, 4)]  # the last: another length, its own forward
    calls, hook = _forwards(model)
    joined = example_losses_joined(model, [forget, holdout])
    hook.remove()
    assert len(calls) == 2  # forget + the first two holdout batches together, then the odd one
    for group, (losses, total, count) in zip([forget, holdout], joined):
        ref_losses, ref_total, ref_count = example_losses(model, group, identity)
        assert losses.shape == ref_losses.shape and len(losses) == sum(len(b["labels"]) for b in group) - (
            1 if group is forget else 0)
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
        assert abs(total - ref_total) <= 1e-5 * abs(ref_total) and count == ref_count


def test_batches_past_the_joint_size_run_apart():
    model = small_causal_lm("gpt2", vocab_size=64, hidden=32, seed=0).eval()
    length = 16
    rows = JOINT_POSITIONS // length  # one batch fills the joint size: the next cannot join it
    calls, hook = _forwards(model)
    example_losses_joined(model, [[_batch(rows, length, 1)], [_batch(2, length, 2)]])
    hook.remove()
    assert len(calls) == 2


@pytest.mark.filterwarnings("ignore::lightning_unlearn.methods.holdout.HoldoutWarning")  # random tokens: no canaries
def test_a_requests_forget_score_is_the_same_joined_or_not():
    """The same run through a `reduce` that is not `identity` (a sum over one process: the same numbers), which
    measures every batch apart, takes the same steps to the same score, up to the rounding of larger batches."""
    model = small_causal_lm("gpt2", vocab_size=64, hidden=32, seed=0).eval()
    forget, holdout, retain = _batch(4, 12, 1), [_batch(8, 12, 2)], [_batch(8, 12, 5)]
    runs = []
    for reduce in (identity, lambda t: t + 0):
        u = build_unlearner("newton", copy.deepcopy(model), steps=2, reduce=reduce)
        calls, hook = _forwards(u.model)
        u.fit([forget], retain, holdout_batches=holdout)
        hook.remove()
        runs.append((u.summary()["forget_score_after"], [r.scale for r in u.history], len(calls)))
    (score_joined, etas_joined, n_joined), (score_apart, etas_apart, n_apart) = runs
    assert abs(score_joined - score_apart) < 1e-5
    assert len(etas_joined) == len(etas_apart) and all(abs(a / b - 1) < 1e-4 for a, b in zip(etas_joined, etas_apart))
    assert n_joined < n_apart
