"""The checks of a curvature checkpoint before it is used (`checkpoint.load_curvature_state`): finite values, the
backend's entries, PSD statistics, and that it fits this model (names, shapes, fingerprint, a sample of the
weights); every refusal is a `UserInputError` naming the file and the fix. Also the model's identity recorded with a
curvature (`param_shapes`, `model_fingerprint`, `weights_sample`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .curvature.base import is_shard
from .curvature.layers import unwrap_model
from .errors import UserInputError

#: `scope` of a checkpoint: the reduced state of all processes (any world size may load it), or one rank's share
SCOPES = ("full", "rank")

RESAVE_HINT = ("re-create it with lightning_unlearn.checkpoint.save_curvature(curvature, path) (or CurvatureCallback("
               "path=...)) from a finalized curvature of this model")


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
#: relative difference (L2) of all sampled values together above which the weights are another model's: above
#: bf16/fp16 rounding of the same weights (about 4e-3) and what earlier deletion requests served from the same
#: checkpoint move them (the trust region bounds a step at the weights' own norm; one default request on the README's
#: drop-in example moves the sample by 0.25, one bias near zero alone by 0.50 of its norm), below two trainings or
#: initialisations of one architecture (about 1.4)
WEIGHTS_TOLERANCE = 0.5


def weights_sample(model: nn.Module, names: list[str] | tuple[str, ...]) -> dict[str, list[float]]:
    """`WEIGHTS_SAMPLE` evenly spaced values of each tracked parameter (as float32 numbers): recorded next to a
    curvature so that a checkpoint of another model with the same names and shapes is told apart at load time.
    Parameters split across processes (FSDP2 `DTensor`s) or without data (meta) are left out."""
    params = dict(model.named_parameters())
    out: dict[str, list[float]] = {}
    for n in names:
        p = params.get(n)
        if p is None or p.is_meta or not p.numel() or is_shard(p):
            continue
        flat = p.detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, min(WEIGHTS_SAMPLE, flat.numel())).round().long()
        out[n] = [float(v) for v in flat[index.to(flat.device)].float().cpu()]
    return out


def walk_state(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) of every leaf of a nested state."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from walk_state(v, f"{where}/{k}" if where else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from walk_state(v, f"{where}/{i}")
    else:
        yield where, node


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
                             f"(an older or incomplete file); {RESAVE_HINT}")
    for where, leaf in walk_state(state):
        if isinstance(leaf, Tensor) and leaf.dim() >= 1 and not leaf.is_floating_point():
            raise UserInputError(f"{source}: {where!r} holds {str(leaf.dtype).replace('torch.', '')} values, but "
                                 f"curvature statistics are floating-point (an edited file?); {RESAVE_HINT}")
    count = state.get("count")
    if count is not None and not (float(count) > 0 if isinstance(count, (int, float, Tensor)) else False):
        raise UserInputError(f"{source}: its example count is {count!r}, not a positive number; {RESAVE_HINT}")

    def nonnegative(where: str, values: Any, diagonal: bool) -> None:
        if not isinstance(values, Tensor) or not values.numel():
            return
        if diagonal and values.dim() >= 2:
            values = values.diagonal(dim1=-2, dim2=-1)
        low, top = float(values.min()), float(values.abs().max())
        if low < -NEGATIVE_TOLERANCE * top:
            raise UserInputError(f"{source}: {where!r} has negative curvature (smallest value {low:.3g}); Fisher and "
                                 f"Gauss-Newton statistics are positive semi-definite, so the file is damaged or was "
                                 f"edited; {RESAVE_HINT}")

    if backend == "kfac":
        layers = state.get("layers")
        if not isinstance(layers, Mapping):
            raise UserInputError(f"{source}: 'layers' is a {type(layers).__name__}, not the per-layer factors; "
                                 f"{RESAVE_HINT}")
        for name, entry in layers.items():
            eigen = entry.get("eigen") if isinstance(entry, Mapping) else None
            if not isinstance(entry, Mapping) or "a_count" not in entry or not (
                    isinstance(eigen, (list, tuple)) and len(eigen) == 4):
                raise UserInputError(f"{source}: the factors of layer {name!r} are incomplete (an entry with a_count "
                                     f"and the 4 parts of eigen is expected); {RESAVE_HINT}")
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
           f"file as save_curvature wrote it, or {RESAVE_HINT}")

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
        raise UserInputError(f"{source}: its weights sample is malformed; {RESAVE_HINT}")
    here = weights_sample(model, [n for n in saved if isinstance(n, str)])
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    for name, values in here.items():
        old = saved[name]
        if not isinstance(old, list) or len(old) != len(values):
            raise UserInputError(f"{source}: its weights sample of {name!r} is malformed; {RESAVE_HINT}")
        pairs[name] = (torch.tensor(old, dtype=torch.float64), torch.tensor(values, dtype=torch.float64))
    if not pairs:
        return
    # the whole sample decides, not one parameter: a small-norm tensor (a bias near zero) moves by a large share of
    # its own norm under one deletion request, while another training moves every matrix by about its norm
    a, b = (torch.cat([pair[i] for pair in pairs.values()]) for i in (0, 1))
    gap = float((a - b).norm() / b.norm().clamp_min(1e-12))
    if not gap <= WEIGHTS_TOLERANCE:
        name = max(pairs, key=lambda n: float((pairs[n][0] - pairs[n][1]).norm()))
        raise UserInputError(
            f"{source} was computed on other weights: the tracked parameters have the same shapes but other "
            f"values (relative difference {gap:.2g} over {len(a)} sampled values, most in {name!r}; another "
            f"training or checkpoint of this architecture?); use the curvature of this model "
            f"({RESAVE_HINT.split(' from ')[0]}), or, to use curvature of other weights on purpose (e.g. the base "
            "model's for a fine-tuned one), load it with "
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
    model = unwrap_model(model) if model is not None else None  # the names a curvature of it carries
    if world_size is None:
        dist = torch.distributed
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    for where, leaf in walk_state(state):
        bad = (isinstance(leaf, Tensor) and (leaf.is_floating_point() or leaf.is_complex())
               and not bool(torch.isfinite(leaf).all()))
        if bad or (isinstance(leaf, float) and not math.isfinite(leaf)):
            raise UserInputError(f"{source} holds NaN/inf in {where!r}: its statistics are unusable; {RESAVE_HINT}")
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
        raise UserInputError(f"{source}: unknown scope {scope!r} (expected one of {SCOPES}); {RESAVE_HINT}")
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
                                 f" model does not have; use the model it was saved from, or {RESAVE_HINT}")
        if name in shapes and tuple(shapes[name]) != tuple(params[name].shape):
            raise UserInputError(
                f"{source} was saved from another model: parameter {name!r} has shape {tuple(shapes[name])} in the"
                f" checkpoint but {tuple(params[name].shape)} in this model (another width or architecture); use the"
                f" model it was saved from, or {RESAVE_HINT}"
            )
    _check_sizes(state, model, names, source)
    fingerprint = header.get("model_fingerprint")
    if fingerprint and names and fingerprint not in _fingerprints(model, names):
        raise UserInputError(f"{source}: its model fingerprint does not match this model's (the names, shapes and "
                             "dtypes of the tracked parameters agree with the header, the fingerprint does not: a "
                             f"damaged or edited header); {RESAVE_HINT}")
    if check_weights:
        _check_weights(header, model, source)
