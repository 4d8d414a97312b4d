"""`LinearStep`: the step search's trials θ₀ + η d checked by arithmetic instead of passes over the weights.

- its length bounds the distance of the weights as stored (rounded to their dtype) from above, and tightly;
- the search's start, computed on the trust region's bound, is brought inside by a few units of rounding, so the
  weights it stores are inside;
- `surely_finite` never vouches for weights that overflow or hold a nan, and does vouch for ordinary steps.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_unlearn.methods.trust_region import LinearStep, RunPath, exceeds_step_norm, step_length


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
    assert line.length(eta) - ideal <= 1.01 * u * (line.start_norm + ideal)
    assert line.start_norm == pytest.approx(math.sqrt(sum(float(s.double().pow(2).sum()) for s in start.values())))


def test_the_search_start_on_the_run_bound_is_brought_inside_as_stored():
    start, direction = _pair(torch.float32)
    line = LinearStep(start, direction)
    path = RunPath(line.start_norm, 1.0)
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
