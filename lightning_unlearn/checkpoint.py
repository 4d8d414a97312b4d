"""Curvature checkpoints that cannot run code: one safetensors file of tensors plus JSON.

    save_curvature(curvature, "curvature.safetensors", batches=120)      # atomic; tensors on CPU
    state = load_curvature_state("curvature.safetensors", model=model, backend="kfac")
    curvature.load_state_dict(state)

A curvature's `state_dict()` is a nested dict of tensors, strings, numbers, lists and tuples. `save_curvature` puts
its tensors in the safetensors tensor table (keyed by their place in the state, e.g. `layers/fc1/A`) and everything
else in the header as JSON with `{"$tensor": key}` placeholders (`$permuted` keeps a transposed layout, `$tuple` and
`$dict` the containers), next to the format version, the backend, the tracked parameters' names and shapes, a model
fingerprint, the world size and the caller's metadata. Reading such a file never unpickles anything.

`load_curvature_state` also reads older curvature files and Lightning checkpoints (both written by `torch.save`),
but only with `torch.load(weights_only=True)`: a pickled payload is refused, never executed. Whatever the source, it
refuses NaN/inf, a checkpoint of another backend, and (given the model) a checkpoint of another model, naming the
first mismatching parameter. Every refusal is a `UserInputError` naming the file (the checks: `checkpoint_checks`).
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .checkpoint_checks import (
    RESAVE_HINT,
    SCOPES,
    check_curvature_state,
    model_fingerprint,
    param_shapes,
    weights_sample,
)
from .curvature.base import Curvature
from .curvature.layers import unwrap_model
from .errors import UserInputError
from .io import atomic_file

#: the format of a curvature file written by `save_curvature` (a safetensors file)
CURVATURE_FILE_FORMAT = "lightning_unlearn.curvature/2"
#: the earlier format (`torch.save` of {"format", "state", "meta"}), still read with `weights_only=True`
LEGACY_CURVATURE_FILE_FORMAT = "lightning_unlearn.curvature/1"

_TAGS = ("$tensor", "$permuted", "$tuple", "$dict")


# ---------------------------------------------------------------------------------------------- flattening
def _flatten(node: Any, where: str, tensors: dict[str, Tensor], seen: set[int]) -> Any:
    """`node` as JSON with tensors moved into `tensors` (CPU, contiguous, storage of their own)."""
    if isinstance(node, Tensor):
        if node.is_floating_point() and not bool(torch.isfinite(node).all()):
            raise ValueError(f"refusing to save a curvature with NaN/inf in {where or 'the state'}")
        t = node.detach().to("cpu")
        order = sorted(range(t.dim()), key=lambda d: -t.stride(d)) if not t.is_contiguous() else []
        if order == list(range(t.dim())):
            order = []
        # a transposed layout (e.g. eigenvectors from eigh) is kept: stored as its contiguous permutation, restored
        # on load, so that products with it are bit-identical
        t = t.permute(order).contiguous() if order else t.contiguous()
        if t.data_ptr() in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # safetensors refuses tensors sharing memory
        if t.numel():
            seen.add(t.data_ptr())
        key = where or "tensor"
        while key in tensors:
            key += "#"
        tensors[key] = t
        return {"$permuted": [key, order]} if order else {"$tensor": key}
    if isinstance(node, Mapping):
        out = {}
        for k, v in node.items():
            if not isinstance(k, str):
                raise TypeError(f"cannot save the curvature state: key {k!r} under {where or 'the top'!r} is not a"
                                " string")
            out[k] = _flatten(v, f"{where}/{k}" if where else k, tensors, seen)
        return {"$dict": out}
    if isinstance(node, (list, tuple)):
        items = [_flatten(v, f"{where}/{i}", tensors, seen) for i, v in enumerate(node)]
        return {"$tuple": items} if isinstance(node, tuple) else items
    if isinstance(node, float) and not math.isfinite(node):
        raise ValueError(f"refusing to save a curvature with a non-finite number at {where or 'the top'}")
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise TypeError(f"cannot save the curvature state: {where or 'the top'} is a {type(node).__name__}; a curvature"
                    " state holds tensors, strings, numbers, lists, tuples and dicts")


def _unflatten(node: Any, tensors: Mapping[str, Tensor], source: str) -> Any:
    """The state that `_flatten` encoded (raising `UserInputError` naming `source` for a malformed structure)."""
    if isinstance(node, list):
        return [_unflatten(v, tensors, source) for v in node]
    if isinstance(node, dict):
        if len(node) != 1 or next(iter(node)) not in _TAGS:
            raise UserInputError(f"{source}: malformed curvature structure (an object with keys {sorted(node)[:3]});"
                                 f" {RESAVE_HINT}")
        tag, value = next(iter(node.items()))
        if tag == "$tensor":
            if not isinstance(value, str) or value not in tensors:
                raise UserInputError(f"{source}: the curvature structure names tensor {value!r}, which the file does"
                                     f" not hold (a damaged file?); {RESAVE_HINT}")
            return tensors[value]
        if tag == "$permuted" and isinstance(value, list) and len(value) == 2:
            tensor = _unflatten({"$tensor": value[0]}, tensors, source)
            order = value[1]
            if not isinstance(order, list) or sorted(order) != list(range(tensor.dim())):
                raise UserInputError(f"{source}: malformed layout {order!r} of tensor {value[0]!r}; {RESAVE_HINT}")
            return tensor.permute([order.index(d) for d in range(tensor.dim())])
        if tag == "$tuple" and isinstance(value, list):
            return tuple(_unflatten(v, tensors, source) for v in value)
        if tag == "$dict" and isinstance(value, dict):
            return {k: _unflatten(v, tensors, source) for k, v in value.items()}
        raise UserInputError(f"{source}: malformed curvature structure ({tag} of a {type(value).__name__}); "
                             f"{RESAVE_HINT}")
    return node


# ---------------------------------------------------------------------------------------------- writing
def save_curvature(curvature: Curvature | Mapping[str, Any], path: str | Path, *, model: nn.Module | None = None,
                   **meta: Any) -> Path:
    """Write a finalized curvature (or its `state_dict`) as one safetensors file, atomically (see the module doc).

    `model` (default: the curvature's) gives the parameter shapes and fingerprint recorded for the load-time check;
    `world_size` and `scope` ("full", the reduced state, by default; "rank" and the state's world size for one
    process's share, e.g. K-FAC with `shard_factors=True`: each process writes its own file) are recorded as such;
    the rest of `meta` must be JSON-able and is kept under `meta`.
    """
    if isinstance(curvature, Curvature):
        state = curvature.state_dict()
        model = curvature.model if model is None else model
    else:
        state = dict(curvature)
    model = unwrap_model(model) if model is not None else None  # names without torch.compile's `_orig_mod.`
    shard = state.get("shard")  # one process's share (K-FAC with shard_factors=True): a per-rank checkpoint
    world_size = int(meta.pop("world_size", shard["world_size"] if shard else 1))
    scope = str(meta.pop("scope", "rank" if shard else "full"))
    if shard and (scope != "rank" or world_size != int(shard["world_size"])):
        raise ValueError(f"save_curvature: this state is process {shard['rank']}'s share of {shard['world_size']} "
                         "processes; save it with scope='rank' and that world size (each process its own file)")
    if world_size < 1 or scope not in SCOPES:
        raise ValueError(f"save_curvature: world_size must be >= 1 and scope one of {SCOPES}, got {world_size},"
                         f" {scope!r}")
    try:
        user_meta = json.dumps(meta, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise TypeError(f"save_curvature: the metadata must be JSON-able (strings, numbers, lists, dicts): {err}"
                        ) from err
    names = [str(n) for n in state.get("param_names", [])]
    tensors: dict[str, Tensor] = {}
    structure = _flatten(state, "", tensors, set())
    header = {
        "format": CURVATURE_FILE_FORMAT,
        "backend": str(state.get("backend")),
        "world_size": str(world_size),
        "scope": scope,
        "param_names": json.dumps(names),
        "param_shapes": json.dumps(param_shapes(model, names) if model is not None else {}),
        "model_fingerprint": model_fingerprint(model, names) if model is not None else "",
        "weights_sample": json.dumps(weights_sample(model, names) if model is not None else {}),
        "meta": user_meta,
        "state": json.dumps(structure, allow_nan=False),
    }
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return Path(path)


# ---------------------------------------------------------------------------------------------- reading
def _kind(path: Path) -> str:
    """"safetensors", "torch" (zip or pickle: what `torch.save` writes) or "other", from the first bytes."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "torch"
    return "other"


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    source = f"curvature checkpoint {str(path)!r}"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types; all mean a damaged file
        raise UserInputError(f"{source} is not a readable safetensors file ({type(err).__name__}: {err}); it may be"
                             f" truncated or damaged: {RESAVE_HINT}") from err
    if metadata.get("format") != CURVATURE_FILE_FORMAT:
        found = metadata.get("format")
        raise UserInputError(
            f"{source} is a safetensors file but not a lightning-unlearn curvature checkpoint (format "
            f"{found!r}, expected {CURVATURE_FILE_FORMAT!r}; model weights?); pass the file written by save_curvature"
            " or CurvatureCallback(path=...), or a Lightning checkpoint of a run with CurvatureCallback/Unlearn"
        )
    try:
        structure = json.loads(metadata["state"])
        header = {
            "backend": metadata.get("backend"),
            "world_size": int(metadata.get("world_size", 1)),
            "scope": metadata.get("scope", "full"),
            "param_names": json.loads(metadata.get("param_names", "[]")),
            "param_shapes": json.loads(metadata.get("param_shapes", "{}")),
            "model_fingerprint": metadata.get("model_fingerprint"),
            "weights_sample": json.loads(metadata.get("weights_sample", "{}")),
            "meta": json.loads(metadata.get("meta", "{}")),
        }
    except RecursionError:
        raise UserInputError(f"{source}: its header is nested too deeply to be a curvature state (a damaged or "
                             f"crafted file); {RESAVE_HINT}") from None
    except (KeyError, ValueError, TypeError) as err:
        raise UserInputError(f"{source}: its header is malformed ({type(err).__name__}: {err}); {RESAVE_HINT}") from err
    try:
        state = _unflatten(structure, tensors, source)
    except RecursionError:
        raise UserInputError(f"{source}: its curvature structure is nested too deeply (a damaged or crafted file); "
                             f"{RESAVE_HINT}") from None
    if not isinstance(state, dict):
        raise UserInputError(f"{source}: the stored state is a {type(state).__name__}, not a dict; {RESAVE_HINT}")
    return state, header


def _torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers only; a pickled object is refused, not run."""
    source = f"{str(path)!r}"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" (e.g. {found.group(1)})" if found else ""
        raise UserInputError(
            f"{source} holds pickled Python objects{what}, which lightning-unlearn never executes: it loads"
            " curvature checkpoints as tensors only. If the file is yours, re-export it: load the curvature where"
            " you trust the file and call lightning_unlearn.checkpoint.save_curvature(curvature, 'curvature"
            ".safetensors'), or re-create it with CurvatureCallback(path=...)"
        ) from None
    except Exception as err:  # torch raises RuntimeError/EOFError/... for damaged files
        raise UserInputError(f"{source} looks like a torch file but cannot be read ({type(err).__name__}); it may be"
                             f" truncated or damaged: {RESAVE_HINT}") from None


def _from_torch_file(path: Path, key: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    obj = _torch_load(path)
    if isinstance(obj, Mapping) and obj.get("format") == LEGACY_CURVATURE_FILE_FORMAT and "state" in obj:
        return dict(obj["state"]), {}
    if isinstance(obj, Mapping) and isinstance(obj.get("callbacks"), Mapping):
        found = {k: v for k, v in obj["callbacks"].items()
                 if isinstance(v, Mapping) and v.get("curvature") is not None and (key is None or k == key)}
        if len(found) == 1:
            entry = next(iter(found.values()))
            if not isinstance(entry["curvature"], Mapping):
                raise UserInputError(f"the Lightning checkpoint {str(path)!r} holds a malformed curvature state")
            return dict(entry["curvature"]), dict(entry.get("curvature_meta") or {})
        what = "no" if not found else "several"
        raise UserInputError(
            f"the Lightning checkpoint {str(path)!r} holds {what} curvature state(s) "
            f"({sorted(found) if found else 'keys: ' + str(sorted(obj['callbacks']))}); save it from a run with a"
            " CurvatureCallback/Unlearn that accumulated statistics, or pass key=<the callback's state_key>"
        )
    raise UserInputError(f"{str(path)!r} is neither a curvature file nor a Lightning checkpoint; pass the file"
                         " written by save_curvature or CurvatureCallback(path=...), or a Lightning .ckpt of a run"
                         " with CurvatureCallback/Unlearn")


def read_curvature_file(path: str | Path, key: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, header) of a curvature checkpoint, unchecked (see `load_curvature_state`)."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"curvature checkpoint {str(path)!r} does not exist; check the path (a file written by"
                             " save_curvature or CurvatureCallback(path=...), or a Lightning .ckpt)")
    if path.is_dir():
        raise UserInputError(f"curvature checkpoint {str(path)!r} is a directory; pass the curvature file inside it"
                             " (written by save_curvature or CurvatureCallback(path=...)) or a Lightning .ckpt")
    if path.stat().st_size == 0:
        raise UserInputError(f"curvature checkpoint {str(path)!r} is empty (an interrupted copy?); {RESAVE_HINT}")
    try:
        kind = _kind(path)
    except OSError as err:
        raise UserInputError(f"curvature checkpoint {str(path)!r} cannot be read ({err.strerror or type(err).__name__})"
                             "; check its permissions") from None
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind == "torch":
        return _from_torch_file(path, key)
    raise UserInputError(f"{str(path)!r} is not a curvature checkpoint (neither a safetensors nor a torch file); pass"
                         " the file written by save_curvature or CurvatureCallback(path=...), or a Lightning .ckpt of"
                         " a run with CurvatureCallback/Unlearn")


def load_curvature_state(
    path: str | Path,
    key: str | None = None,
    model: nn.Module | None = None,
    *,
    backend: str | None = None,
    world_size: int | None = None,
    check_weights: bool = True,
) -> dict[str, Any]:
    """The curvature `state_dict` stored in `path` (tensors on CPU), checked before it is returned.

    `path`: a file written by `save_curvature`/`CurvatureCallback` (safetensors; older `torch.save` curvature files
    too), or a Lightning checkpoint of a run with a `CurvatureCallback`/`Unlearn` (`key` picks the callback's
    state_key when it holds several). Torch files are read with `weights_only=True` only. Refused with a
    `UserInputError`: a missing, empty, damaged or foreign file, pickled objects, NaN/inf, another `backend`,
    another `model` (names, shapes and fingerprint of the tracked parameters; with `check_weights`, a sample of
    their values: a checkpoint of other weights of the same shapes), missing entries, non-float or negative
    statistics, factors whose size is not this model's, one rank's share for another `world_size` (default: the
    current process group's). `check_weights=False` accepts a curvature of other weights on purpose.
    """
    state, header = read_curvature_file(path, key)
    check_curvature_state(state, header, model=model, backend=backend, world_size=world_size,
                          source=f"curvature checkpoint {str(path)!r}", check_weights=check_weights)
    return state


def curvature_header(curvature: Curvature, world_size: int = 1) -> dict[str, Any]:
    """The load-time check's facts about a curvature (recorded next to its state in Lightning checkpoints)."""
    names = list(curvature.param_names)
    return {"world_size": int(world_size), "scope": "full", "param_names": names,
            "param_shapes": param_shapes(curvature.model, names),
            "model_fingerprint": model_fingerprint(curvature.model, names),
            "weights_sample": weights_sample(curvature.model, names)}
