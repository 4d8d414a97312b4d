"""The unlearning engine's method protocol: a trial update, a Levenberg-Marquardt safety check, a decision log.

    unlearner = build_unlearner("newton", model, curvature_backend="kfac", scale=1.0, steps=3)
    records = unlearner.fit(forget_batches, retain_batches, held_retain_batch=held)

Every method proposes an update from the forget data; `step` applies it as a *trial*: the held retain loss and
the forget loss are measured, and the trial is rolled back (weights restored bit for bit from a copy) when
anything is non-finite or the held retain loss rose more than `max_retain_increase` (relative) above its value
when that held batch was first seen (by default: the start of the run, so the budget bounds the total damage of
the run, not each step). After a rollback the damping grows (×`damping_growth`) and the step is retried, at
most `max_retries` times; after a success it shrinks back towards its initial value. Every trial is one
`StepRecord` in `history` and is passed to `log`. Records hold numbers only, never text.

Losses are the mean token NLL over positions with labels != -100 (the span, for span-level forgetting); sums and
counts go through `reduce` (a cross-process sum, identity by default) so that every process takes the same
decision. Torch only: drivers (Lightning, Fabric) inject `reduce`/`gather`.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature.base import Curvature, Reduce, Vector, eval_mode, identity
from .losses import DEFAULT_FORGET_LOSS, check_forget_loss, forget_objective, mean_nll

Batch = Mapping[str, Tensor]

CURVATURE_BACKENDS = ("kfac", "cg", "woodfisher", "diagonal")
#: names a curvature object may carry (`Curvature.name`) -> the backend key
BACKEND_ALIASES = {"hessian_free": "cg", "hf": "cg", "wood_fisher": "woodfisher"}
CURVATURE_DATA = ("retain", "forget", "full_minus_forget")


@dataclass
class StepRecord:
    """One logged decision (one trial update); never contains text.

    `damping` is λ for curvature methods and the learning-rate divisor for first-order ones; `scale` is η
    (curvature methods) or the effective learning rate (first-order). `forget_loss`/`retain_loss` are the mean
    token NLL on the forget set and on the held retain batch *after* the trial. `reason` is one of "accepted",
    "target_reached" (accepted, forget target met), "retain_increase", "non_finite" (rolled back).
    `trial` counts retries within the step (0 = first try).
    """

    step: int
    damping: float
    scale: float
    forget_loss: float
    retain_loss: float | None
    accepted: bool
    reason: str
    trial: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)




def _as_list(batches: Iterable[Batch] | Batch | None) -> list[Batch]:
    if batches is None:
        return []
    if isinstance(batches, Mapping):
        return [batches]
    return list(batches)


class Unlearner(ABC):
    """Base of every method: trial update -> safety check -> accept or roll back, logged.

    Subclasses implement `param_names` (what they update), `_prepare` (work done once per step, e.g. the forget
    gradient) and `_propose` (the update for the current damping, from the prepared context), or override
    `_apply_trial` for updates made by a torch optimizer.
    """

    name: str = "unlearner"

    def __init__(
        self,
        model: nn.Module,
        *,
        forget_loss: str = DEFAULT_FORGET_LOSS,
        steps: int = 1,
        max_retain_increase: float | None = 0.05,
        damping_growth: float = 10.0,
        max_retries: int = 4,
        forget_target: float | None = None,
        log: Callable[[StepRecord], None] | None = None,
        reduce: Reduce | None = None,
        damping: float = 1.0,
        scale: float = 1.0,
    ) -> None:
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if damping_growth <= 1:
            raise ValueError(f"damping_growth must be > 1 (λ's factor after a rollback), got {damping_growth}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if max_retain_increase is not None and max_retain_increase < 0:
            raise ValueError(f"max_retain_increase must be >= 0 or None (no check), got {max_retain_increase}")
        self.model = model
        self.forget_loss = check_forget_loss(forget_loss)
        self.steps = int(steps)
        self.max_retain_increase = max_retain_increase
        self.damping_growth = float(damping_growth)
        self.max_retries = int(max_retries)
        self.forget_target = forget_target
        self.log = log
        self.reduce: Reduce = reduce if reduce is not None else identity
        self.initial_damping = float(damping)
        self.damping = float(damping)
        self.scale = float(scale)
        self.history: list[StepRecord] = []
        self.step_count = 0
        self._reference: tuple[Batch, float] | None = None

    # ------------------------------------------------------------------ what subclasses provide
    @property
    @abstractmethod
    def param_names(self) -> tuple[str, ...]:
        """Names (in `model.named_parameters()`) of the parameters this method updates."""

    @abstractmethod
    def _prepare(self, forget: Sequence[Batch], retain: Sequence[Batch]) -> Any:
        """Work done once per step, reused across retries (e.g. the forget gradient)."""

    def _propose(self, context: Any) -> Vector:
        """The additive update for the current `self.damping` / `self.scale`."""
        raise NotImplementedError

    def _begin_fit(self, forget: Sequence[Batch], retain: Sequence[Batch]) -> None:
        """Hook before the first step of `fit` (curvature fitting)."""
        return None

    def _before_step(self, index: int, forget: Sequence[Batch], retain: Sequence[Batch]) -> None:
        """Hook before step `index` of `fit` (curvature refresh)."""
        return None

    def _record_scale(self) -> float:
        return self.scale

    # ------------------------------------------------------------------ helpers
    def named_params(self) -> dict[str, nn.Parameter]:
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.param_names}

    def measure(self, batches: Batch | Sequence[Batch]) -> float:
        """Mean token NLL over valid positions of one batch or several (token-weighted, reduced across processes)."""
        batches = _as_list(batches)
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad(), eval_mode(self.model):
            for b in batches:
                s, c = mean_nll(self.model, b)
                total += torch.tensor([float(s), float(c)], dtype=torch.float64)
        total = self.reduce(total)
        if float(total[1]) <= 0:
            raise ValueError("no position with labels != -100 in the batches; nothing to measure the loss on")
        return float(total[0] / total[1])

    def forget_gradient(self, forget: Sequence[Batch]) -> Vector:
        """`-∇ U` over `param_names` (U the forget objective to minimise): the direction that forgets, averaged
        over the batches by their weights (positions or examples) and reduced across processes."""
        params = self.named_params()
        names, plist = list(params), list(params.values())
        grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        weight = 0.0
        with torch.enable_grad(), eval_mode(self.model):
            for b in forget:
                loss, w = forget_objective(self.model, b, self.forget_loss, plist)
                if w == 0:
                    continue
                gs = torch.autograd.grad(loss, plist, allow_unused=True)
                for n, g in zip(names, gs):
                    if g is not None:
                        grads[n] -= w * g.detach().float()
                weight += w
        total = float(self.reduce(torch.tensor(weight, dtype=torch.float64)))
        if total <= 0:
            raise ValueError("the forget batches have no position with labels != -100; nothing to forget")
        return {n: (self.reduce(g) / total).to(params[n].dtype) for n, g in grads.items()}

    def _snapshot(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.named_params().items()}

    def _restore(self, snapshot: Mapping[str, Tensor]) -> None:
        params = self.named_params()
        with torch.no_grad():
            for n, s in snapshot.items():
                params[n].copy_(s)

    def _apply_trial(self, context: Any) -> bool:
        """Apply the trial update in place; False (nothing applied) when the update is non-finite."""
        update = self._propose(context)
        if not all(bool(torch.isfinite(u).all()) for u in update.values()):
            return False
        params = self.named_params()
        with torch.no_grad():
            for n, u in update.items():
                params[n].add_(u.to(device=params[n].device, dtype=params[n].dtype))
        return True

    def _reject(self) -> None:
        """After a rollback: grow the damping."""
        self.damping *= self.damping_growth

    def _accept(self) -> None:
        """After a success: shrink the damping back towards its initial value."""
        self.damping = max(self.initial_damping, self.damping / self.damping_growth)

    def _rollback_state(self) -> Any:
        """Extra state to restore on rollback (optimizer moments); None by default."""
        return None

    def _restore_state(self, state: Any) -> None:
        """Restore what `_rollback_state` returned."""
        return None

    def _emit(self, record: StepRecord) -> StepRecord:
        self.history.append(record)
        if self.log is not None:
            self.log(record)
        return record

    def reference_retain_loss(self, held: Batch) -> float:
        """The held batch's retain loss when it was first seen (the budget's reference)."""
        if self._reference is None or self._reference[0] is not held:
            self._reference = (held, self.measure(held))
        return self._reference[1]

    # ------------------------------------------------------------------ public API
    def step(
        self,
        forget_batch: Batch | Sequence[Batch],
        retain_batch: Batch | Sequence[Batch] | None = None,
        held_retain_batch: Batch | None = None,
    ) -> StepRecord:
        """One update with the safety check (and up to `max_retries` retries); returns the last trial's record.

        `forget_batch` may be one batch or a list (the forget gradient is then over all of them). The held retain
        batch defaults to the first retain batch; without either, only the non-finite check guards the step.
        """
        forget = _as_list(forget_batch)
        retain = _as_list(retain_batch)
        if not forget:
            raise ValueError("step() needs at least one forget batch")
        held = held_retain_batch if held_retain_batch is not None else (retain[0] if retain else None)
        reference = self.reference_retain_loss(held) if held is not None else None
        context = self._prepare(forget, retain)
        index = self.step_count
        self.step_count += 1
        record: StepRecord | None = None
        for trial in range(self.max_retries + 1):
            snapshot, extra = self._snapshot(), self._rollback_state()
            applied = self._apply_trial(context)
            forget_loss = self.measure(forget) if applied else float("nan")
            retain_loss = self.measure(held) if (applied and held is not None) else None
            finite = applied and math.isfinite(forget_loss) and (retain_loss is None or math.isfinite(retain_loss))
            if finite:
                finite = all(bool(torch.isfinite(p).all()) for p in self.named_params().values())
            if not finite:
                reason = "non_finite"
            elif (reference is not None and retain_loss is not None and self.max_retain_increase is not None
                  and retain_loss > reference * (1.0 + self.max_retain_increase)):
                reason = "retain_increase"
            elif self.forget_target is not None and forget_loss >= self.forget_target:
                reason = "target_reached"
            else:
                reason = "accepted"
            accepted = reason in ("accepted", "target_reached")
            record = self._emit(StepRecord(step=index, damping=self.damping, scale=self._record_scale(),
                                           forget_loss=forget_loss, retain_loss=retain_loss, accepted=accepted,
                                           reason=reason, trial=trial))
            if accepted:
                self._accept()
                return record
            if applied:
                self._restore(snapshot)
            self._restore_state(extra)
            self._reject()
        assert record is not None
        return record

    def fit(
        self,
        forget_batches: Iterable[Batch],
        retain_batches: Iterable[Batch] | None = None,
        held_retain_batch: Batch | None = None,
    ) -> list[StepRecord]:
        """The whole run: up to `steps` steps over all forget batches; stops early when the forget target is reached
        or a step is rolled back after all retries. Returns every record of this run (rolled-back trials too)."""
        forget = _as_list(forget_batches)
        retain = _as_list(retain_batches)
        if not forget:
            raise ValueError("fit() needs at least one forget batch")
        start = len(self.history)
        self._begin_fit(forget, retain)
        held = held_retain_batch if held_retain_batch is not None else (retain[0] if retain else None)
        for i in range(self.steps):
            self._before_step(i, forget, retain)
            step_retain = [retain[i % len(retain)]] if retain else []
            record = self.step(forget, step_retain, held)
            if not record.accepted or record.reason == "target_reached":
                break
        return self.history[start:]


def clone_curvature(curvature: Curvature) -> Curvature:
    """A deep copy of a curvature's statistics that shares the model and the reduce/gather functions."""
    memo: dict[int, Any] = {id(curvature.model): curvature.model}
    for attr in ("reduce", "gather", "objective"):
        value = getattr(curvature, attr, None)
        if value is not None:
            memo[id(value)] = value
    return copy.deepcopy(curvature, memo)


class SecondOrderUnlearner(Unlearner):
    """Methods with curvature: the damped Newton direction `η (C + λI)^-1 (-∇U)` (U the forget objective to
    minimise; for `nll` this is `η (C + λI)^-1 ∇L_forget`), on the parameters the curvature covers.

    `curvature`: a finalized curvature is used as is; an unfinalized one (or None: built from `curvature_backend`
    and `curvature_kwargs`) is fitted by `fit()` on the `curvature_data` source: "retain" (retain batches),
    "forget" (forget batches) or "full_minus_forget" (`full_curvature`, a finalized checkpoint over the whole
    training data, minus a curvature of the forget batches; the checkpoint itself is not modified).
    `refresh_every=k` re-estimates the curvature before every k-th step of an iterative run.
    """

    name = "second_order"

    def __init__(
        self,
        model: nn.Module,
        curvature: Curvature | None = None,
        *,
        curvature_backend: str = "kfac",
        curvature_data: str = "retain",
        full_curvature: Curvature | None = None,
        damping: float = 1e-3,
        scale: float = 1.0,
        refresh_every: int | None = None,
        curvature_kwargs: Mapping[str, Any] | None = None,
        reduce: Reduce | None = None,
        gather: Reduce | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(model, damping=damping, scale=scale, reduce=reduce, **kw)
        curvature_backend = BACKEND_ALIASES.get(curvature_backend, curvature_backend)
        if curvature_backend not in CURVATURE_BACKENDS:
            raise ValueError(f"unknown curvature backend {curvature_backend!r}; choose one of "
                             f"{', '.join(CURVATURE_BACKENDS)}")
        if curvature_data not in CURVATURE_DATA:
            raise ValueError(f"unknown curvature_data {curvature_data!r}; choose one of {', '.join(CURVATURE_DATA)}")
        if curvature_data == "full_minus_forget":
            if full_curvature is None or not full_curvature.finalized:
                raise ValueError("curvature_data='full_minus_forget' needs full_curvature=<a finalized curvature over"
                                 " the whole training data> (e.g. a curvature checkpoint loaded with load_state_dict)")
        if refresh_every is not None and int(refresh_every) < 1:
            raise ValueError(f"refresh_every must be >= 1 or None, got {refresh_every}")
        self.curvature = curvature
        self.curvature_backend = curvature.name if curvature is not None else curvature_backend
        if full_curvature is not None and curvature is None:
            self.curvature_backend = full_curvature.name
        self.curvature_data = curvature_data
        self.full_curvature = full_curvature
        self.refresh_every = None if refresh_every is None else int(refresh_every)
        self.curvature_kwargs = dict(curvature_kwargs or {})
        self.gather = gather

    @property
    def param_names(self) -> tuple[str, ...]:
        if self.curvature is None:
            raise RuntimeError(f"{self.name}: no curvature yet; pass curvature=<finalized curvature>, call "
                               "fit_curvature(batches) or use fit(forget_batches, retain_batches)")
        return tuple(self.curvature.param_names)

    def _new_curvature(self) -> Curvature:
        kwargs = dict(self.curvature_kwargs)
        kwargs.setdefault("reduce", self.reduce)
        if self.gather is not None:
            kwargs.setdefault("gather", self.gather)
        return build_curvature(self.curvature_backend, self.model, **kwargs)

    def fit_curvature(self, batches: Iterable[Batch]) -> Curvature:
        """Accumulate and finalize the curvature on `batches` (the chosen source's data: retain batches, or forget
        batches for "forget" and "full_minus_forget"), at the current weights. Returns the finalized curvature."""
        batches = _as_list(batches)
        if not batches:
            raise ValueError(f"fit_curvature() got no batch; curvature_data={self.curvature_data!r} needs "
                             f"{'retain' if self.curvature_data == 'retain' else 'forget'} batches")
        if self.curvature_data == "full_minus_forget":
            assert self.full_curvature is not None
            forget_curvature = self._new_curvature()
            with eval_mode(self.model):
                for b in batches:
                    forget_curvature.accumulate(b)
                forget_curvature.finalize()
            curvature = clone_curvature(self.full_curvature).subtract(forget_curvature)
        else:
            curvature = self.curvature if self.curvature is not None else self._new_curvature()
            if curvature.finalized:
                curvature.reset()
            with eval_mode(self.model):
                for b in batches:
                    curvature.accumulate(b)
                curvature.finalize()
        self.curvature = curvature
        return curvature

    def _source(self, forget: Sequence[Batch], retain: Sequence[Batch]) -> list[Batch]:
        if self.curvature_data == "retain":
            if not retain:
                raise ValueError("curvature_data='retain' needs retain batches; pass retain_batches, a finalized "
                                 "curvature=, or use curvature_data='full_minus_forget' with a curvature checkpoint")
            return list(retain)
        return list(forget)

    def _begin_fit(self, forget: Sequence[Batch], retain: Sequence[Batch]) -> None:
        if self.curvature is None or not self.curvature.finalized:
            self.fit_curvature(self._source(forget, retain))

    def _before_step(self, index: int, forget: Sequence[Batch], retain: Sequence[Batch]) -> None:
        if self.refresh_every is not None and index > 0 and index % self.refresh_every == 0:
            self.fit_curvature(self._source(forget, retain))

    def named_params(self) -> dict[str, nn.Parameter]:
        # the curvature may have unwrapped the model (e.g. a PEFT wrapper): use its parameter names
        assert self.curvature is not None or not self.param_names
        params = dict(self.curvature.model.named_parameters())  # type: ignore[union-attr]
        return {n: params[n] for n in self.param_names}

    def newton_direction(self, gradient: Mapping[str, Tensor], damping: float | None = None) -> Vector:
        """`(C + λI)^-1 g` for a gradient dict over `param_names`."""
        assert self.curvature is not None
        lam = self.damping if damping is None else damping
        return self.curvature.apply({n: gradient[n] for n in self.param_names}, lam, -1.0)

    def _prepare(self, forget: Sequence[Batch], retain: Sequence[Batch]) -> Any:
        if self.curvature is None or not self.curvature.finalized:
            raise RuntimeError(f"{self.name}: the curvature is not fitted; call fit_curvature(batches) first or "
                               "use fit(), which fits it on the curvature_data source")
        return self.forget_gradient(forget)

    def _propose(self, context: Any) -> Vector:
        direction = self.newton_direction(context)
        return {n: self.scale * d for n, d in direction.items()}


METHODS: dict[str, type[Unlearner]] = {}


def register(name: str) -> Callable[[type[Unlearner]], type[Unlearner]]:
    """Class decorator adding a method to `METHODS` under `name`."""

    def wrap(cls: type[Unlearner]) -> type[Unlearner]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def build_unlearner(method: str, model: nn.Module, **kwargs: Any) -> Unlearner:
    """Construct the method named `method` (a key of `METHODS`) for `model`."""
    from . import first_order, fisher, newton  # noqa: F401  (registration)

    if method not in METHODS:
        raise ValueError(f"unknown unlearning method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[method](model, **kwargs)


def build_curvature(backend: str, model: nn.Module, **kwargs: Any) -> Curvature:
    """Construct an (unfitted) curvature backend: "kfac" | "cg" | "woodfisher" | "diagonal". kwargs (e.g. `reduce`,
    `gather`, `objective`, `fisher_type`) go to the backend's constructor."""
    backend = BACKEND_ALIASES.get(backend, backend)
    if backend not in CURVATURE_BACKENDS:
        raise ValueError(f"unknown curvature backend {backend!r}; choose one of {', '.join(CURVATURE_BACKENDS)}")
    try:
        if backend == "diagonal":
            from ..curvature.diagonal import DiagonalFisher as cls
        elif backend == "kfac":
            from ..curvature.kfac import KFAC as cls
        elif backend == "cg":
            from ..curvature.hessian_free import HessianFree as cls
        else:
            from ..curvature.woodfisher import WoodFisher as cls
    except ImportError as err:  # a backend not installed in this checkout
        raise ImportError(f"curvature backend {backend!r} is not available ({err}); use one of the installed "
                          "backends, e.g. 'diagonal'") from err
    return cls(model, **kwargs)
