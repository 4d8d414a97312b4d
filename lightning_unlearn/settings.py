"""`UnlearnSettings`: the knobs of one deletion request, with the one set of defaults every driver reads.

The `Unlearn` callback, `UnlearningModule` (and so the `lightning-unlearn` command), `fabric_unlearn`, the demo,
the experiments and the benchmarks all build one of these and hand it to `lightning_unlearn.request`. The drivers
take `settings=` and/or the knobs as keywords (`UnlearnSettings.from_kwargs`), and `takes_settings` gives their
signatures every field with this class's default, so a knob and its default are written in one place.
Torch only (no Lightning).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .curvature.base import Curvature, Reduce
from .curvature.registry import backend_key, curvature_class, fisher_types
from .errors import UserInputError
from .methods.inputs import check_keywords, check_settings
from .methods.newton import CURVATURE_DATA
from .methods.registry import check_method_settings, is_second_order

#: what `full_curvature` may be: a curvature file or Lightning checkpoint, a finalized `Curvature`, or its state_dict
FullCurvature = str | Path | Curvature | Mapping[str, Any] | None


#: method arguments that a request sets itself, so they are refused in `method_kwargs` (the request would fit one
#: curvature and the method be told of another)
#: the fields that only a second-order method reads: set on a first-order one they are refused, not ignored
CURVATURE_FIELDS = ("curvature", "curvature_data", "fisher_type", "full_curvature", "refresh_every",
                    "curvature_kwargs")

REQUEST_KEYWORDS = {
    "curvature": "the request fits the curvature (set curvature, curvature_data, curvature_batches)",
    "full_curvature": "give full_curvature= as a setting of its own",
    "curvature_backend": "give curvature= as a setting of its own",
    "curvature_data": "give curvature_data= as a setting of its own",
    "curvature_kwargs": "give curvature_kwargs= as a setting of its own",
    "reduce": "the driver sets it (its strategy's all-reduce)",
    "gather": "the driver sets it (its strategy's all-gather)",
    "log": "the driver sets it",
}


@dataclass
class UnlearnSettings:
    """The settings of one deletion request; a knob left at None takes the method's own default (for the
    second-order methods: the default recipe of `SecondOrderUnlearner`: relative damping ρ = 0.1, a step-length
    search to the holdout target, up to 5 steps).

    Attributes:
        method: a key of `lightning_unlearn.methods.METHODS` (newton, fisher_removal, fisher_forgetting,
            gradient_ascent, gradient_difference, npo, simnpo).
        curvature: the backend of second-order methods (kfac, cg, woodfisher, diagonal).
        curvature_data: where the curvature comes from: retain | forget | full_minus_forget (the latter with
            `full_curvature`, a curvature checkpoint of the training data).
        curvature_batches: at most this many batches of that source for the curvature fit (None: all). 16 by
            default: each batch costs a forward and backward pass (a CG product per batch and iteration), and 16
            batches already give stable K-FAC factors on the tested models, while "all" made a request's cost grow
            with whatever retain loader was passed (a whole training set's, by accident); the demo measured 8 as
            enough on its 1M-parameter model (`demo.DEFAULT_SETTINGS`).
        holdout_batches: at most this many holdout batches for the target (0: no holdout target; None: all); 16 by
            default, for the same reason.
        damping, scale, steps: λ (ρ with relative damping), the first step length η, the step budget; None: the
            method's default.
        forget_loss: the forget objective (unlikelihood, nll, ...); None: the method's default.
        max_retain_increase: the retain budget (relative rise of the held retain loss; None: no check).
        forget_target: a forget loss (nats) to reach instead of the holdout target.
        fisher_type: the backend's Fisher type (mc, empirical, type2) where it has one; None: its default.
        full_curvature: for `full_minus_forget`: a curvature file, a Lightning checkpoint, a finalized `Curvature`
            or its state_dict.
        refresh_every: re-estimate the curvature every k steps (second-order methods; None: never).
        knowledge: the knowledge regime of the second-order recipe (`methods.knowledge`: NLL objective, retain
            protection, a budget of at least 30 %); None: on when the held retain data is memorised (mean token NLL
            below 0.1 nats), as after finetuning on QA pairs; False: the secret recipe always; True: always.
        method_kwargs, curvature_kwargs: further arguments of the method and of the backend (typos are refused).

    Invalid values raise `UserInputError` at construction (and on `dataclasses.replace`), before any work.
    """

    method: str = "newton"
    curvature: str = "kfac"
    curvature_data: str = "retain"
    curvature_batches: int | None = 16
    holdout_batches: int | None = 16
    damping: float | None = None
    scale: float | None = None
    steps: int | None = None
    forget_loss: str | None = None
    max_retain_increase: float | None = 0.05
    forget_target: float | None = None
    fisher_type: str | None = None
    full_curvature: FullCurvature = None
    refresh_every: int | None = None
    knowledge: bool | None = None
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    curvature_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.method_kwargs = dict(self.method_kwargs or {})
        self.curvature_kwargs = dict(self.curvature_kwargs or {})
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise `UserInputError` naming the first invalid field and the valid values."""
        taken = sorted(set(self.method_kwargs) & set(REQUEST_KEYWORDS))
        if taken:
            raise UserInputError(f"method_kwargs: {taken[0]!r} is not a method setting here: "
                                 f"{REQUEST_KEYWORDS[taken[0]]}")
        try:
            check_method_settings(self.method, self.method_kwargs)
        except UserInputError:
            raise
        except ValueError as err:  # an unknown method: the registry's message names the choices
            raise UserInputError(str(err)) from None
        try:
            backend_key(self.curvature)
        except ValueError as err:
            raise UserInputError(str(err)) from None
        if self.curvature_data not in CURVATURE_DATA:
            raise UserInputError(f"curvature_data must be one of {CURVATURE_DATA}, got {self.curvature_data!r}")
        check_settings(damping=self.damping, scale=self.scale, max_retain_increase=self.max_retain_increase,
                       forget_loss=self.forget_loss, curvature_batches=self.curvature_batches,
                       holdout_batches=self.holdout_batches, steps=self.steps, refresh_every=self.refresh_every,
                       forget_target=self.forget_target)
        if self.knowledge is not None and not isinstance(self.knowledge, bool):
            raise UserInputError(f"knowledge must be true, false or null (decided from the held retain loss), got "
                                 f"{self.knowledge!r}")
        if self.knowledge is not None and not self.second_order:
            raise UserInputError(f"knowledge applies to the second-order methods (newton, fisher_removal, ...), not to "
                                 f"{self.method!r}; leave it unset")
        if self.fisher_type is not None and not (isinstance(self.fisher_type, str) and self.fisher_type):
            raise UserInputError(f"fisher_type must be a name (mc, empirical, type2) or None, got {self.fisher_type!r}")
        if self.second_order:
            allowed = fisher_types(self.curvature)
            if self.fisher_type is not None and allowed is not None and self.fisher_type not in allowed:
                raise UserInputError(f"fisher_type for curvature {self.curvature!r} must be one of "
                                     f"{', '.join(allowed)} (or None: the backend's default), got {self.fisher_type!r}")
            check_keywords(curvature_class(self.curvature), self.backend_kwargs(), f"curvature {self.curvature!r}")
        else:
            defaults = self.defaults()
            given = [name for name in CURVATURE_FIELDS if getattr(self, name) != defaults[name]]
            if given:
                raise UserInputError(f"{given[0]} applies to the second-order methods (newton, fisher_removal, ...); "
                                     f"{self.method!r} takes no curvature and would ignore it: leave it unset")

    # ------------------------------------------------------------------ derived
    @property
    def second_order(self) -> bool:
        """Whether the method uses curvature (then the curvature fields apply)."""
        return is_second_order(self.method)

    def backend_kwargs(self) -> dict[str, Any]:
        """The backend's constructor arguments: `curvature_kwargs`, plus `fisher_type` when set."""
        kwargs = dict(self.curvature_kwargs)
        if self.fisher_type is not None:
            kwargs["fisher_type"] = self.fisher_type
        return kwargs

    def kwargs(self, *, curvature: Curvature | None = None, full_curvature: Curvature | None = None,
               reduce: Reduce | None = None, gather: Reduce | None = None, **request: Any) -> dict[str, Any]:
        """The method's constructor arguments: every knob that is set (None: the method's default), curvature
        arguments for second-order methods only, then `method_kwargs`, then `request` (a driver's own arguments,
        e.g. `log`, or the module's `steps`: Lightning's `max_steps`). `curvature`, `full_curvature`, `reduce` and
        `gather` are the request's objects (given by `lightning_unlearn.request`; absent for a plain method)."""
        kw: dict[str, Any] = {"max_retain_increase": self.max_retain_increase}
        for key in ("damping", "scale", "steps", "forget_loss", "forget_target"):
            if getattr(self, key) is not None:
                kw[key] = getattr(self, key)
        if reduce is not None:
            kw["reduce"] = reduce
        if self.second_order:
            kw.update(curvature_backend=self.curvature, curvature_data=self.curvature_data,
                      curvature_kwargs=self.backend_kwargs())
            if self.refresh_every is not None:
                kw["refresh_every"] = self.refresh_every
            if self.knowledge is not None:
                kw["knowledge"] = self.knowledge
            if curvature is not None:
                kw["curvature"] = curvature
            if full_curvature is not None:
                kw["full_curvature"] = full_curvature
            if gather is not None:
                kw["gather"] = gather
        kw.update(self.method_kwargs)
        kw.update(request)
        return kw

    def replace(self, **changes: Any) -> UnlearnSettings:
        """A copy with `changes` (checked again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for reports and logs: a `full_curvature` object is named, never copied."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        full = out["full_curvature"]
        if isinstance(full, Path):
            out["full_curvature"] = str(full)
        elif isinstance(full, Curvature):
            out["full_curvature"] = f"<{type(full).__name__} curvature>"
        elif isinstance(full, Mapping):
            out["full_curvature"] = "<curvature state_dict>"
        out["method_kwargs"] = dict(self.method_kwargs)
        out["curvature_kwargs"] = dict(self.curvature_kwargs)
        return out

    @classmethod
    def from_kwargs(cls, settings: UnlearnSettings | None = None, /, **knobs: Any) -> UnlearnSettings:
        """`settings` (default: the defaults) with the knobs given as keywords changed, checked: how every driver
        builds its settings. An unknown knob raises `UserInputError` naming the valid ones; a dict knob given as None
        is empty."""
        unknown = sorted(set(knobs) - set(KNOBS))
        if unknown:
            raise UserInputError(f"unknown setting {unknown[0]!r}; valid settings: {', '.join(KNOBS)}")
        knobs = {k: ({} if v is None and k in DICT_KNOBS else v) for k, v in knobs.items()}
        if settings is None:
            return cls(**knobs)
        if not isinstance(settings, UnlearnSettings):
            raise UserInputError(f"settings must be an UnlearnSettings, got {type(settings).__name__}")
        return settings.replace(**knobs) if knobs else settings

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default value (the one set of defaults of every driver)."""
        return {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(cls)}


def setting(name: str) -> property:
    """A driver's read-only attribute `name` that reads `self.settings.<name>`: the settings stay the one source."""
    return property(lambda self: getattr(self.settings, name), doc=f"`settings.{name}` (see `UnlearnSettings`)")


#: every knob of a request, in order (the fields of `UnlearnSettings`)
KNOBS = tuple(f.name for f in dataclasses.fields(UnlearnSettings))
#: the knobs that are dicts (a driver takes None for "empty")
DICT_KNOBS = ("method_kwargs", "curvature_kwargs")

Driver = TypeVar("Driver", bound=Callable[..., Any])


def takes_settings(*, skip: Iterable[str] = (), types: Mapping[str, Any] | None = None,
                   keep_var_keyword: bool = False, hide: Iterable[str] = ()) -> Callable[[Driver], Driver]:
    """Decorator for a driver `f(..., settings=None, **knobs)` that builds `UnlearnSettings.from_kwargs(settings,
    **knobs)`: its signature shows every knob (but `skip`) as a keyword with the dataclass's default and type
    (`types` overrides a type, e.g. plain types for LightningCLI, which reads the signature for its `--model.<knob>`
    keys), placed where `**knobs` stands; dict knobs default to None. So the knobs are listed once, here.
    `keep_var_keyword` keeps `**knobs` after them (a driver that also takes other keywords); `hide` leaves the
    driver's own parameters of those names out of the signature (still accepted: e.g. `settings` for LightningCLI,
    whose keys stay the flat knobs)."""
    hints = typing.get_type_hints(UnlearnSettings)
    defaults = UnlearnSettings.defaults()
    types = dict(types or {})

    def wrap(fn: Driver) -> Driver:
        signature = inspect.signature(fn)
        params = [p for p in signature.parameters.values() if p.name not in set(hide)]
        var = next(i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD)
        taken = {p.name for p in params}
        knobs = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                   default=None if name in DICT_KNOBS else defaults[name],
                                   annotation=types.get(name, hints[name] | None if name in DICT_KNOBS
                                                        else hints[name]))
                 for name in KNOBS if name not in skip and name not in taken]
        tail = params[var:] if keep_var_keyword else params[var + 1:]
        fn.__signature__ = signature.replace(parameters=[*params[:var], *knobs, *tail])  # type: ignore[attr-defined]
        return fn

    return wrap


__all__ = ["DICT_KNOBS", "KNOBS", "FullCurvature", "UnlearnSettings", "setting", "takes_settings"]
