"""The benchmarks' pass counter (`benchmarks.request_cost.count_request_passes`) counts a plain forward and backward,
and stays out of the way of CG's torch.func products (which refuse `requires_grad_` inside a transform)."""

from __future__ import annotations

from benchmarks.request_cost import count_request_passes
from lightning_unlearn.curvature import build_curvature
from lightning_unlearn.methods.losses import mean_nll
from tests.dense_models import lm_batch, tiny_gpt2


def test_a_forward_and_backward_count_once_each_in_examples():
    model, batch = tiny_gpt2(), lm_batch(b=3)
    with count_request_passes(model) as counts:
        total, n = mean_nll(model, batch)
        (total / n).backward()
    assert counts.snapshot() == {"forward_calls": 1, "forward_examples": 3, "backward_calls": 1,
                                 "backward_examples": 3}


def test_cg_products_run_under_the_counter():
    model, batch = tiny_gpt2(), lm_batch(b=2)
    cg = build_curvature("cg", model, max_iter=3)
    with count_request_passes(model) as counts:
        cg.fit([batch])
        vector = {n: p.detach().clone() for n, p in model.named_parameters() if n in cg.param_names}
        direction = cg.apply(vector, 1e-2, -1.0)
    assert set(direction) == set(vector)
    assert counts["forward_examples"] >= 2  # the products' forwards go through the embedding too
