"""Counting what a request costs: forward and backward passes over a model, in calls and in examples.

`count_passes(model)` hooks the model's input embedding: every forward pass of the model goes through it once
(forward calls, examples = rows of its input) and every backward pass that reaches the first layer goes back through
it once (backward calls and examples). `fwd_bwd_seconds(model, batches)` times one forward+backward over batches: the
unit the benchmark divides request times by (`time_over_fwd_bwd`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def count_passes(model: nn.Module) -> Iterator[dict[str, int]]:
    """Counts, while open: `forward_calls`, `forward_examples`, `backward_calls`, `backward_examples`."""
    counts = {"forward_calls": 0, "forward_examples": 0, "backward_calls": 0, "backward_examples": 0}
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is None:
        embedding = next(m for m in model.modules() if isinstance(m, nn.Embedding))

    def forward(_: nn.Module, args: tuple, output: torch.Tensor) -> None:
        counts["forward_calls"] += 1
        counts["forward_examples"] += int(args[0].shape[0])

    def backward(_: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
        counts["backward_calls"] += 1
        counts["backward_examples"] += int(grad_output[0].shape[0])

    handles = [embedding.register_forward_hook(forward), embedding.register_full_backward_hook(backward)]
    # the embedding's output needs a gradient for its backward hook to fire, also when its weight is frozen; not
    # inside torch.func transforms (CG's jvp/vjp products), which refuse requires_grad_ and count no backward here
    handles.append(embedding.register_forward_hook(
        lambda m, a, out: out.requires_grad_(True) if torch.is_grad_enabled() and not out.requires_grad
        and not torch._C._are_functorch_transforms_active() else None))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def fwd_bwd_seconds(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], repeats: int = 2) -> float:
    """The best of `repeats` timings of one forward+backward (mean token NLL) over `batches`, on a copy of the model."""
    from lightning_unlearn.methods.losses import mean_nll

    work = copy.deepcopy(model).eval()
    batches = list(batches)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for b in batches:
            total, n = mean_nll(work, b)
            if n:
                (total / n).backward()
        best = min(best, time.perf_counter() - start)
        work.zero_grad(set_to_none=True)
    return best
