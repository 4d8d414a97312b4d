"""The methods by name: a table of where each one lives, imported when it is asked for (so the package has no import
cycle and nothing is registered as a side effect of an import). Add a built-in method to `METHOD_PATHS`; a method
defined elsewhere is added with `register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .inputs import check_keywords

if TYPE_CHECKING:
    from torch import nn

    from .unlearner import Unlearner

#: name -> "module:Class" under `lightning_unlearn.methods`
METHOD_PATHS = {
    "newton": "newton:Newton",
    "fisher_removal": "fisher:FisherRemoval",
    "fisher_forgetting": "fisher:FisherForgetting",
    "gradient_ascent": "first_order:GradientAscent",
    "gradient_difference": "first_order:GradientDifference",
    "npo": "first_order:NPO",
    "simnpo": "first_order:SimNPO",
}
_REGISTERED: dict[str, type[Unlearner]] = {}  # methods added with `register`


def method_class(name: str) -> type[Unlearner]:
    """The class of the method called `name`; `ValueError` naming the choices for an unknown one."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in METHOD_PATHS:
        raise ValueError(f"unknown unlearning method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    module, cls = METHOD_PATHS[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


class _Methods(Mapping[str, "type[Unlearner]"]):
    """Every method by name (read-only; the classes are imported when looked up)."""

    def __getitem__(self, name: str) -> type[Unlearner]:
        if name not in self:
            raise KeyError(name)
        return method_class(name)

    def __contains__(self, name: object) -> bool:
        return name in METHOD_PATHS or name in _REGISTERED

    def __iter__(self) -> Iterator[str]:
        return iter([*METHOD_PATHS, *(n for n in _REGISTERED if n not in METHOD_PATHS)])

    def __len__(self) -> int:
        return len(set(METHOD_PATHS) | set(_REGISTERED))


METHODS: Mapping[str, type[Unlearner]] = _Methods()


def register(name: str) -> Callable[[type[Unlearner]], type[Unlearner]]:
    """Class decorator adding a method defined outside this package under `name`."""

    def wrap(cls: type[Unlearner]) -> type[Unlearner]:
        cls.name = name
        _REGISTERED[name] = cls
        return cls

    return wrap


def check_method_settings(method: str, settings: Mapping[str, Any] | None = None) -> type[Unlearner]:
    """The class of `method`, after checking that it exists and accepts every key of `settings` (a driver's
    `method_kwargs`): drivers call it when they are built, so a typo fails before any work."""
    cls = method_class(method)
    check_keywords(cls, settings or {}, f"method {method!r}")
    return cls


def is_second_order(method: str) -> bool:
    """Whether the method named `method` uses curvature (a `SecondOrderUnlearner`); raises naming the choices for an
    unknown one. The one list of second-order methods: the registry itself."""
    from .newton import SecondOrderUnlearner

    return issubclass(check_method_settings(method), SecondOrderUnlearner)


def second_order_methods() -> tuple[str, ...]:
    """The names of the registered methods that use curvature, sorted."""
    return tuple(sorted(name for name in METHODS if is_second_order(name)))


def build_unlearner(method: str, model: nn.Module, **kwargs: Any) -> Unlearner:
    """Construct the method named `method` (a key of `METHODS`) for `model`."""
    return check_method_settings(method, kwargs)(model, **kwargs)
