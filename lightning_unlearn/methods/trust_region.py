"""The trust region of a step (`docs/recipe.md`: the step length): no accepted step moves the updated parameters by
more than `max_step_norm` times their norm, nor (second-order methods) predicts a retain increase ½ΔᵀCΔ above
`predicted_trust` times the retain budget. A guard that holds even when the held retain batch does not notice a huge
step (an untrained or tiny model). Shared by the methods and `lightning_unlearn.optim.NewtonUnlearner`.

Within a run a bound also holds for the steps together (`RunPath`): the lengths of the accepted steps add up to at
most max(1, `max_step_norm`) times the norm of the weights the run started from (a step bound below 1 caps each
step, not the run). Steps in directions the outputs do not
see (a damping far below the curvature's scale) otherwise each pass the per-step bound while the weights grow
without limit (30x in 7 steps, measured on a tiny GPT-2 at relative damping 1e-12).

Both bounds are relative to the weights' size, so they leave out the tensors that have none: those with no nonzero
entry where the run (or, outside a run, the step) starts (`zero_tensors`: a fresh LoRA adapter's B, a zero-initialised
bias). Counted in, they left no room at all: on fresh adapters with A frozen ‖θ‖ = 0 refused every step, and with A
trained the run's bound (‖A‖, unrelated to how far B must go) was spent by the first step (`docs/recipe.md` §7). The
curvature's trust region, the step search and the retain budget still bound their steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping

import torch
from torch import Tensor

from ..curvature.base import whole
from .target import retain_budget_nats

#: the trust region: no accepted step moves the updated parameters by more than this fraction of their norm
DEFAULT_MAX_STEP_NORM = 1.0
#: ... nor predicts (½ΔᵀCΔ, retain curvature) a retain increase above this multiple of the retain budget
DEFAULT_PREDICTED_TRUST = 2.0


def _square(tensor: Tensor) -> float:
    """‖t‖² (float64), over every process's shard of a sharded tensor (`whole`)."""
    return float(whole(tensor.detach().double().pow(2).sum()))


def parameter_norm(params: Iterable[Tensor]) -> float:
    """‖θ‖ over the parameters (float64 accumulation; a sharded parameter's whole norm)."""
    return math.sqrt(sum(_square(p) for p in params))


def sized_squares(params: Mapping[str, Tensor], free: Collection[str] = frozenset()) -> dict[str, float]:
    """‖t‖² of each tensor the norm trust region bounds: those not in `free` that have a nonzero entry (module
    docstring); one pass over each tensor gives both which they are and the trust region's size."""
    squares = {n: _square(p) for n, p in params.items() if n not in free}
    return {n: square for n, square in squares.items() if square != 0.0}


def zero_tensors(params: Mapping[str, Tensor]) -> frozenset[str]:
    """The names of the tensors with no nonzero entry, which the norm trust region leaves out (module docstring)."""
    return frozenset(params) - sized_squares(params).keys()


def step_length(pairs: Iterable[tuple[Tensor, Tensor]]) -> float:
    """‖θ - θ₀‖ over (current, snapshot) parameter pairs."""
    return math.sqrt(sum(_square(p.detach().double() - s.double()) for p, s in pairs))


class RunPath:
    """The run-level trust region: the accepted steps' lengths add up to at most max(1, `max_step_norm`) ×
    ‖θ_start‖, a bound on ‖θ - θ_start‖ (triangle inequality) kept in two numbers, not a copy of the weights
    (None: no bound)."""

    def __init__(self, start_norm: float, max_step_norm: float | None) -> None:
        self.start = start_norm
        # no bound where nothing has a size to be relative to (every tensor left out: `zero_tensors`)
        self.limit = None if max_step_norm is None or start_norm <= 0 else max(1.0, max_step_norm) * start_norm
        self.travelled = 0.0

    def exceeded_by(self, length: float) -> bool:
        """Whether a step of this length would take the run past its bound."""
        return self.limit is not None and self.travelled + length > self.limit

    def remaining(self) -> float:
        """How much length is left to the run (inf without a bound)."""
        return math.inf if self.limit is None else max(0.0, self.limit - self.travelled)

    def spent(self) -> bool:
        """Whether the steps have used the bound (all but 1/1000 of it): no step is worth searching for."""
        return self.limit is not None and self.remaining() <= 1e-3 * self.limit

    def spent_message(self, who: str) -> str:
        """What a run stopped by this bound tells its user (`RunTrustRegionWarning`)."""
        times = self.limit / self.start if self.limit is not None and self.start else float("nan")
        return (f"{who}: the run's steps together moved the weights by {times:.3g} times their norm, as far as its "
                "trust region allows (max(1, max_step_norm)); it stops here without reaching its target. Steps that "
                "long usually go where the outputs barely change: raise the damping (relative damping far below "
                "1e-3 does this), lower the scale, or give holdout data so that the run has a target to stop at.")

    def add(self, length: float) -> None:
        """An accepted step of this length."""
        self.travelled += length


def exceeds_step_norm(length: float, start_norm: float, max_step_norm: float | None) -> bool:
    """Whether a step of this length from weights of norm `start_norm` is longer than `max_step_norm` × that norm
    (from weights of norm 0, any step that moves them; None: no bound)."""
    return max_step_norm is not None and length > max_step_norm * start_norm


def outside_step_norm(pairs: Iterable[tuple[Tensor, Tensor]], max_step_norm: float | None) -> bool:
    """Whether the parameters moved further from their snapshot than `max_step_norm` × its norm (None: no bound),
    over (current, snapshot) pairs whose snapshot has a nonzero entry (`zero_tensors`)."""
    if max_step_norm is None:
        return False
    sized = [(p, s, square) for p, s in pairs if (square := _square(s)) != 0.0]
    return exceeds_step_norm(step_length((p, s) for p, s, _ in sized),
                             math.sqrt(sum(square for _, _, square in sized)), max_step_norm)


def _peak(tensors: Iterable[Tensor]) -> float:
    """The largest |entry| over `tensors` (nan where one holds a nan or inf, 0 for none; a sharded tensor's over every
    process's shard: a nan is read as inf first, which an all-reduce of the maximum keeps where it may drop a nan)."""
    peaks = (whole(t.detach().abs().nan_to_num(nan=math.inf, posinf=math.inf).max()) for t in tensors if t.numel())
    peak = max((float(p) for p in peaks), default=0.0)
    return peak if math.isfinite(peak) else math.nan


class LinearStep:
    """The trial weights θ₀ + η d of one step search along a direction `d` (no offset), known by arithmetic: their
    distance from θ₀ is |η|‖d‖, and they are finite wherever |η|·max|d| + max|θ₀| stays under half the largest value
    of the weights' dtype (and of float32, in which the step is added). The search checks each trial against the trust
    region and for overflow with these numbers instead of two passes over the weights per trial (measured:
    `benchmarks/README.md`, the default request's cost)."""

    def __init__(self, start: Mapping[str, Tensor], direction: Mapping[str, Tensor],
                 free: Collection[str] = frozenset()) -> None:
        moved = [direction[n] for n in start]
        # the trust region's norms, over the tensors it bounds: those not in `free` and with a nonzero entry
        squares = sized_squares(start, free)
        #: ‖θ₀‖ and ‖d‖ over the bounded tensors: the trust region's size and its unit of length
        self.reference = math.sqrt(sum(squares.values()))
        self.direction_norm = parameter_norm(direction[n] for n in squares)
        self._start_peak = _peak(start.values())
        self._direction_peak = _peak(moved)
        dtypes = [torch.float32] + [s.dtype for s in start.values() if s.is_floating_point()]
        self._largest = min(torch.finfo(t).max for t in dtypes)
        self.unit_roundoff = max(torch.finfo(t).eps for t in dtypes) / 2

    def length(self, eta: float) -> float:
        """An upper bound on ‖θ − θ₀‖ for the weights θ = θ₀ + η d as stored, over the tensors the trust region
        bounds: |η|‖d‖ plus their rounding to the weights' dtype (at most u‖θ₀ + η d‖ ≤ u (‖θ₀‖ + |η|‖d‖), u its unit
        roundoff): a trial it keeps inside the trust region is inside as stored."""
        step = abs(eta) * self.direction_norm
        return step + self.unit_roundoff * (self.reference + step)

    def inside(self, eta: float, leaves: Callable[[float, float], bool]) -> float:
        """η brought in by a few units of rounding where it lies on the trust region's bound (`leaves(length,
        reference)`), as the search's start (`largest_trusted_step`) does, so that it is inside as stored; η
        unchanged where that is not enough (a bound already spent: every step is refused anyway)."""
        for _ in range(8):
            if not (0 < eta < math.inf and leaves(self.length(eta), self.reference)):
                return eta
            eta *= 1 - 4 * self.unit_roundoff
        return eta

    def surely_finite(self, eta: float) -> bool:
        """Whether every entry of θ₀ + η d is finite for certain (False also where θ₀ or d holds a nan or inf: the
        caller then checks the weights themselves)."""
        bound = self._start_peak + abs(eta) * self._direction_peak
        return math.isfinite(bound) and bound <= 0.5 * self._largest


def largest_trusted_step(params: Mapping[str, Tensor], direction: Mapping[str, Tensor], max_step_norm: float | None,
                         predicted_budget: float | None, curvature_norm: float | None,
                         remaining: float = math.inf, free: Collection[str] = frozenset()) -> float:
    """The largest η inside both trust regions, where they bound it: ½η²dᵀCd ≤ `predicted_budget` (`curvature_norm`
    is dᵀCd), η‖d‖ ≤ `max_step_norm` · ‖θ‖ and η‖d‖ ≤ `remaining` (the run's, `RunPath.remaining`; ignored at 0, where
    every step is refused anyway) (inf where none bounds it), the norms over the tensors not in `free` that have a
    nonzero entry. `trusted_step_length` where ‖θ‖ and ‖d‖ are known."""
    if max_step_norm is None:
        return trusted_step_length(0.0, 0.0, None, predicted_budget, curvature_norm, remaining)
    squares = sized_squares(params, free)
    return trusted_step_length(math.sqrt(sum(squares.values())), parameter_norm(direction[n] for n in squares),
                               max_step_norm, predicted_budget, curvature_norm, remaining)


def trusted_step_length(size: float, length: float, max_step_norm: float | None, predicted_budget: float | None,
                        curvature_norm: float | None, remaining: float = math.inf) -> float:
    """`largest_trusted_step` from the norms ‖θ‖ (`size`) and ‖d‖ (`length`)."""
    largest = math.inf
    if predicted_budget is not None and curvature_norm is not None and curvature_norm > 0:
        largest = math.sqrt(2.0 * predicted_budget / curvature_norm)
    if max_step_norm is not None:
        if length > 0 and size > 0:
            largest = min(largest, max_step_norm * size / length)
        if length > 0 and 0 < remaining < math.inf:
            largest = min(largest, remaining / length)
    return largest


def predicted_budget(max_retain_increase: float | None, held: bool, reference: float | None,
                     predicted_trust: float | None, *, retain_curvature: bool) -> float | None:
    """The bound on the curvature's predicted retain increase ½ΔᵀCΔ (nats) of one step: the guard itself without a
    held retain batch (`held` False: the retain budget in nats, `retain_budget_nats`), a trust region
    (`predicted_trust` × the budget above the `reference` loss) with one, when C is a retain curvature; None where
    neither applies."""
    if max_retain_increase is None:
        return None
    if not held:
        return retain_budget_nats(max_retain_increase)
    if predicted_trust is not None and reference is not None and retain_curvature:
        return predicted_trust * retain_budget_nats(max_retain_increase, reference)
    return None
