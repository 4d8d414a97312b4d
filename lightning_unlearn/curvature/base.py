"""The one protocol every curvature backend follows.

    curvature = KFAC(model, objective=CrossEntropyObjective(), reduce=strategy_all_reduce_sum)
    for batch in curvature_batches:
        curvature.accumulate(batch)          # statistics from this process's batches (sums + counts)
    curvature.finalize()                     # sums across processes via `reduce`, then decompositions
    direction = curvature.apply(grad, damping=1e-3, power=-1.0)   # (C + λI)^p v

Vectors are dicts `parameter name -> tensor of that parameter's shape`, with exactly the parameters the
backend covers (`curvature.param_names`). Backends keep *unnormalised sums* and the number of positions or
examples they came from, so statistics from batches and from processes add up (`reduce` sums a tensor
across processes, in place or not, identity by default; `gather` concatenates along dim 0, for backends
that keep per-example rows). Every call of `reduce`/`gather` happens in the same order on every process.
A finalized curvature has a `state_dict()`, so one saved at the end of training serves later requests.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserInputError
from .layers import unwrap_model
from .objective import CrossEntropyObjective, Objective, Positions, model_logits, position_keys

Vector = dict[str, Tensor]
Reduce = Callable[[Tensor], Tensor]

#: how `apply` reads its `damping`: "relative" (ρ, a multiple of each block's mean eigenvalue: scale-free, the
#: default of the methods) or "absolute" (λ itself, the same for every block)
DAMPING_MODES = ("relative", "absolute")


def identity(tensor: Tensor) -> Tensor:
    """The single-process reduction."""
    return tensor


def is_shard(tensor: Tensor) -> bool:
    """Whether `tensor` is one process's shard of a parameter split across processes (an FSDP2 `DTensor`)."""
    return "DTensor" in (type(tensor).__name__, type(tensor.data).__name__)


def whole(reduction: Tensor) -> Tensor:
    """A reduction (sum, max, all, ...) of a tensor over all its entries, across the processes that hold its shards:
    on an FSDP2 `DTensor` the reduction is a partial one, each process's own value (`float()` of it reads this
    process's shard only), so it is completed here (an all-reduce: every process must call it, as they do, in the same
    order); a plain tensor's unchanged. What every process must decide alike (the trust region, a finite check) reads
    it."""
    return reduction.full_tensor() if is_shard(reduction) else reduction


def check_finite(what: str, tensor: Tensor) -> None:
    """Raise `FloatingPointError` naming `what` when `tensor` holds NaN or inf."""
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(
            f"non-finite values (NaN/inf) in the curvature statistics of {what}; check the model's outputs and"
            " the batch (e.g. lower the learning rate that produced these weights, or use float32)"
        )


def check_damping(damping: float) -> float:
    damping = float(damping)
    if not math.isfinite(damping) or damping <= 0:
        raise ValueError(f"damping must be a finite number > 0, got {damping}; typical values are 1e-4 to 1e-1")
    return damping


def check_damping_mode(mode: str) -> str:
    if mode not in DAMPING_MODES:
        raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {mode!r}; 'relative' (the default) reads "
                         "damping as a multiple of each layer's mean curvature eigenvalue, 'absolute' as λ itself")
    return mode


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily put `model` in eval mode (no dropout: curvature and losses of a fixed function); restores each
    submodule's own flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


#: the fix for a model whose forward checkpoints its blocks with `use_reentrant=True`
REENTRANT_FIX = (
    "the model's forward runs these modules under torch.no_grad, which is what activation checkpointing with "
    "torch.utils.checkpoint.checkpoint(..., use_reentrant=True) does: autograd.grad then cannot reach their "
    "parameters, so their curvature and gradient would be missing (a step on the other layers only); checkpoint "
    "with use_reentrant=False, or use Hugging Face's model.gradient_checkpointing_enable(), which is off in eval mode "
    "where the curvature and the gradients are computed (or remove the torch.no_grad from the forward)"
)


def _graph_has_reentrant_checkpoint(loss: Tensor) -> bool:
    """Whether the autograd graph of `loss` holds a node of reentrant activation checkpointing."""
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if "CheckpointFunction" in type(node).__name__:
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def checked_grad(what: str, outputs: Tensor | Sequence[Tensor], inputs: Sequence[Tensor],
                 **kwargs: Any) -> tuple[Tensor | None, ...]:
    """`torch.autograd.grad(outputs, inputs, **kwargs)`, with torch's error about reentrant activation checkpointing
    turned into a `UserInputError` naming the fix (`what`: who asks, for the message)."""
    try:
        return torch.autograd.grad(outputs, inputs, **kwargs)
    except RuntimeError as err:
        if "use_reentrant" not in str(err) and "Checkpointing is not compatible" not in str(err):
            raise
        raise UserInputError(f"{what}: the model checkpoints activations with use_reentrant=True inside its forward; "
                             f"{REENTRANT_FIX}") from err


def gradient(model: nn.Module, loss: Tensor, names: Iterable[str]) -> Vector:
    """d loss / d θ for the named parameters, as a vector dict (does not touch `.grad`).

    A parameter the loss does not depend on gets zeros (its step is zero); a `UserInputError` when the graph shows
    reentrant activation checkpointing, which hides parameters from `autograd.grad` (their zeros would be wrong)."""
    params = dict(model.named_parameters())
    names = list(names)
    grads = checked_grad("gradient", loss, [params[n] for n in names], allow_unused=True)
    missing = [n for n, g in zip(names, grads) if g is None]
    if missing and _graph_has_reentrant_checkpoint(loss):
        raise UserInputError(f"gradient: parameters {missing[:3]} get no gradient through the model's reentrant "
                             f"activation checkpointing; {REENTRANT_FIX}")
    return {n: (torch.zeros_like(params[n]) if g is None else g.detach()) for n, g in zip(names, grads)}


class Curvature(ABC):
    """Base of every backend: statistics from batches -> finalize -> apply `(C + λI)^p`.

    Subclasses implement `_accumulate`, `_finalize`, `_apply`, `_state`, `_load_state` and `memory_footprint`,
    and set `param_names` in their constructor. `seed` fixes the Monte-Carlo labels (`sample_targets`): they are a
    function of the seed and the example only, so any split of the data over processes and batches gives the same
    curvature; it is recorded in `state_dict()`.
    """

    name: str = "curvature"
    #: powers `apply` accepts; `None` means any real power
    supported_powers: tuple[float, ...] | None = None

    def __init__(
        self,
        model: nn.Module,
        *,
        objective: Objective | None = None,
        reduce: Reduce | None = None,
        gather: Reduce | None = None,
        seed: int = 0,
        temperature: float | None = None,
    ) -> None:
        # the module holding the parameters (no torch.compile or DDP wrapper): its names are the model's own, so a
        # checkpoint of it fits the plain and the compiled model alike, and its forward runs eagerly under the hooks
        self.model = unwrap_model(model)
        if temperature is not None and float(temperature) != 1.0:
            if objective is not None:
                raise ValueError("give either temperature= or objective=, not both (temperature builds the objective)")
            # the curvature of softened predictions (see CrossEntropyObjective): visible on memorised data
            objective = CrossEntropyObjective(temperature=float(temperature))
        self.objective = objective if objective is not None else CrossEntropyObjective()
        self.reduce: Reduce = reduce if reduce is not None else identity
        self.gather: Reduce = gather if gather is not None else identity
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self.param_names: tuple[str, ...] = ()
        self.finalized = False
        self._scales: dict[str, float] | None = None
        self._raw: dict[str, float] | None = None

    # ------------------------------------------------------------------ public protocol
    def accumulate(self, batch: Mapping[str, Tensor]) -> None:
        """Add the statistics of one batch (this process's share)."""
        if self.finalized:
            raise RuntimeError(f"{self.name}: accumulate() after finalize(); call reset() to start new statistics")
        self._accumulate(batch)

    def finalize(self) -> Curvature:
        """Reduce the sums across processes and prepare `apply` (decompositions). Returns self."""
        if self.finalized:
            raise RuntimeError(f"{self.name}: finalize() called twice; call reset() and accumulate again")
        self._finalize()
        self.finalized = True
        self._scales = self._raw = None
        return self

    def fit(self, batches: Iterable[Mapping[str, Tensor]]) -> Curvature:
        """Accumulate `batches` in eval mode, finalize, then run the backend's post-processing on the same batches
        (e.g. K-FAC's EK-FAC eigenvalue correction when it was asked for). Every driver fits through here."""
        batches = list(batches)
        with torch.enable_grad(), eval_mode(self.model):
            for batch in batches:
                self.accumulate(batch)
            self.finalize()
            self._after_fit(batches)
        return self

    def _after_fit(self, batches: list[Mapping[str, Tensor]]) -> None:
        """Hook after `fit` has finalized (batches: the ones just accumulated)."""
        return None

    def apply(self, vector: Mapping[str, Tensor], damping: float, power: float = -1.0, *,
              mode: str = "absolute") -> Vector:
        """`(C + λI)^power v` for a parameter-shaped `vector` (dict name -> tensor).

        `mode="absolute"`: λ = `damping` everywhere. `mode="relative"`: λ = `damping` × the block's mean
        eigenvalue (`damping_scales()`), so the same `damping` means the same thing for every layer and model
        (scaling the loss by a constant scales C and the gradient alike and leaves the Newton direction unchanged).
        """
        block_damping = self._checked_damping(damping, power, mode, [vector])
        return self._apply(dict(vector), block_damping, float(power))

    def apply_many(self, vectors: Sequence[Mapping[str, Tensor]], damping: float, power: float = -1.0, *,
                   mode: str = "absolute") -> list[Vector]:
        """`apply` to each of `vectors` (the same λ): one call for the k + 1 solves of a protected Newton step. A
        backend with a batched form (`_apply_many`: K-FAC) computes them together, the others one by one."""
        block_damping = self._checked_damping(damping, power, mode, vectors)
        batched = getattr(self, "_apply_many", None)
        if batched is None:
            return [self._apply(dict(v), block_damping, float(power)) for v in vectors]
        return batched([dict(v) for v in vectors], block_damping, float(power))

    def _checked_damping(self, damping: float, power: float, mode: str,
                         vectors: Sequence[Mapping[str, Tensor]]) -> Callable[[str], float]:
        """The checks of `apply` (damping, mode, finalized, power, the vectors' names and shapes); returns λ per
        block key (`damping`, or `damping` × the block's scale with `mode="relative"`)."""
        damping = check_damping(damping)
        check_damping_mode(mode)
        if not self.finalized:
            raise RuntimeError(f"{self.name}: apply() before finalize(); accumulate batches, then call finalize()")
        if self.supported_powers is not None and not any(math.isclose(power, p) for p in self.supported_powers):
            raise ValueError(f"{self.name} supports power in {self.supported_powers}, got {power}")
        for vector in vectors:
            self.check_vector(vector)
        if mode == "absolute":
            return lambda block: damping
        scales = self.damping_scales()
        return lambda block: damping * scales[block]

    def inverse(self, vector: Mapping[str, Tensor], damping: float, *, mode: str = "absolute") -> Vector:
        """`(C + λI)^-1 v`: the Newton direction for gradient `v`."""
        return self.apply(vector, damping, -1.0, mode=mode)

    def damping_scales(self) -> dict[str, float]:
        """Each block's curvature scale (its mean eigenvalue, see the backend), the unit of relative damping.

        A block whose scale is 0 (no curvature seen) gets 1e-6 × the median block's, so the step there stays finite;
        the median, not the mean, so that one block of outsized curvature does not floor every other block (and so
        flatten their steps). Cached until the statistics change.
        """
        if not self.finalized:
            raise RuntimeError(f"{self.name}: damping_scales() before finalize(); accumulate batches, then finalize()")
        if self._scales is None:
            raw = self._raw_scales()
            positive = [v for v in raw.values() if math.isfinite(v) and v > 0]
            floor = 1e-6 * (statistics.median(positive) if positive else 1.0)
            self._scales = {k: (v if math.isfinite(v) and v > floor else floor) for k, v in raw.items()}
        return self._scales

    def _raw_scales(self) -> dict[str, float]:
        """`_damping_scales()` as floats, computed once per statistics (the Hessian-free backend's cost products)."""
        if self._raw is None:
            self._raw = {k: float(v) for k, v in self._damping_scales().items()}
        return self._raw

    def uncurved_parameters(self) -> tuple[str, ...]:
        """The parameters of the blocks that saw no curvature at all (scale exactly 0: their outputs' gradients were
        zero on every curvature example, as for LoRA's A while its B is still zero) where other blocks saw some;
        empty when every block or none did. Relative damping gives such a block the floor of `damping_scales`, so
        its Newton direction is its gradient over 1e-6 × a typical block's scale: once its gradient is not zero, a
        step dominated by a block the curvature knows nothing about (`docs/recipe.md` §1). The default recipe leaves
        these parameters in place. A fused mixture-of-experts parameter is named per expert, `name[expert]`
        (`layers.split_label`): an expert the router sent no curvature token to has none."""
        if not self.finalized:
            raise RuntimeError(f"{self.name}: uncurved_parameters() before finalize(); accumulate batches, then "
                               "finalize()")
        raw = self._raw_scales()
        if not any(math.isfinite(v) and v > 0 for v in raw.values()):
            return ()
        blocks = self._block_parameters()
        return tuple(n for key, v in raw.items() if v == 0.0 for n in blocks.get(key, ()))

    def _block_parameters(self) -> dict[str, tuple[str, ...]]:
        """Block key (of `_damping_scales`) -> the parameter names of that block; here one block of every parameter
        (backends with several blocks override it)."""
        return {key: tuple(self.param_names) for key in self._raw_scales()}

    def quadratic(self, vector: Mapping[str, Tensor]) -> float:
        """`vᵀ C v` (no damping): ½ of it is the curvature's prediction of the loss increase of a step `v`."""
        if not self.finalized:
            raise RuntimeError(f"{self.name}: quadratic() before finalize(); accumulate batches, then finalize()")
        self.check_vector(vector)
        return float(self._quadratic(dict(vector)))

    def reset(self) -> None:
        """Forget all statistics (keeps the configuration)."""
        self.finalized = False
        self._scales = self._raw = None
        self._reset()

    def check_vector(self, vector: Mapping[str, Tensor]) -> None:
        """Raise naming the problem when `vector` does not have exactly this backend's parameters and shapes."""
        params = dict(self.model.named_parameters())
        missing = [n for n in self.param_names if n not in vector]
        extra = [n for n in vector if n not in self.param_names]
        if missing or extra:
            raise ValueError(
                f"{self.name}: vector keys do not match the curvature's parameters (missing {missing[:3]}"
                f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''});"
                " select them with {n: v[n] for n in curvature.param_names}"
            )
        for n in self.param_names:
            if tuple(vector[n].shape) != tuple(params[n].shape):
                raise ValueError(
                    f"{self.name}: vector[{n!r}] has shape {tuple(vector[n].shape)}, the parameter has "
                    f"{tuple(params[n].shape)}; pass tensors shaped like the parameters"
                )

    def logits(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The model's logits on `batch` (see `objective.model_logits`).

        With gradients on, a `UserInputError` when a module holding a covered parameter runs with gradients off
        inside the forward (reentrant activation checkpointing): its parameters would get no curvature and no
        gradient, and the step would move the other layers only."""
        if not torch.is_grad_enabled():
            return model_logits(self.model, batch)
        without_grad: list[str] = []

        def check(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any) -> None:
                if not torch.is_grad_enabled() and name not in without_grad:
                    without_grad.append(name)
            return hook

        handles = [module.register_forward_pre_hook(check(name)) for name, module in self._owner_modules()]
        try:
            logits = model_logits(self.model, batch)
        finally:
            for handle in handles:
                handle.remove()
        if without_grad:
            raise UserInputError(f"{self.name}: the modules {without_grad[:3]}{' ...' if len(without_grad) > 3 else ''}"
                                 f" ran without gradients inside the model's forward; {REENTRANT_FIX}")
        return logits

    def _owner_modules(self) -> list[tuple[str, nn.Module]]:
        """The modules that directly hold a covered parameter (`param_names`), in module order; found once per set of
        names (every forward of a fit asks)."""
        cached = getattr(self, "_owners", None)
        if cached is not None and cached[0] == self.param_names:
            return cached[1]
        owners = self._find_owner_modules()
        self._owners = (self.param_names, owners)
        return owners

    def _find_owner_modules(self) -> list[tuple[str, nn.Module]]:
        names = set(self.param_names)
        covered = {id(p) for n, p in self.model.named_parameters() if n in names}
        return [(name, module) for name, module in self.model.named_modules()
                if any(id(p) in covered for p in module.parameters(recurse=False))]

    def sample_targets(self, pos: Positions, batch: Mapping[str, Tensor], draw: int = 0) -> Tensor:
        """Labels for the valid positions `pos` of `batch` drawn from the model (the Monte-Carlo Fisher), keyed by
        (`seed`, example, position, `draw`): the same labels on 1 or N processes, in any batching or order."""
        keys = position_keys(batch, pos.mask, self.seed, draw)
        return self.objective.sample_targets(pos.outputs, keys=keys).to(pos.outputs.device)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to `apply` later: statistics, counts, configuration."""
        if not self.finalized:
            raise RuntimeError(f"{self.name}: state_dict() before finalize(); finalize first")
        return {"backend": self.name, "param_names": list(self.param_names), "seed": self.seed, **self._state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a finalized curvature saved with `state_dict()` (for the same model architecture)."""
        if state.get("backend") != self.name:
            raise ValueError(f"state_dict is for backend {state.get('backend')!r}, not {self.name!r}")
        if list(state["param_names"]) != list(self.param_names):
            raise ValueError(f"{self.name}: saved curvature covers other parameters than this model's tracked ones")
        self._load_state(state)
        self.seed = int(state.get("seed", self.seed))  # files from before the seed was recorded keep the argument
        self.finalized = True
        self._scales = self._raw = None

    def subtract(self, other: Curvature) -> Curvature:
        """Remove `other`'s data from this curvature, in place: `C = (n C - n_o C_o) / (n - n_o)`, kept PSD.

        This is the `full_minus_forget` source: `self` accumulated over the whole training data (a curvature
        checkpoint), `other` over the forget set; the result approximates the retain curvature.
        """
        if not (self.finalized and other.finalized):
            raise RuntimeError("subtract() needs two finalized curvatures; call finalize() on both")
        if type(other) is not type(self) or list(other.param_names) != list(self.param_names):
            raise ValueError(f"cannot subtract a {other.name} curvature over other parameters from a {self.name} one")
        self._subtract(other)
        self._scales = self._raw = None
        return self

    def _subtract(self, other: Curvature) -> None:
        raise NotImplementedError(f"{self.name} does not support subtract() (full_minus_forget)")

    @abstractmethod
    def memory_footprint(self) -> dict[str, int]:
        """Bytes held by the curvature state, by part, with a `total` key."""

    # ------------------------------------------------------------------ backend hooks
    @abstractmethod
    def _accumulate(self, batch: Mapping[str, Tensor]) -> None: ...

    @abstractmethod
    def _finalize(self) -> None: ...

    @abstractmethod
    def _apply(self, vector: Vector, damping: Callable[[str], float], power: float) -> Vector:
        """`(C + λ_b I)^power v`, with `damping(block)` the λ of each block (a key of `_damping_scales()`)."""

    @abstractmethod
    def _damping_scales(self) -> dict[str, float]:
        """Block key -> the block's mean curvature eigenvalue (the unit of relative damping)."""

    @abstractmethod
    def _quadratic(self, vector: Vector) -> float:
        """`vᵀ C v`."""

    @abstractmethod
    def _reset(self) -> None: ...

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load_state(self, state: Mapping[str, Any]) -> None: ...


def tensor_bytes(*tensors: Tensor | None) -> int:
    """Bytes of the given tensors (None ignored)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def clone_curvature(curvature: Curvature) -> Curvature:
    """A deep copy of a curvature's statistics that shares the model and the reduce/gather functions."""
    memo: dict[int, Any] = {id(curvature.model): curvature.model}
    for attr in ("reduce", "gather", "objective"):
        value = getattr(curvature, attr, None)
        if value is not None:
            memo[id(value)] = value
    return copy.deepcopy(curvature, memo)
