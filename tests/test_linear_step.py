"""`LinearStep`: the step search's trials θ₀ + η d checked by arithmetic instead of passes over the weights.

- its length bounds the distance of the weights as stored (rounded to their dtype) from above, and tightly;
- the search's start, computed on the trust region's bound, is brought inside by a few units of rounding, so the
  weights it stores are inside;
- `surely_finite` never vouches for weights that overflow or hold a nan, and does vouch for ordinary steps;
- tensors with no nonzero entry (a fresh LoRA adapter's B) are left out of the norm trust region: they have no size
  for a step to be relative to.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_unlearn.methods.trust_region import (
    LinearStep,
    RunPath,
    exceeds_step_norm,
    largest_trusted_step,
    outside_step_norm,
    step_length,
    zero_tensors,
)


def _stored(start: dict[str, torch.Tensor], direction: dict[str, torch.Tensor], eta: float) -> dict[str, torch.Tensor]:
    """The weights as the search stores them (`SecondOrderUnlearner._apply_step`)."""
    return {n: (s.float() + eta * direction[n].float()).to(s.dtype) for n, s in start.items()}


def _pair(dtype: torch.dtype, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    start = {"w": torch.randn(64, 32, generator=g).to(dtype), "b": torch.randn(32, generator=g).to(dtype)}
    direction = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}
    return start, direction


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eta", [1e-6, 1e-3, 0.3, 5.0])
def test_the_length_bounds_the_stored_step_from_above_and_tightly(dtype, eta):
    start, direction = _pair(dtype)
    line = LinearStep(start, direction)
    stored = _stored(start, direction, eta)
    actual = step_length((stored[n], start[n]) for n in start)
    ideal = eta * math.sqrt(sum(float(d.double().pow(2).sum()) for d in direction.values()))
    assert line.length(eta) >= actual
    # the margin is the dtype's rounding of the weights, nothing more
    u = torch.finfo(dtype).eps / 2
    assert line.length(eta) - ideal <= 1.01 * u * (line.reference + ideal)
    assert line.reference == pytest.approx(math.sqrt(sum(float(s.double().pow(2).sum()) for s in start.values())))


def test_the_search_start_on_the_run_bound_is_brought_inside_as_stored():
    start, direction = _pair(torch.float32)
    line = LinearStep(start, direction)
    path = RunPath(line.reference, 1.0)
    eta = path.remaining() / line.direction_norm  # the largest trusted step: on the bound itself
    assert path.exceeded_by(line.length(eta))
    inside = line.inside(eta, lambda length, size: path.exceeded_by(length) or exceeds_step_norm(length, size, 1.0))
    assert 1 - 1e-6 < inside / eta < 1 and not path.exceeded_by(line.length(inside))
    stored = _stored(start, direction, inside)
    assert step_length((stored[n], start[n]) for n in start) <= path.remaining()
    assert line.inside(0.999 * eta, lambda length, size: path.exceeded_by(length)) == 0.999 * eta
    # a bound already spent: no η is inside, and η is returned as it was (the trial is then refused)
    assert line.inside(eta, lambda length, size: True) < eta * (1 + 1e-12)


def test_surely_finite_never_vouches_for_an_overflow_or_a_nan():
    start, direction = _pair(torch.float16)
    line = LinearStep(start, direction)
    assert line.surely_finite(1.0)
    huge = 1e5  # |d| ~ 3 and float16 tops out at 65504: the stored weights overflow
    assert not all(bool(torch.isfinite(t).all()) for t in _stored(start, direction, huge).values())
    assert not line.surely_finite(huge) and not line.surely_finite(-huge)
    start["b"][3] = float("nan")
    assert not LinearStep(start, direction).surely_finite(1e-9)
    start, direction = _pair(torch.float32)
    direction["w"][0, 0] = float("inf")
    assert not LinearStep(start, direction).surely_finite(1e-9)


def _norm(*tensors: torch.Tensor) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def test_tensors_that_start_at_zero_are_left_out_of_the_norm_trust_region():
    start, direction = _pair(torch.float32)
    start["lora_b"], direction["lora_b"] = torch.zeros(16, 8), 100 * torch.ones(16, 8)
    assert zero_tensors(start) == {"lora_b"}
    line = LinearStep(start, direction)
    assert line.reference == pytest.approx(_norm(start["w"], start["b"]))
    assert line.direction_norm == pytest.approx(_norm(direction["w"], direction["b"]))
    # a step in the zero tensor alone has no length for the bound, however long
    only = {n: (d if n == "lora_b" else torch.zeros_like(d)) for n, d in direction.items()}
    alone = LinearStep(start, only)
    assert not exceeds_step_norm(alone.length(1e6), alone.reference, 1.0)
    moved = _stored(start, only, 1e6)
    assert not outside_step_norm(((moved[n], start[n]) for n in start), 1.0)
    assert outside_step_norm(((_stored(start, direction, 1e6)[n], start[n]) for n in start), 1.0)  # the rest is bound
    assert largest_trusted_step(start, only, 1.0, None, None) == math.inf
    assert largest_trusted_step(start, direction, 1.0, None, None) == pytest.approx(
        _norm(start["w"], start["b"]) / _norm(direction["w"], direction["b"]))
    # names the run already leaves out (`free`) are left out although they have moved off zero since
    assert LinearStep(start, direction, free={"w"}).reference == pytest.approx(_norm(start["b"]))
    # nothing with a size: no bound at all, not a bound of zero that refuses every step
    path = RunPath(0.0, 1.0)
    assert path.limit is None and not path.spent() and not path.exceeded_by(1e9) and path.remaining() == math.inf
    zero = LinearStep({"lora_b": torch.zeros(4, 4)}, {"lora_b": torch.ones(4, 4)})
    assert zero.reference == 0.0 and zero.length(1e9) == 0.0 and not exceeds_step_norm(zero.length(1e9), 0.0, 1.0)
