"""The protection groups' gradients from one pass per batch (`methods/group_gradients.py`) equal the per-group passes
they replace, on GPT-2 (Conv1D, biases) and Llama (Linear, no bias), with padding, unlabelled positions, several
batches and more groups than examples."""

from __future__ import annotations

import pytest
import torch

from lightning_unlearn.methods import build_unlearner
from lightning_unlearn.methods.group_gradients import grouped_nll_gradients
from lightning_unlearn.methods.protection import example_groups
from lightning_unlearn.models import small_causal_lm


def _batches(seed: int, vocab: int = 128) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for size, length in ((5, 12), (3, 9)):
        ids = torch.randint(0, vocab, (size, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # right padding
        labels = ids.masked_fill(mask == 0, -100)
        labels[1, :4] = -100  # a prompt without loss
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mixtral"])  # mixtral: fused experts, one block per expert
@pytest.mark.parametrize("k", [3, 8])
def test_grouped_gradients_equal_the_per_group_passes(arch, k):
    model = small_causal_lm(arch, seed=1, tie_embeddings=False).eval()
    u = build_unlearner("newton", model)
    batches = _batches(2)
    u.fit_curvature(batches)
    slow = [u.forget_gradient(g, kind="nll") for g in example_groups(batches, k)]
    params = u.named_params()
    fast = grouped_nll_gradients(model, u.curvature.layers, batches, k, lambda t: t,
                                 {n: p.dtype for n, p in params.items()})
    assert fast is not None and len(fast) == len(slow) == min(k, 5)  # groups beyond the largest batch are empty
    assert set(fast[0]) == set(params)
    for a, b in zip(fast, slow):
        for n in b:
            torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-6)
    forwards = []
    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        through_method = u.group_gradients(batches, k)
    finally:
        handle.remove()
    assert len(forwards) == len(batches)  # one pass per batch, not one per group and batch (8 and 11 here)
    for a, b in zip(through_method, fast):
        for n in b:
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)


def test_a_group_without_label_positions_is_named():
    model = small_causal_lm("gpt2", seed=1).eval()
    u = build_unlearner("newton", model)
    batches = _batches(3)
    u.fit_curvature(batches)
    batches[1]["labels"][:] = -100
    batches[0]["labels"][1::2] = -100  # examples 1 and 3 of the first batch and all of the second: group 1 of 2
    with pytest.raises(ValueError, match="protection group's examples have no position with labels"):
        u.group_gradients(batches, 2)


class _FlatRows(torch.nn.Module):
    """Token ids -> logits through a linear layer that sees [B * T, d] rows, not the batch's examples."""

    def __init__(self, vocab: int = 128, width: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.hidden = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        return self.out(torch.tanh(self.hidden(self.embed(ids).reshape(b * t, -1))).reshape(b, t, -1))


def test_layers_that_do_not_see_examples_fall_back_to_per_group_passes():
    torch.manual_seed(0)
    model = _FlatRows().eval()
    u = build_unlearner("newton", model)
    batches = _batches(4)
    u.fit_curvature(batches)
    params = u.named_params()
    assert grouped_nll_gradients(model, u.curvature.layers, batches, 3, lambda t: t,
                                 {n: p.dtype for n, p in params.items()}) is None
    slow = [u.forget_gradient(g, kind="nll") for g in example_groups(batches, 3)]
    for a, b in zip(u.group_gradients(batches, 3), slow):
        for n in b:
            torch.testing.assert_close(a[n], b[n])
