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
first mismatching parameter. Every refusal is a `UserInputError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .curvature.base import Curvature
from .errors import UserInputError
from .io import atomic_file

#: the format of a curvature file written by `save_curvature` (a safetensors file)
CURVATURE_FILE_FORMAT = "lightning_unlearn.curvature/2"
#: the earlier format (`torch.save` of {"format", "state", "meta"}), still read with `weights_only=True`
LEGACY_CURVATURE_FILE_FORMAT = "lightning_unlearn.curvature/1"
#: `scope` of a checkpoint: the reduced state of all processes (any world size may load it), or one rank's share
SCOPES = ("full", "rank")

_RESAVE = ("re-create it with lightning_unlearn.checkpoint.save_curvature(curvature, path) (or CurvatureCallback("
           "path=...)) from a finalized curvature of this model")
_TAGS = ("$tensor", "$permuted", "$tuple", "$dict")


# ---------------------------------------------------------------------------------------------- the model
def param_shapes(model: nn.Module, names: list[str] | tuple[str, ...]) -> dict[str, list[int]]:
    """The shapes of the named parameters of `model` (the ones a curvature tracks)."""
    params = dict(model.named_parameters())
    return {n: list(params[n].shape) for n in names if n in params}


def model_fingerprint(model: nn.Module, names: list[str] | tuple[str, ...]) -> str:
    """sha256 over the tracked parameters' names, shapes and dtypes: equal for models a checkpoint fits."""
    params = dict(model.named_parameters())
    digest = hashlib.sha256()
    for n in names:
        p = params.get(n)
        digest.update(f"{n}:{tuple(p.shape) if p is not None else None}:{p.dtype if p is not None else None};".encode())
    return digest.hexdigest()


#: values sampled from each tracked parameter (evenly spaced) to tell a model from another of the same shapes
WEIGHTS_SAMPLE = 32
#: relative difference (L2) of the sampled values above which the weights are another model's: above bf16/fp16
#: rounding of the same weights (about 4e-3) and what earlier deletion requests served from the same checkpoint move
#: a layer (0.09 after one default request on the drop-in example; the trust region bounds a step at the weights'
#: own norm), below two trainings or initialisations of one architecture (about 1.4)
WEIGHTS_TOLERANCE = 0.5


def weights_sample(model: nn.Module, names: list[str] | tuple[str, ...]) -> dict[str, list[float]]:
    """`WEIGHTS_SAMPLE` evenly spaced values of each tracked parameter (as float32 numbers): recorded next to a
    curvature so that a checkpoint of another model with the same names and shapes is told apart at load time.
    Parameters split across processes (FSDP2 `DTensor`s) or without data (meta) are left out."""
    params = dict(model.named_parameters())
    out: dict[str, list[float]] = {}
    for n in names:
        p = params.get(n)
        if p is None or p.is_meta or not p.numel() or "DTensor" in (type(p).__name__, type(p.data).__name__):
            continue
        flat = p.detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, min(WEIGHTS_SAMPLE, flat.numel())).round().long()
        out[n] = [float(v) for v in flat[index.to(flat.device)].float().cpu()]
    return out


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
                                 f" {_RESAVE}")
        tag, value = next(iter(node.items()))
        if tag == "$tensor":
            if not isinstance(value, str) or value not in tensors:
                raise UserInputError(f"{source}: the curvature structure names tensor {value!r}, which the file does"
                                     f" not hold (a damaged file?); {_RESAVE}")
            return tensors[value]
        if tag == "$permuted" and isinstance(value, list) and len(value) == 2:
            tensor = _unflatten({"$tensor": value[0]}, tensors, source)
            order = value[1]
            if not isinstance(order, list) or sorted(order) != list(range(tensor.dim())):
                raise UserInputError(f"{source}: malformed layout {order!r} of tensor {value[0]!r}; {_RESAVE}")
            return tensor.permute([order.index(d) for d in range(tensor.dim())])
        if tag == "$tuple" and isinstance(value, list):
            return tuple(_unflatten(v, tensors, source) for v in value)
        if tag == "$dict" and isinstance(value, dict):
            return {k: _unflatten(v, tensors, source) for k, v in value.items()}
        raise UserInputError(f"{source}: malformed curvature structure ({tag} of a {type(value).__name__}); {_RESAVE}")
    return node


def _walk(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) of every leaf of a nested state."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _walk(v, f"{where}/{k}" if where else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _walk(v, f"{where}/{i}")
    else:
        yield where, node


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
                             f" truncated or damaged: {_RESAVE}") from err
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
                             f"crafted file); {_RESAVE}") from None
    except (KeyError, ValueError, TypeError) as err:
        raise UserInputError(f"{source}: its header is malformed ({type(err).__name__}: {err}); {_RESAVE}") from err
    try:
        state = _unflatten(structure, tensors, source)
    except RecursionError:
        raise UserInputError(f"{source}: its curvature structure is nested too deeply (a damaged or crafted file); "
                             f"{_RESAVE}") from None
    if not isinstance(state, dict):
        raise UserInputError(f"{source}: the stored state is a {type(state).__name__}, not a dict; {_RESAVE}")
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
                             f" truncated or damaged: {_RESAVE}") from None


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


#: the entries each backend's `load_state_dict` reads (besides `backend`)
REQUIRED_KEYS = {
    "kfac": ("param_names", "fisher_type", "kfac_approx", "count", "layers"),
    "diagonal": ("param_names", "fisher_type", "count", "diagonal"),
    "woodfisher": ("param_names", "fisher_type", "count", "blocks", "examples", "max_full_elements", "rows", "signs"),
    "cg": ("param_names", "count", "product", "max_iter", "rtol", "warm_start", "on_negative_curvature"),
}
#: a curvature's factors, diagonals and eigenvalues are >= 0 up to this fraction of their largest magnitude
NEGATIVE_TOLERANCE = 1e-4


def _check_structure(state: Mapping[str, Any], source: str) -> None:
    """The entries the backend reads are there, its tensors are floating-point, its statistics are not negative."""
    backend = state.get("backend")
    missing = [key for key in REQUIRED_KEYS.get(str(backend), ()) if key not in state]
    if missing:
        raise UserInputError(f"{source} lacks {', '.join(repr(k) for k in missing)} of a {backend!r} curvature state "
                             f"(an older or incomplete file); {_RESAVE}")
    for where, leaf in _walk(state):
        if isinstance(leaf, Tensor) and leaf.dim() >= 1 and not leaf.is_floating_point():
            raise UserInputError(f"{source}: {where!r} holds {str(leaf.dtype).replace('torch.', '')} values, but "
                                 f"curvature statistics are floating-point (an edited file?); {_RESAVE}")
    count = state.get("count")
    if count is not None and not (float(count) > 0 if isinstance(count, (int, float, Tensor)) else False):
        raise UserInputError(f"{source}: its example count is {count!r}, not a positive number; {_RESAVE}")

    def nonnegative(where: str, values: Any, diagonal: bool) -> None:
        if not isinstance(values, Tensor) or not values.numel():
            return
        if diagonal and values.dim() >= 2:
            values = values.diagonal(dim1=-2, dim2=-1)
        low, top = float(values.min()), float(values.abs().max())
        if low < -NEGATIVE_TOLERANCE * top:
            raise UserInputError(f"{source}: {where!r} has negative curvature (smallest value {low:.3g}); Fisher and "
                                 f"Gauss-Newton statistics are positive semi-definite, so the file is damaged or was "
                                 f"edited; {_RESAVE}")

    if backend == "kfac":
        layers = state.get("layers")
        if not isinstance(layers, Mapping):
            raise UserInputError(f"{source}: 'layers' is a {type(layers).__name__}, not the per-layer factors; "
                                 f"{_RESAVE}")
        for name, entry in layers.items():
            eigen = entry.get("eigen") if isinstance(entry, Mapping) else None
            if not isinstance(entry, Mapping) or "a_count" not in entry or not (
                    isinstance(eigen, (list, tuple)) and len(eigen) == 4):
                raise UserInputError(f"{source}: the factors of layer {name!r} are incomplete (an entry with a_count "
                                     f"and the 4 parts of eigen is expected); {_RESAVE}")
            for key in ("A", "G"):
                nonnegative(f"layers/{name}/{key}", entry.get(key), diagonal=True)
            for i in (1, 3):
                nonnegative(f"layers/{name}/eigen/{i}", eigen[i], diagonal=False)
            nonnegative(f"layers/{name}/corrected", entry.get("corrected"), diagonal=False)
    elif backend == "diagonal" and isinstance(state.get("diagonal"), Mapping):
        for name, values in state["diagonal"].items():
            nonnegative(f"diagonal/{name}", values, diagonal=False)


def _check_sizes(state: Mapping[str, Any], model: nn.Module, names: list[str], source: str) -> None:
    """Every stored factor or diagonal has the size this model's parameter needs (whatever the header says)."""
    from .curvature.layers import is_conv1d

    params = dict(model.named_parameters())
    fix = (f"the shapes recorded in its header do not match its tensors (a damaged or edited file); use the "
           f"file as save_curvature wrote it, or {_RESAVE}")

    def expect(where: str, tensor: Any, shapes: list[tuple[int, ...]], what: str) -> None:
        if isinstance(tensor, Tensor) and tuple(tensor.shape) not in shapes:
            raise UserInputError(f"{source}: {where!r} has shape {tuple(tensor.shape)}, but {what} needs "
                                 f"{' or '.join(str(s) for s in shapes)}; {fix}")

    if state.get("backend") == "kfac":
        for name, entry in state["layers"].items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                continue
            weight = getattr(module, "weight", None)
            if weight is None or weight.dim() != 2:
                continue
            d_in, d_out = weight.shape if is_conv1d(module) else (weight.shape[1], weight.shape[0])
            d_in += int(f"{name}.bias" in names)
            what = f"layer {name!r} of this model ({d_in} inputs with the bias, {d_out} outputs)"
            expect(f"layers/{name}/A", entry.get("A"), [(d_in, d_in)], what)
            expect(f"layers/{name}/eigen/0", entry["eigen"][0], [(d_in, d_in)], what)
            expect(f"layers/{name}/eigen/1", entry["eigen"][1], [(d_in,)], what)
            expect(f"layers/{name}/eigen/3", entry["eigen"][3], [(d_out,)], what)
            expect(f"layers/{name}/corrected", entry.get("corrected"), [(d_out, d_in)], what)
            g = entry.get("G") if entry.get("G") is not None else entry["eigen"][2]
            if isinstance(g, Tensor):
                blocks = [(d_out, d_out), (d_out,)] + [(d_out // b, b, b) for b in range(1, d_out + 1)
                                                       if d_out % b == 0]
                expect(f"layers/{name}/G", g, blocks, what)
    elif state.get("backend") == "diagonal" and isinstance(state.get("diagonal"), Mapping):
        for name, values in state["diagonal"].items():
            if name in params:
                expect(f"diagonal/{name}", values, [tuple(params[name].shape)], f"parameter {name!r}")
    elif state.get("backend") == "woodfisher" and isinstance(state.get("rows"), Mapping):
        for name, rows in state["rows"].items():
            if name in params and isinstance(rows, Tensor) and rows.dim() == 2:
                expect(f"rows/{name}", rows, [(rows.shape[0], params[name].numel())], f"parameter {name!r}")


def _fingerprints(model: nn.Module, names: list[str]) -> set[str]:
    """This model's fingerprint, and the same with every tracked parameter in one other floating dtype (a
    checkpoint of the same model loaded in bf16, fp16, fp32 or fp64 fits)."""
    found = {model_fingerprint(model, names)}
    params = dict(model.named_parameters())
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        digest = hashlib.sha256()
        for n in names:
            p = params.get(n)
            digest.update(f"{n}:{tuple(p.shape) if p is not None else None}:{dtype if p is not None else None};"
                          .encode())
        found.add(digest.hexdigest())
    return found


def _check_weights(header: Mapping[str, Any], model: nn.Module, source: str) -> None:
    saved = header.get("weights_sample") or {}
    if not isinstance(saved, Mapping):
        raise UserInputError(f"{source}: its weights sample is malformed; {_RESAVE}")
    here = weights_sample(model, [n for n in saved if isinstance(n, str)])
    for name, values in here.items():
        old = saved[name]
        if not isinstance(old, list) or len(old) != len(values):
            raise UserInputError(f"{source}: its weights sample of {name!r} is malformed; {_RESAVE}")
        a, b = torch.tensor(old, dtype=torch.float64), torch.tensor(values, dtype=torch.float64)
        gap = float((a - b).norm() / b.norm().clamp_min(1e-12))
        if not gap <= WEIGHTS_TOLERANCE:
            raise UserInputError(
                f"{source} was computed on other weights: parameter {name!r} has the same shape but other values "
                f"(relative difference {gap:.2g} over {len(values)} sampled values; another training or checkpoint of "
                f"this architecture?); use the curvature of this model ({_RESAVE.split(' from ')[0]}), or, to use "
                "curvature of other weights on purpose (e.g. the base model's for a fine-tuned one), load it with "
                "load_curvature_state(..., check_weights=False)")


def check_curvature_state(
    state: Mapping[str, Any],
    header: Mapping[str, Any] | None = None,
    *,
    model: nn.Module | None = None,
    backend: str | None = None,
    world_size: int | None = None,
    source: str = "the curvature checkpoint",
    check_weights: bool = True,
) -> None:
    """Raise `UserInputError` naming the problem when `state` holds NaN/inf, is of another backend than `backend`,
    lacks entries its backend reads, holds non-float or negative statistics, covers parameters `model` lacks or
    shapes it differs in (in the header or in the tensors themselves), carries a model fingerprint that is not
    `model`'s, was computed on other weights of the same shapes (unless `check_weights=False`), or is one rank's
    share saved with another `world_size` (default: the processes of the current process group, 1 without one).
    `header`: the file's recorded shapes, fingerprint, weights sample, world size and scope (none for older
    files)."""
    header = dict(header or {})
    if world_size is None:
        dist = torch.distributed
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    for where, leaf in _walk(state):
        bad = (isinstance(leaf, Tensor) and (leaf.is_floating_point() or leaf.is_complex())
               and not bool(torch.isfinite(leaf).all()))
        if bad or (isinstance(leaf, float) and not math.isfinite(leaf)):
            raise UserInputError(f"{source} holds NaN/inf in {where!r}: its statistics are unusable; {_RESAVE}")
    saved_backend = state.get("backend")
    if backend is not None:
        from .curvature.registry import BACKEND_ALIASES

        wanted = BACKEND_ALIASES.get(backend, backend)
        if saved_backend != wanted:
            raise UserInputError(
                f"{source} holds a {saved_backend!r} curvature, but curvature={backend!r} was asked for; set"
                f" curvature={saved_backend!r} to use it, or re-create the checkpoint with the {wanted!r} backend"
            )
    _check_structure(state, source)
    scope, saved_world = header.get("scope", "full"), int(header.get("world_size", 1))
    if scope not in SCOPES:
        raise UserInputError(f"{source}: unknown scope {scope!r} (expected one of {SCOPES}); {_RESAVE}")
    if scope == "rank" and world_size is not None and saved_world != int(world_size):
        raise UserInputError(f"{source} holds one process's share of a run with world size {saved_world}, but this"
                             f" run has {world_size} processes; use the same number of processes, or save the"
                             " reduced (full) state")
    if model is None:
        return
    names = [str(n) for n in header.get("param_names") or state.get("param_names") or []]
    shapes = header.get("param_shapes") or {}
    params = dict(model.named_parameters())
    for name in names:
        if name not in params:
            raise UserInputError(f"{source} was saved from another model: it covers parameter {name!r}, which this"
                                 f" model does not have; use the model it was saved from, or {_RESAVE}")
        if name in shapes and tuple(shapes[name]) != tuple(params[name].shape):
            raise UserInputError(
                f"{source} was saved from another model: parameter {name!r} has shape {tuple(shapes[name])} in the"
                f" checkpoint but {tuple(params[name].shape)} in this model (another width or architecture); use the"
                f" model it was saved from, or {_RESAVE}"
            )
    _check_sizes(state, model, names, source)
    fingerprint = header.get("model_fingerprint")
    if fingerprint and names and fingerprint not in _fingerprints(model, names):
        raise UserInputError(f"{source}: its model fingerprint does not match this model's (the names, shapes and "
                             "dtypes of the tracked parameters agree with the header, the fingerprint does not: a "
                             f"damaged or edited header); {_RESAVE}")
    if check_weights:
        _check_weights(header, model, source)


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
        raise UserInputError(f"curvature checkpoint {str(path)!r} is empty (an interrupted copy?); {_RESAVE}")
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
