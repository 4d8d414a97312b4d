"""`newton` and the second-order protocol: the damped Newton direction `(C + λI)^-1 (-∇U)` with any curvature
backend, the holdout protection, the staged aim and the step-length search (`docs/recipe.md`: the default recipe,
the curvature, holdout protection, staging, the step length).

One-shot (`steps=1`) or iterative (the forget gradient every step, the curvature every `refresh_every` steps).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature.base import Curvature, Reduce, Vector, check_damping_mode, clone_curvature, eval_mode, is_shard
from ..curvature.carried import quadratic_of, restricted
from ..curvature.layers import UncoveredParametersWarning, zero_labels
from ..curvature.registry import BACKEND_ALIASES, CURVATURE_BACKENDS, build_curvature
from .forget_focus import unforgotten_weights
from .group_gradients import grouped_nll_gradients
from .inputs import all_finite, check_curvature_model, check_settings
from .knowledge import KnowledgeRegime
from .protection import constrained_direction, example_groups
from .records import Batch, StepRecord, as_batches
from .repair import RetainRepair
from .stages import FINAL_BUDGET_SHARE, StagedSteps
from .step_search import StepSearch
from .step_trials import StepTrials
from .target import holdout_histogram
from .trust_region import DEFAULT_PREDICTED_TRUST, predicted_budget
from .unlearner import Unlearner

#: where a second-order method's curvature comes from (`SecondOrderUnlearner`)
CURVATURE_DATA = ("retain", "forget", "full_minus_forget")

#: the default recipe of the second-order methods (see `SecondOrderUnlearner`)
DEFAULT_RELATIVE_DAMPING = 0.1
DEFAULT_NEWTON_STEPS = 5


class SecondOrderUnlearner(StagedSteps, KnowledgeRegime, RetainRepair, Unlearner):
    """Methods with curvature: the damped Newton direction `d = (C + λI)^-1 (-∇U)` (U the forget objective to
    minimise; for `nll` this is `(C + λI)^-1 ∇L_forget`), on the parameters the curvature covers, and a step
    `η d` whose length η is searched.

    The default recipe (no knob set):
    - **scale-free damping**: `damping` is ρ = 0.1 relative to each layer's own curvature scale
      (`damping_mode="relative"`: λ_l = ρ · mean eigenvalue of layer l, see `Curvature.damping_scales`); with
      `damping_mode="absolute"` it is λ itself.
    - **a step search to the target**: the direction is computed once per step; η is found along it by
      bracketing (×4 / ÷4 from `scale`) and bisection in log space (`search_iters`), each point a forward pass over
      the forget set and the holdout. It takes the *smallest* η whose forget loss reaches the target
      (see `Unlearner.calibrate`) within the retain budget, or else the largest η within the budget. λ grows
      (×`damping_growth`) only when the direction is non-finite or no η makes progress.
      `lazy_budget` (default on): the held retain batch is measured at the η the search would take, not at every point
      (at every point when that η is out of the budget). `guided_search` (default on): the bisection measures next to
      where the per-example forget and holdout losses, interpolated linearly in η, cross the aim, and stops at the
      bracket six bisections would leave. `focus_unforgotten` (off) weights each forget example's objective by
      1 − its percentile among the holdout's losses at the step's start (`methods.forget_focus`; measured in
      `docs/recipe.md` §9: not a default). `reuse_protection` keeps the first step's holdout gradients for the whole
      run (the retain groups' are the step's own; off: on the line corpus it stopped a run short of the target).
      Measured: `docs/recipe.md` §3. `stall_ratio=r`
      (off) ends a waypoint step's search where a ×4 longer step adds less than r times the score gained so far
      (`StepSearch`'s `stall`; measured on perturbed starts, `docs/recipe.md` §4). `final_budget_share` = 0.5
      (without a staged budget; None: off) lets the step that aims at the target spend half of what is left of the
      retain budget while a repeat remains, the rest going to a fresh direction (`stages.StagedSteps`).
    - **holdout protection** (`protect_holdout`, with holdout data): the direction is constrained to leave the
      holdout's losses in place to first order (`_direction`), so the step moves the forget set, not the whole kind
      of data. `protect_retain=k` adds k such constraints on groups of the step's retain examples (`fit` hands
      each step the next retain batch, so the staged steps go through the retain data): on memorised retain data
      the loss is flat to second order (p ≈ one-hot: the Fisher sees nothing), but its gradient still points where
      the answer's margin shrinks, and each step recomputes it as the damage grows.
    - **staged iteration**: `steps` steps (default 5), each with a new forget gradient (the curvature re-estimated every
      `refresh_every` steps, never by default); step k of K aims at the stage `s₀ + k/K (target − s₀)` of the forget
      score (s₀ its value when the run began), so the direction follows the forget set as it moves instead of one long
      step along the first gradient. Such a stage is a waypoint: with a staged budget its search ends at the first step
      length that reaches it by at most `WAYPOINT_BAND` of a stage (the last step's aim, the target, gets the full
      search). A step that reaches the full target ends the run; `staged=False` aims every step at the full target.
      When the last step falls short of the target (its direction's score peaks below it: the holdout's losses rise
      past first order) with the budget unspent, `fit` takes up to `final_repeats` more steps at the full
      target, each with a fresh direction (2 unless `steps` is set). Without a staged budget, a step aiming at the
      target while a repeat remains may spend `final_budget_share` = 0.5 of what is left of the retain budget; where
      it spends that short of the target, a repeat takes a fresh direction. Measured: `docs/recipe.md` §4.
    - **retain-free guard**: without a held retain batch (e.g. `full_minus_forget` with no retain data), the retain
      budget is measured on the holdout and the step's predicted retain increase ½ΔᵀCΔ is bounded too; without
      holdout data either, `fit` refuses the request (`require_measured_guard`): a prediction alone is no bound.
    - **the knowledge regime** (`knowledge=None`: chosen in `begin` from the held retain loss, `methods.knowledge`): on
      memorised retain data the NLL objective, `protect_retain=8`, a 30 % budget, 10 steps and a staged budget
      (`staged_budget`: step k of K may have spent k/K of it), each unless set; `knowledge=False`: never.
    - **the retain repair** (`retain_repair=None`: in the knowledge regime): `finish` ends the run with one Newton step
      down the retain loss that leaves groups of forget examples in place to first order (`methods.repair`).
    `step_search=False` gives the fixed step `scale · d` with Levenberg-Marquardt backtracking on λ.

    `curvature`: a finalized curvature is used as is; an unfinalized one (or None: built from `curvature_backend` and
    `curvature_kwargs`) is fitted by `fit()` on the `curvature_data` source: "retain" (retain batches), "forget"
    (forget batches) or "full_minus_forget" (`full_curvature`, a finalized checkpoint over the whole training data,
    minus a curvature of the forget batches; the checkpoint itself is not modified).
    """

    name = "second_order"
    secret_steps = DEFAULT_NEWTON_STEPS

    def __init__(
        self,
        model: nn.Module,
        curvature: Curvature | None = None,
        *,
        curvature_backend: str = "kfac",
        curvature_data: str = "retain",
        full_curvature: Curvature | None = None,
        damping: float | None = None,
        damping_mode: str = "relative",
        scale: float = 1.0,
        steps: int | None = None,
        step_search: bool = True,
        staged: bool = True,
        protect_holdout: bool = True,
        protect_groups: int = 8,
        protect_retain: int | None = None,
        knowledge: bool | None = None,
        staged_budget: bool | None = None,
        retain_repair: bool | None = None,
        focus_unforgotten: bool = False,
        reuse_protection: bool = False,
        lazy_budget: bool = True,
        guided_search: bool = True,
        stop_at_budget: bool = True,
        search_iters: int = 6,
        stall_ratio: float | None = None,
        final_budget_share: float | None = FINAL_BUDGET_SHARE,
        final_repeats: int | None = None,
        predicted_trust: float | None = DEFAULT_PREDICTED_TRUST,
        refresh_every: int | None = None,
        curvature_kwargs: Mapping[str, Any] | None = None,
        reduce: Reduce | None = None,
        gather: Reduce | None = None,
        **kw: Any,
    ) -> None:
        damping_mode = check_damping_mode(damping_mode)
        if damping is None:
            if damping_mode == "absolute":
                raise ValueError("damping_mode='absolute' needs damping=<λ>: absolute damping has no scale-free "
                                 "default; use damping_mode='relative' (the default, ρ = 0.1)")
            damping = DEFAULT_RELATIVE_DAMPING
        super().__init__(model, damping=damping, scale=scale, reduce=reduce,
                         steps=DEFAULT_NEWTON_STEPS if steps is None else steps, **kw)
        check_settings(refresh_every=refresh_every, search_iters=search_iters, predicted_trust=predicted_trust,
                       final_repeats=final_repeats, stall_ratio=stall_ratio,
                       final_budget_share=final_budget_share)
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
        check_curvature_model(curvature, model, f"{self.name}: curvature")
        check_curvature_model(full_curvature, model, f"{self.name}: full_curvature")
        self.predicted_trust = None if predicted_trust is None else float(predicted_trust)
        self.curvature = curvature
        self.curvature_backend = curvature.name if curvature is not None else curvature_backend
        if full_curvature is not None and curvature is None:
            self.curvature_backend = full_curvature.name
        self.curvature_data = curvature_data
        self.full_curvature = full_curvature
        self.damping_mode = damping_mode
        self.step_search = bool(step_search)
        self.staged = bool(staged)
        repeats = final_repeats if final_repeats is not None else (2 if steps is None else 0)  # set `steps`: no repeat
        self.final_repeats = int(repeats) if self.staged else 0
        self.protect_holdout = bool(protect_holdout)
        self.protect_groups = int(protect_groups)
        self.init_regime(knowledge, forget_loss=self.forget_loss if kw.get("forget_loss") is not None else None,
                         protect_retain=protect_retain, max_retain_increase=self.max_retain_increase, steps=steps,
                         staged_budget=staged_budget)
        self.init_repair(retain_repair)
        self.focus_unforgotten = bool(focus_unforgotten)
        self.reuse_protection = bool(reuse_protection)
        self.lazy_budget = bool(lazy_budget)
        self.guided_search = bool(guided_search)
        self.stop_at_budget = bool(stop_at_budget)
        self._holdout_gradients: list[Vector] = []  # the step's constraints: the holdout's, then the retain groups'
        self._holdout_part: list[Vector] | None = None  # the holdout's (kept for the run with `reuse_protection`)
        self.search_iters = int(search_iters)
        self.stall_ratio = None if stall_ratio is None else float(stall_ratio)
        self.final_budget_share = None if final_budget_share is None else float(final_budget_share)
        self._stage_origin = 0  # step_count when the current run began
        self._stage_start: float | None = None  # the forget loss when it began
        self.refresh_every = None if refresh_every is None else int(refresh_every)
        self.curvature_kwargs = dict(curvature_kwargs or {})
        self.gather = gather
        self._fixed_step_budget: float | None = None  # set during a fixed step (`step_search=False`)
        #: the parameters (or experts' slices, `name[expert]`) of the curvature's blocks that saw no curvature
        #: (`Curvature.uncurved_parameters`): with relative damping the Newton steps leave them in place
        self.uncurved: frozenset[str] = frozenset()

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
        batches = as_batches(batches)
        if not batches:
            raise ValueError(f"fit_curvature() got no batch; curvature_data={self.curvature_data!r} needs "
                             f"{'retain' if self.curvature_data == 'retain' else 'forget'} batches")
        if self.curvature_data == "full_minus_forget":
            assert self.full_curvature is not None
            forget_curvature = self._new_curvature().fit(batches)
            curvature = clone_curvature(self.full_curvature).subtract(forget_curvature)
        else:
            curvature = self.curvature if self.curvature is not None else self._new_curvature()
            if curvature.finalized:
                curvature.reset()
            curvature.fit(batches)
        self.curvature = curvature
        self._note_uncurved()
        return curvature

    def _note_uncurved(self) -> None:
        """Read which blocks saw no curvature (`uncurved`) and warn naming them when the steps leave them in place."""
        assert self.curvature is not None
        self.uncurved = frozenset(self.curvature.uncurved_parameters())
        if self.uncurved and self.damping_mode == "relative":
            names = sorted(self.uncurved)
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            warnings.warn(
                f"{self.name}: {len(names)} parameter tensor(s) saw no curvature on the curvature data ({shown}): "
                "their outputs' gradients were zero on every example (LoRA's A while its B is still zero does this); "
                "relatively damped Newton steps leave them in place, since the curvature knows nothing of them; to "
                "move them, fit the curvature where they have some (e.g. after the adapters have trained)",
                UncoveredParametersWarning, stacklevel=3)

    def _source(self, forget: Sequence[Batch], retain: Sequence[Batch]) -> list[Batch]:
        if self.curvature_data == "retain":
            if not retain:
                raise ValueError("curvature_data='retain' needs retain batches; pass retain_batches, a finalized "
                                 "curvature=, or use curvature_data='full_minus_forget' with a curvature checkpoint")
            return list(retain)
        return list(forget)

    def _begin_fit(self, forget: Sequence[Batch], retain: Sequence[Batch]) -> None:
        self._stage_origin, self._stage_start = self.step_count, None
        self._holdout_gradients, self._holdout_part = [], None  # the protection is computed at every run's first step
        if self.curvature is None or not self.curvature.finalized:
            self.fit_curvature(self._source(forget, retain))
        else:  # a curvature given finalized (a checkpoint, a callback's)
            self._note_uncurved()

    def refresh_due(self, index: int) -> bool:
        """Every `refresh_every` steps of a run (never at its first step), the curvature is fitted again."""
        return self.refresh_every is not None and index > 0 and index % self.refresh_every == 0

    def _before_step(self, index: int, forget: Sequence[Batch], retain: Sequence[Batch]) -> None:
        if self.refresh_due(index):
            self.fit_curvature(self._source(forget, retain))

    def named_params(self) -> dict[str, nn.Parameter]:
        # the curvature may have unwrapped the model (e.g. a PEFT wrapper): use its parameter names
        assert self.curvature is not None or not self.param_names
        params = dict(self.curvature.model.named_parameters())  # type: ignore[union-attr]
        return {n: params[n] for n in self.param_names}

    def _curved(self, vector: Mapping[str, Tensor], keep_factors: bool = False) -> Vector:
        """`vector` over `param_names`, zero on the parameters the steps leave in place (`uncurved`, with relative
        damping): a zero gradient there gives them a zero direction, and the constraints stay exact. Carried factors
        (`keep_factors`) are kept where nothing is left in place."""
        still = self.uncurved if self.damping_mode == "relative" else frozenset()
        if not still:
            return restricted(vector, self.param_names) if keep_factors else {n: vector[n] for n in self.param_names}
        return zero_labels({n: vector[n] for n in self.param_names}, still)

    def newton_direction(self, gradient: Mapping[str, Tensor]) -> Vector:
        """`(C + λI)^-1 g` over `param_names` (the current λ, relative or absolute per `damping_mode`)."""
        assert self.curvature is not None
        return self.curvature.apply(self._curved(gradient), self.damping, -1.0, mode=self.damping_mode)

    def newton_directions(self, gradients: Sequence[Mapping[str, Tensor]]) -> list[Vector]:
        """`newton_direction` of each of `gradients`, solved together (`Curvature.apply_many`: one stacked product
        per layer for K-FAC): the forget gradient and the protection constraints of one step."""
        assert self.curvature is not None
        return self.curvature.apply_many([self._curved(g) for g in gradients], self.damping, -1.0,
                                         mode=self.damping_mode)

    def constrained_newton_direction(self, gradient: Mapping[str, Tensor],
                                     constraints: Sequence[Mapping[str, Tensor]]) -> Vector:
        """`(C + λI)^-1 g` constrained to `hᵀd = 0` for each of `constraints`, in one call of the backend's
        `constrained_inverse` (K-FAC: in its eigenbasis; CG: one projected solve)."""
        assert self.curvature is not None
        return self.curvature.constrained_inverse(  # type: ignore[attr-defined]
            self._curved(gradient), [self._curved(h, keep_factors=True) for h in constraints],
            self.damping, mode=self.damping_mode)

    def _prepare(self, forget: Sequence[Batch], retain: Sequence[Batch]) -> Any:
        if self.curvature is None or not self.curvature.finalized:
            raise RuntimeError(f"{self.name}: the curvature is not fitted; call fit_curvature(batches) first or "
                               "use fit(), which fits it on the curvature_data source")
        if self._holdout_part is None or not self.reuse_protection:
            self._holdout_part = self.holdout_gradients() if self.protect_holdout and self.holdout else []
        self._holdout_gradients = list(self._holdout_part)
        if self.protect_retain and retain:  # the step's own retain examples, every step
            self._holdout_gradients += self.group_gradients(retain, self.protect_retain)
        return self.forget_gradient(forget, example_weights=self.forget_weights(forget))

    def forget_weights(self, forget: Sequence[Batch]) -> Tensor | None:
        """With `focus_unforgotten` and a holdout target, each forget example's weight in this step's objective:
        `1 − its percentile among the holdout's losses` at the current weights (`forget_focus`; the losses are the
        forget score's, measured once per weights); None: every example alike."""
        if not (self.focus_unforgotten and self.holdout and self.forget_target is None):
            return None
        measured: list[Tensor] = []
        score, _ = self.forget_score(forget, losses_out=measured)
        if not math.isfinite(score):
            return None
        hist = holdout_histogram(measured[1], self.reduce) if self.relative_target else self._holdout_hist
        return unforgotten_weights(measured[0], hist, self.reduce)

    def holdout_gradients(self) -> list[Vector]:
        """`∇` of the mean token NLL of up to `protect_groups` groups of holdout examples, each reduced across
        processes: the constraints of `_direction`."""
        return self.group_gradients(self.holdout, self.protect_groups)

    def group_gradients(self, batches: Sequence[Batch], k: int) -> list[Vector]:
        """`∇` of the mean token NLL of up to `k` groups of the examples of `batches` (`protection.example_groups`),
        each reduced across processes. When the parameters are exactly the curvature's tracked linear layers (K-FAC)
        and not sharded, one forward and backward per batch gives all k (`group_gradients.grouped_nll_gradients`);
        otherwise one per group."""
        layers = getattr(self.curvature, "layers", None)
        params = self.named_params()
        tracked = {n for layer in layers or () for n in layer.param_names}
        if layers and tracked == set(params) and not any(map(is_shard, params.values())):
            with eval_mode(self.model):
                grads = grouped_nll_gradients(self.model, layers, batches, k, self.reduce,
                                              {n: p.dtype for n, p in params.items()})
            if grads is not None:
                return grads
        return [self.forget_gradient(g, kind="nll") for g in example_groups(batches, k)]

    def _direction(self, context: Any) -> Vector:
        """The search direction for the current damping: the Newton direction, with holdout data (and
        `protect_holdout`) constrained to leave the holdout loss unchanged to first order.

        Unlearning a template's secrets also lowers the likelihood of *every* secret of that template (the retain
        curvature does not see the template, so nothing holds it), and privacy is relative: a canary's exposure is
        its rank among all candidates. So the step is `d = d_f - α d_h` with `d_f = (C + λI)⁻¹ g_f`,
        `d_h = (C + λI)⁻¹ ∇L_holdout` and `α = ∇L_holdoutᵀ d_f / ∇L_holdoutᵀ d_h`: the most forgetting in the
        curvature's metric among steps that leave the holdout (the level "never seen") where it is. With
        `protect_groups=k` there are k such constraints (the holdout split in k groups), `α` solving a k × k system:
        the holdout's losses stay in place group by group, not only on average. A backend with a one-call form of
        this (`constrained_inverse`: K-FAC in its eigenbasis, CG's projected solve) computes it in one call instead of
        k + 1 solves (`constrained_newton_direction`)."""
        return self.protected_direction(context, self._holdout_gradients)

    def protected_direction(self, gradient: Mapping[str, Tensor],
                            constraints: Sequence[Mapping[str, Tensor]]) -> Vector:
        """`(C + λI)⁻¹ gradient` constrained to `hᵀd = 0` for each of `constraints` (none: the Newton direction)."""
        if constraints and hasattr(self.curvature, "constrained_inverse"):
            return self.constrained_newton_direction(gradient, constraints)
        if not constraints:
            return self.newton_direction(gradient)
        solved = self.newton_directions([gradient, *constraints])
        return constrained_direction(solved[0], constraints, self.newton_direction, solved=solved[1:])

    def _offset(self, context: Any) -> Vector | None:
        """A fixed part of the update that does not scale with η (Fisher Forgetting's noise); None here."""
        return None

    def _propose(self, context: Any) -> Vector:
        direction = self._direction(context)
        update = {n: self.scale * d for n, d in direction.items()}
        offset = self._offset(context)
        if offset is not None:
            update = {n: update[n] + offset[n].to(update[n].dtype) for n in update}
        return update

    # ------------------------------------------------------------------ the step search
    def step(
        self,
        forget_batch: Batch | Sequence[Batch],
        retain_batch: Batch | Sequence[Batch] | None = None,
        held_retain_batch: Batch | None = None,
    ) -> StepRecord:
        """One Newton step with the step-length search (see the class docstring); `step_search=False`: the fixed
        step `scale · d` under the base class's rollback rule."""
        if not self.step_search:
            held = self.budget_batches(held_retain_batch, as_batches(retain_batch))
            reference = self.reference_retain_loss(held) if held is not None else None
            self._fixed_step_budget = self._predicted_budget(held, reference)
            try:
                return super().step(forget_batch, retain_batch, held_retain_batch)
            finally:
                self._fixed_step_budget = None
        forget, retain, held, reference, target, context, index = self._begin_step(
            forget_batch, retain_batch, held_retain_batch)
        self.note_budget_spent(held, reference)
        before: list[Tensor] = []  # the per-example losses at η = 0 (the guided search's first guess)
        forget_before = self.forget_score(forget, losses_out=before)
        aim = self.stage_target(target, forget_before[0])
        predicted_budget = self._predicted_budget(held, reference)
        record: StepRecord | None = None
        for trial in range(self.max_retries + 1):
            direction = self._direction(context)
            offset = self._offset(context)
            if not all_finite(direction.values()):
                record = self._emit(StepRecord(step=index, damping=self.damping, scale=float("nan"),
                                               forget_loss=float("nan"), retain_loss=None, accepted=False,
                                               reason="non_finite", trial=trial, target=target, evaluations=0))
                self._reject()
                continue
            curvature_norm = quadratic_of(self.curvature, direction) if predicted_budget is not None else None
            snapshot = self._snapshot()
            lazy = self.lazy_budget and aim is not None and held is not None
            trials = StepTrials(self, snapshot, direction, offset, forget, held, reference, aim, predicted_budget,
                                curvature_norm, before if offset is None else None, lazy=lazy)
            guided = (self.guided_search and aim is not None and bool(self.holdout) and self.relative_target
                      and self.forget_target is None)
            search = StepSearch(trials, forget_before, trials.budget if lazy else None,
                                trials.guess if guided else None,
                                self._waypoint_reached(aim, target),
                                self.stall_ratio if aim is not None and target is not None and aim < target else None)
            start = min(self.scale, trials.largest_trusted_step())
            try:
                eta, point, reason = search.run(start, self.search_iters)
            except BaseException:  # an error (or Ctrl-C) during the search: the weights of before it
                self._restore(snapshot)
                raise
            if reason == "target_reached" and target is not None and point[0][0] < target:
                reason = "accepted"  # this step's stage, not yet the target
            if eta is not None:
                self._apply_step(snapshot, direction, offset, eta)
                self._count_step(snapshot)
                self._score_memo.remember(self, forget, point[0], trials.losses.get(eta))
                self._score_memo.remember_held(self, held, point[1])  # what `finish` measures after the last step
                predicted = None if curvature_norm is None else 0.5 * eta**2 * curvature_norm
                record = self._emit(StepRecord(step=index, damping=self.damping, scale=eta,
                                               forget_loss=point[0][1], retain_loss=point[1], accepted=True,
                                               reason=reason, trial=trial, target=target,
                                               evaluations=search.evaluations, predicted_increase=predicted,
                                               forget_score=point[0][0]))
                self.scale = eta  # the next step's search starts where this one ended
                return record
            self._restore(snapshot)
            record = self._emit(StepRecord(step=index, damping=self.damping, scale=float(self.scale),
                                           forget_loss=point[0][1], retain_loss=point[1], accepted=False,
                                           reason=reason, trial=trial, target=target,
                                           evaluations=search.evaluations, forget_score=point[0][0]))
            self._reject()
        assert record is not None
        return record

    def _predicted_budget(self, held: Batch | None, reference: float | None) -> float | None:
        """`trust_region.predicted_budget` for this method (C a retain curvature unless fitted on the forget set)."""
        return predicted_budget(self.max_retain_increase, held is not None, reference, self.predicted_trust,
                                retain_curvature=self.curvature_data != "forget")

    def outside_trust_region(self, snapshot: Mapping[str, Tensor]) -> bool:
        """The base class's bound on ‖Δθ‖ and, for the fixed step, the bound on ½ΔᵀCΔ (`_predicted_budget`)."""
        if super().outside_trust_region(snapshot):
            return True
        budget = self._fixed_step_budget
        if budget is None or self.curvature is None:
            return False
        params = self.named_params()
        delta = {n: (params[n].detach().float() - s.float()) for n, s in snapshot.items()}
        return 0.5 * self.curvature.quadratic(delta) > budget

    def _apply_step(self, snapshot: Mapping[str, Tensor], direction: Vector, offset: Vector | None,
                    eta: float) -> None:
        """θ = θ₀ + offset + η d, θ₀ the `snapshot`."""
        params = self.named_params()
        with torch.no_grad():
            for n, s in snapshot.items():
                update = eta * direction[n].to(device=s.device, dtype=torch.float32)
                if offset is not None:
                    update = update + offset[n].to(device=s.device, dtype=torch.float32)
                params[n].copy_((s.float() + update).to(s.dtype))


class Newton(SecondOrderUnlearner):
    """Damped Newton removal (see `SecondOrderUnlearner`); `curvature_backend` defaults to "kfac"."""

    name = "newton"
