"""The curvature backends by name: the registry the methods, drivers and settings choose from.

Beside the backends it registers (not in `methods`), so that a backend name is checked and built the same way
everywhere. Each backend module is imported only when it is built: a checkout without one still builds the others.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from .base import Curvature

#: the backend names a setting may give (`UnlearnSettings.curvature`, `build_curvature`)
CURVATURE_BACKENDS = ("kfac", "cg", "woodfisher", "diagonal")
#: names a curvature object may carry (`Curvature.name`) -> the backend key
BACKEND_ALIASES = {"hessian_free": "cg", "hf": "cg", "wood_fisher": "woodfisher"}
#: backend key -> (module inside `lightning_unlearn.curvature`, class)
_CLASSES = {"diagonal": ("diagonal", "DiagonalFisher"), "kfac": ("kfac", "KFAC"),
            "cg": ("hessian_free", "HessianFree"), "woodfisher": ("woodfisher", "WoodFisher")}


def backend_key(backend: str) -> str:
    """The registry key of `backend` (aliases resolved); a `ValueError` naming the choices for an unknown one."""
    key = BACKEND_ALIASES.get(backend, backend)
    if key not in CURVATURE_BACKENDS:
        raise ValueError(f"unknown curvature backend {backend!r}; choose one of {', '.join(CURVATURE_BACKENDS)}")
    return key


def curvature_class(backend: str) -> type[Curvature]:
    """The class of a backend (imported on demand; an `ImportError` naming the installed alternative)."""
    module, name = _CLASSES[backend_key(backend)]
    try:
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)
    except ImportError as err:  # a backend not installed in this checkout
        raise ImportError(f"curvature backend {backend!r} is not available ({err}); use one of the installed "
                          "backends, e.g. 'diagonal'") from err


def fisher_types(backend: str) -> tuple[str, ...] | None:
    """The `fisher_type` values a backend takes (its module's `FISHER_TYPES`); None when it takes no `fisher_type`
    (CG multiplies by the GGN)."""
    cls = curvature_class(backend)
    return getattr(importlib.import_module(cls.__module__), "FISHER_TYPES", None)


def build_curvature(backend: str, model: nn.Module, **kwargs: Any) -> Curvature:
    """Construct an (unfitted) curvature backend: "kfac" | "cg" | "woodfisher" | "diagonal". kwargs (e.g. `reduce`,
    `gather`, `objective`, `fisher_type`) go to the backend's constructor."""
    return curvature_class(backend)(model, **kwargs)
