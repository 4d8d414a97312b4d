"""Lightning drivers of the unlearning engine: `CurvatureCallback` and the drop-in `Unlearn` callback.

    trainer = L.Trainer(callbacks=[Unlearn(forget=forget_loader, retain=retain_loader, method="newton",
                                           curvature="kfac", accumulate_every_n_batches=4,
                                           curvature_path="curvature.pt")])
    trainer.fit(my_lightning_module, datamodule=my_data)   # trains, keeps a curvature checkpoint, then unlearns

Thin drivers: every computation is the engine's (`lightning_unlearn.curvature`, `lightning_unlearn.methods`).
This module only decides *when* (cadence, `should_accumulate`, `should_unlearn`), *on what* (the unwrapped model
returned by `model_getter`, batches moved to the module's device, curvature batches sharded across ranks) and
*how statistics meet* (the strategy's all-reduce as the engine's `reduce`). Texts never reach a logger: only
the numbers of each `StepRecord` are logged.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from .checkpoint import CURVATURE_FILE_FORMAT as CURVATURE_FILE_FORMAT  # re-exported: public since the start
from .checkpoint import curvature_header, load_curvature_state, save_curvature
from .curvature import Curvature, Reduce, identity
from .curvature.base import eval_mode
from .curvature.objective import IGNORE_INDEX
from .distributed import agree_on_batches, leave_process_group

CURVATURE_DATA = ("retain", "forget", "full_minus_forget")

ModelGetter = Callable[[pl.LightningModule], nn.Module]
BatchTransform = Callable[[Any], Mapping[str, Tensor]]


class UnsupportedStrategyError(RuntimeError):
    """The trainer's strategy shards the weights, which curvature statistics cannot work with yet."""


# ---------------------------------------------------------------------------------------------- helpers
def check_strategy(strategy: Any, who: str = "lightning-unlearn") -> None:
    """Raise `UnsupportedStrategyError` for strategies that shard parameters (DeepSpeed, FSDP, model parallel).

    Curvature backends read whole weight matrices and their input/output statistics on every process; sharded
    parameters would give each rank a piece of a layer. DDP (any launcher) and single-device strategies work.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    unsupported = (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy)
    try:  # Fabric strategies, when the check runs for a Fabric driver
        from lightning.fabric.strategies import DeepSpeedStrategy as FabricDeepSpeed
        from lightning.fabric.strategies import FSDPStrategy as FabricFSDP
        from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallel

        unsupported += (FabricDeepSpeed, FabricFSDP, FabricModelParallel)
    except ImportError:  # pragma: no cover - older Lightning
        pass
    if isinstance(strategy, unsupported):
        raise UnsupportedStrategyError(
            f"{who} does not support the {type(strategy).__name__} strategy yet: curvature statistics need every"
            " layer's full, unsharded weights on each process. Use strategy='ddp' (or 'ddp_spawn', or a single"
            " device); DeepSpeed and FSDP/model-parallel sharding are not supported for now."
        )


def strategy_reduce(trainer: pl.Trainer) -> Reduce:
    """The engine's `reduce` for this trainer: a sum over processes through the strategy (identity on one)."""
    if trainer.world_size <= 1:
        return identity
    strategy = trainer.strategy

    def reduce(tensor: Tensor) -> Tensor:
        return strategy.reduce(tensor, reduce_op="sum")

    return reduce


def gather_with(all_gather: Callable[[Tensor], Tensor], world_size: int) -> Reduce:
    """The engine's `gather` (concatenate along dim 0 across processes) from an `all_gather` that stacks
    `[world, ...]`; rows may differ in number between processes (padded for the collective, then trimmed)."""
    if world_size <= 1:
        return identity

    def gather(tensor: Tensor) -> Tensor:
        sizes = all_gather(torch.tensor([tensor.shape[0]], device=tensor.device)).reshape(-1).tolist()
        longest = int(max(sizes))
        pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        stacked = all_gather(torch.cat([tensor, pad]).contiguous())
        return torch.cat([stacked[r, : int(n)] for r, n in enumerate(sizes)])

    return gather


def strategy_gather(trainer: pl.Trainer) -> Reduce:
    """The engine's `gather` for this trainer (identity on one process)."""
    return gather_with(trainer.strategy.all_gather, trainer.world_size)


def default_model_getter(pl_module: nn.Module) -> nn.Module:
    """The model inside a LightningModule: its `model` attribute when that is a module, else the module itself."""
    inner = getattr(pl_module, "model", None)
    return inner if isinstance(inner, nn.Module) else pl_module


def default_batch_transform(batch: Any) -> dict[str, Tensor]:
    """A training batch in the project's format (see docs/CONVENTIONS.md).

    Accepts a dict with `input_ids` (labels default to the inputs with padding masked to -100), a tensor of token
    ids, or a `(input_ids, labels)` pair. Anything else needs a `batch_transform`.
    """
    if isinstance(batch, Mapping) and "input_ids" in batch:
        out = {k: v for k, v in batch.items() if isinstance(v, Tensor)}
        if "labels" not in out:
            labels = out["input_ids"].clone()
            if "attention_mask" in out:
                labels[out["attention_mask"] == 0] = IGNORE_INDEX
            out["labels"] = labels
        return out
    if isinstance(batch, Tensor) and not batch.is_floating_point():
        return {"input_ids": batch, "labels": batch}
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
        return {"input_ids": batch[0], "labels": batch[1]}
    raise TypeError(
        f"cannot read a training batch of type {type(batch).__name__} as token ids; give a dict with 'input_ids'"
        " (and optionally 'labels', 'attention_mask'), a LongTensor of ids, an (input_ids, labels) pair, or pass"
        " batch_transform=fn returning such a dict"
    )


def shard(batches: Iterable[Any], rank: int, world_size: int) -> Iterator[Any]:
    """This process's share of `batches` (every world_size-th, from `rank`): curvature sums are then reduced."""
    return itertools.islice(iter(batches), rank, None, world_size) if world_size > 1 else iter(batches)


def share(batches: list[Any], rank: int, world_size: int) -> list[Any]:
    """This process's share of a list of batches for the engine, whose sums and counts are reduced across
    processes: every world_size-th batch when each process gets one, else all of them (replicated statistics sum
    to the same means)."""
    return batches[rank::world_size] if world_size > 1 and len(batches) >= world_size else list(batches)


def snapshot(curvature: Curvature) -> Curvature:
    """A copy of a curvature object's statistics that shares the model (finalize or subtract it freely)."""
    model = curvature.model
    memo: dict[int, Any] = {id(m): m for m in model.modules()}
    memo.update({id(p): p for p in model.parameters()})
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(curvature, memo)


def _cpu(obj: Any) -> Any:
    return move_data_to_device(obj, torch.device("cpu"))


def _build_curvature(backend: str, model: nn.Module, **kwargs: Any) -> Curvature:
    from .methods import build_curvature

    return build_curvature(backend, model, **kwargs)


def request_curvature(
    model: nn.Module,
    backend: str,
    curvature_data: str,
    source: list[Mapping[str, Tensor]],
    *,
    full: Curvature | None = None,
    reduce: Reduce = identity,
    gather: Reduce = identity,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
    curvature_kwargs: Mapping[str, Any] | None = None,
) -> Curvature:
    """The finalized curvature for one deletion request, from this process's share of `source` (the retain
    batches for `retain`, the forget batches otherwise; at most `limit`); for `full_minus_forget`, a copy of the
    checkpoint `full` minus the forget curvature (the checkpoint is left as it was). Statistics are summed
    across processes by `reduce`."""
    if curvature_data not in CURVATURE_DATA:
        raise ValueError(f"curvature_data must be one of {CURVATURE_DATA}, got {curvature_data!r}")
    if curvature_data == "full_minus_forget" and (full is None or not full.finalized):
        raise ValueError("curvature_data='full_minus_forget' needs a finalized curvature checkpoint of the training"
                         " data (full_curvature=<file, Lightning checkpoint or Curvature>)")
    if not source:
        raise ValueError(f"curvature_data={curvature_data!r} needs "
                         f"{'retain' if curvature_data == 'retain' else 'forget'} batches to fit the curvature on")
    batches = list(source[:limit] if limit else source)
    curvature = _build_curvature(backend, model, reduce=reduce, gather=gather, **dict(curvature_kwargs or {}))
    fitted = curvature.fit(share(batches, rank, world_size))
    if curvature_data == "full_minus_forget":
        assert full is not None
        return snapshot(full).subtract(fitted)
    return fitted


# ---------------------------------------------------------------------------------------------- callbacks
class ProcessGroupTeardown(Callback):
    """Leave the process group together when a multi-process `fit`/`validate`/`test` ends.

    Lightning leaves the default process group alive after `Trainer.fit`; a worker (`ddp_spawn`) or script that then
    exits while gloo's threads still run can abort with SIGABRT after its work is done. Add this callback to a
    multi-process Trainer whose processes end after the run (the `lightning-unlearn` command does); a later run on
    the same Trainer initialises a new group. Does nothing on one process.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            leave_process_group()


class CurvatureCallback(Callback):
    r"""Gathers curvature statistics of the training data on the batches it is told to, reduces them across
    processes through the strategy, finalizes at the end of training: a *curvature checkpoint*.

    Which batches: every ``every_n_batches``-th training batch from epoch ``start_epoch`` on (at most
    ``max_batches`` per process), as the model trains; and/or the batches of ``dataloader`` at the end of training
    with the final weights (sharded across processes). Override ``should_accumulate()`` for other cadences.

    The statistics run on the unwrapped model (``model_getter(pl_module)``, not the DDP wrapper) in eval mode, so
    they change neither the weights nor ``.grad``. The curvature state is part of ``state_dict()`` and thus of every
    Lightning checkpoint (unfinished statistics are finalized on a copy, on every rank, at checkpoint time); with
    ``path`` it is also written on its own (one safetensors file, atomic: see ``lightning_unlearn.checkpoint``) when
    training ends. Reload it with ``load_curvature_state(path)`` (either file; Lightning checkpoints are read with
    ``weights_only=True``) to serve later deletion requests (``full_minus_forget``).

    Args:
        backend: curvature backend (``kfac``, ``cg``, ``woodfisher``, ``diagonal``).
        every_n_batches: accumulate every k-th training batch; ``None`` for no accumulation during training.
        start_epoch: first epoch that accumulates (statistics closer to the final weights).
        max_batches: cap on the training batches accumulated per process.
        dataloader: batches accumulated at ``on_train_end`` with the final weights.
        path: where to write the finalized curvature on its own.
        model_getter: the ``nn.Module`` inside the LightningModule (default: ``pl_module.model`` or itself).
        batch_transform: turns a training batch into the project's dict format (see ``default_batch_transform``).
        curvature_kwargs: extra arguments of the backend (e.g. ``fisher_type``, ``include``).
    """

    def __init__(
        self,
        backend: str = "kfac",
        *,
        every_n_batches: int | None = 1,
        start_epoch: int = 0,
        max_batches: int | None = None,
        dataloader: Iterable[Any] | None = None,
        path: str | Path | None = None,
        model_getter: ModelGetter | None = None,
        batch_transform: BatchTransform | None = None,
        curvature_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if every_n_batches is not None and every_n_batches < 1:
            raise ValueError(f"every_n_batches must be >= 1 or None (no accumulation in training), got "
                             f"{every_n_batches}")
        self.backend = backend
        self.every_n_batches = every_n_batches
        self.start_epoch = start_epoch
        self.max_batches = max_batches
        self.dataloader = dataloader
        self.path = Path(path) if path is not None else None
        self.model_getter: ModelGetter = model_getter or default_model_getter
        self.batch_transform: BatchTransform = batch_transform or default_batch_transform
        self.curvature_kwargs = dict(curvature_kwargs or {})
        self._curvature: Curvature | None = None
        self._pending_state: dict[str, Any] | None = None
        self.batches_seen = 0

    # ------------------------------------------------------------------ policy
    @property
    def accumulates(self) -> bool:
        """Whether this callback gathers statistics at all (subclasses may switch it off)."""
        return self.every_n_batches is not None or self.dataloader is not None

    def should_accumulate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> bool:
        """Whether this training batch goes into the curvature (called after its optimizer step). Must give the
        same answer on every process; override for another cadence."""
        if self.every_n_batches is None or trainer.current_epoch < self.start_epoch:
            return False
        if self.max_batches is not None and self.batches_seen >= self.max_batches:
            return False
        return batch_idx % self.every_n_batches == 0

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(backend=self.backend, path=str(self.path) if self.path else None)

    @property
    def curvature(self) -> Curvature:
        """The finalized curvature checkpoint."""
        if self._curvature is None or not self._curvature.finalized:
            raise RuntimeError(
                f"{type(self).__name__}: no finalized curvature yet; it is finalized when training ends (or load one"
                " from a checkpoint with load_state_dict / load_curvature_state)"
            )
        return self._curvature

    @property
    def has_curvature(self) -> bool:
        return self._curvature is not None and self._curvature.finalized

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"backend": self.backend, "batches_seen": self.batches_seen, "curvature": None}
        if self._curvature is not None and self._curvature.finalized:
            state["curvature"] = _cpu(self._curvature.state_dict())
        elif self._curvature is not None and self.batches_seen > 0:
            # a checkpoint during training: finalize a copy (collective: every rank dumps the checkpoint)
            state["curvature"] = _cpu(snapshot(self._curvature).finalize().state_dict())
        elif self._pending_state is not None:
            state["curvature"] = self._pending_state
        if state["curvature"] is not None and self._curvature is not None:
            # shapes and fingerprint for load_curvature_state's model check (plain values: weights_only loads them)
            state["curvature_meta"] = curvature_header(self._curvature)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = int(state_dict.get("batches_seen", 0))
        if state_dict.get("curvature") is not None:
            self._pending_state = dict(state_dict["curvature"])
            if self._curvature is not None:
                self._load_pending()

    def _load_pending(self) -> None:
        assert self._curvature is not None and self._pending_state is not None
        self._curvature.load_state_dict(self._pending_state)
        self._pending_state = None

    # ------------------------------------------------------------------ engine plumbing
    def new_curvature(self, trainer: pl.Trainer | None, model: nn.Module) -> Curvature:
        """A fresh backend object on `model` whose reductions go through the trainer's strategy."""
        reduce = strategy_reduce(trainer) if trainer is not None else identity
        gather = strategy_gather(trainer) if trainer is not None else identity
        return _build_curvature(self.backend, model, reduce=reduce, gather=gather, **self.curvature_kwargs)

    def prepare(self, batch: Any, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """A batch in the project's format, on the module's device."""
        return move_data_to_device(dict(self.batch_transform(batch)), pl_module.device)

    def _ensure_curvature(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> Curvature:
        if self._curvature is None:
            self._curvature = self.new_curvature(trainer, self.model_getter(pl_module))
        if self._pending_state is not None:
            self._load_pending()
        return self._curvature

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy, type(self).__name__)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.accumulates or self._pending_state is not None:
            self._ensure_curvature(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.has_curvature or not self.should_accumulate(trainer, pl_module, batch, batch_idx):
            return
        curvature = self._ensure_curvature(trainer, pl_module)
        with torch.enable_grad(), eval_mode(self.model_getter(pl_module)):
            curvature.accumulate(self.prepare(batch, pl_module))
        self.batches_seen += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.finalize(trainer, pl_module)

    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Curvature | None:
        """Accumulate `dataloader` (if any), reduce and finalize, write `path`. Idempotent; None if nothing seen."""
        if self.has_curvature:
            return self._curvature
        if not self.accumulates:
            return None
        curvature = self._ensure_curvature(trainer, pl_module)
        if self.dataloader is not None:
            mine = shard(self.dataloader, trainer.global_rank, trainer.world_size)
            batches = (self.prepare(b, pl_module) for b in mine)
            with torch.enable_grad(), eval_mode(self.model_getter(pl_module)):
                for batch in batches:
                    curvature.accumulate(batch)
                    self.batches_seen += 1
        seen = int(trainer.strategy.reduce(torch.tensor(float(self.batches_seen)), reduce_op="sum"))
        if seen == 0:
            rank_zero_info(f"{type(self).__name__}: no batch was accumulated; no curvature checkpoint written")
            return None
        curvature.finalize()
        if self.path is not None and trainer.is_global_zero:
            save_curvature(curvature, self.path, backend=self.backend, batches=seen, global_step=trainer.global_step,
                           world_size=trainer.world_size)
        trainer.strategy.barrier("CurvatureCallback.finalize")
        return curvature


class Unlearn(CurvatureCallback):
    r"""Drop-in unlearning for an existing ``Trainer.fit`` of any LightningModule whose model yields logits.

    At ``on_train_end`` (or after any training batch where ``should_unlearn()`` says so) the ``forget`` batches are
    unlearned with ``method`` (see ``lightning_unlearn.methods``) on the unwrapped model; every ``StepRecord`` is
    logged through the trainer's loggers under ``unlearn/`` (numbers only, never texts). With
    ``accumulate_every_n_batches`` the callback also keeps a curvature checkpoint of the training data (saved in the
    Lightning checkpoint and, with ``curvature_path``, as its own file) that later requests use with
    ``curvature_data="full_minus_forget"`` and no retain data: ``Unlearn(forget=..., curvature_data=
    "full_minus_forget", full_curvature=path).unlearn(pl_module)``.

    The default recipe of the second-order methods applies unless a knob is set (``damping``, ``scale`` and
    ``steps`` are passed to the method only when given): relative damping, a step-length search, up to 5 steps,
    stopping as soon as the forget set cannot be told from ``holdout`` data (never-trained data of the forget set's
    kind; see ``lightning_unlearn.methods.base`` for the target).
    After each request ``last_summary`` holds the method's ``summary()`` (status, target, losses) and the loggers
    get ``unlearn/status_code`` (0 target_reached, 1 budget_exhausted, 2 nothing_accepted) and ``unlearn/target``.

    Args:
        forget: the forget batches (every process reads all of them and keeps its share; losses and gradients
            are summed across processes, so each takes the same update).
        retain: retain batches (curvature for ``curvature_data="retain"``, and the retain term of some methods);
            curvature batches are sharded across processes and their statistics summed.
        held_retain: a held-out retain batch for the safety check (default: the first retain batch, if any).
        holdout: never-trained batches of the forget set's kind (e.g. the data module's ``holdout`` split,
            labelled like the forget batches): the run aims at the forget set looking like them (sharded like
            ``forget``). Without it (and without ``forget_target`` in ``method_kwargs``) there is no target and
            each step takes the largest step within the retain budget.
        method, curvature, curvature_data, damping, scale, steps, max_retain_increase: see ``build_unlearner``;
            ``None`` (the default for damping, scale, steps) keeps the method's default.
        curvature_batches: at most this many batches for the curvature fit (default: all).
        full_curvature: for ``full_minus_forget``: a curvature file, a Lightning checkpoint, a finalized
            ``Curvature`` or a ``state_dict``; default: this callback's own curvature checkpoint.
        accumulate_every_n_batches, accumulate_from_epoch, max_accumulate_batches, curvature_path: the curvature
            checkpoint cadence (see ``CurvatureCallback``); off by default.
        unlearn_on_train_end: unlearn ``forget`` when training ends (unless a request already did).
        method_kwargs, curvature_kwargs: extra arguments for the method and the backend.
    """

    def __init__(
        self,
        forget: Iterable[Any] | None = None,
        *,
        retain: Iterable[Any] | None = None,
        held_retain: Any | None = None,
        holdout: Iterable[Any] | None = None,
        method: str = "newton",
        curvature: str = "kfac",
        curvature_data: str = "retain",
        damping: float | None = None,
        scale: float | None = None,
        steps: int | None = None,
        max_retain_increase: float | None = 0.05,
        curvature_batches: int | None = None,
        full_curvature: str | Path | Curvature | Mapping[str, Any] | None = None,
        accumulate_every_n_batches: int | None = None,
        accumulate_from_epoch: int = 0,
        max_accumulate_batches: int | None = None,
        curvature_path: str | Path | None = None,
        unlearn_on_train_end: bool = True,
        model_getter: ModelGetter | None = None,
        batch_transform: BatchTransform | None = None,
        method_kwargs: Mapping[str, Any] | None = None,
        curvature_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            curvature, every_n_batches=accumulate_every_n_batches, start_epoch=accumulate_from_epoch,
            max_batches=max_accumulate_batches, path=curvature_path, model_getter=model_getter,
            batch_transform=batch_transform, curvature_kwargs=curvature_kwargs,
        )
        if curvature_data not in CURVATURE_DATA:
            raise ValueError(f"curvature_data must be one of {CURVATURE_DATA}, got {curvature_data!r}")
        self.forget = forget
        self.retain = retain
        self.held_retain = held_retain
        self.holdout = holdout
        self.method = method
        self.curvature_data = curvature_data
        self.damping = damping
        self.scale = scale
        self.steps = steps
        self.max_retain_increase = max_retain_increase
        self.curvature_batches = curvature_batches
        self.full_curvature = full_curvature
        self.unlearn_on_train_end = unlearn_on_train_end
        self.method_kwargs = dict(method_kwargs or {})
        from .methods import check_method_settings, check_settings

        check_method_settings(method, self.method_kwargs)  # a typo fails here, before training
        check_settings(damping=damping, scale=scale, max_retain_increase=max_retain_increase)
        self.history: list[Any] = []  # StepRecords of every request, in order
        self.last_summary: dict[str, Any] | None = None  # the method's summary() of the last request
        self.requests = 0
        self._done_forget = False

    def should_unlearn(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether a deletion request should run now (checked after every training batch; any rank saying yes
        triggers it on all). Default: never during training; override to serve requests as they arrive."""
        return False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(backend=self.backend, method=self.method,
                                        path=str(self.path) if self.path else None)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "requests": self.requests, "done_forget": self._done_forget}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.requests = int(state_dict.get("requests", 0))
        self._done_forget = bool(state_dict.get("done_forget", False))

    # ------------------------------------------------------------------ hooks
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        decision = trainer.strategy.reduce_boolean_decision(bool(self.should_unlearn(trainer, pl_module)), all=False)
        if decision:
            self.unlearn(pl_module, trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)  # the curvature checkpoint is of the trained, not unlearned model
        if self.unlearn_on_train_end and self.forget is not None and not self._done_forget:
            self.unlearn(pl_module, trainer)

    # ------------------------------------------------------------------ the request
    def unlearn(
        self,
        pl_module: nn.Module,
        trainer: pl.Trainer | None = None,
        *,
        forget: Iterable[Any] | None = None,
        retain: Iterable[Any] | None = None,
        held_retain: Any | None = None,
        holdout: Iterable[Any] | None = None,
    ) -> list[Any]:
        """Serve one deletion request now: unlearn `forget` (default: the callback's) and return its StepRecords;
        `holdout` (default: the callback's) sets the forget loss to reach. The method's `summary()` is kept in
        `last_summary`.

        Without a trainer (after `fit`, or outside Lightning) it runs on one process with no loggers.
        """
        own_forget = forget is None
        forget = self.forget if forget is None else forget
        retain = self.retain if retain is None else retain
        held_retain = self.held_retain if held_retain is None else held_retain
        holdout = self.holdout if holdout is None else holdout
        if forget is None:
            raise ValueError("Unlearn: no forget data; pass forget=<loader or list of batches>")
        model = self.model_getter(pl_module)
        device = next(model.parameters()).device
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

        def prepare(batch: Any) -> dict[str, Tensor]:
            return move_data_to_device(dict(self.batch_transform(batch)), device)

        forget_batches = [prepare(b) for b in forget]
        retain_batches = [prepare(b) for b in retain] if retain is not None else None
        held = prepare(held_retain) if held_retain is not None else (retain_batches[0] if retain_batches else None)
        holdout_batches = [prepare(b) for b in holdout] if holdout is not None else None
        reduce = strategy_reduce(trainer) if trainer is not None else identity
        gather = strategy_gather(trainer) if trainer is not None else identity
        agree_on_batches(reduce, rank, world, "Unlearn", forget=len(forget_batches),
                         retain=None if retain_batches is None else len(retain_batches),
                         holdout=None if holdout_batches is None else len(holdout_batches))
        if not forget_batches:
            raise ValueError("Unlearn: the forget data yielded no batch")
        if holdout_batches is not None and not holdout_batches:
            raise ValueError("Unlearn: the holdout data yielded no batch; pass holdout=None for no target")
        if self.curvature_data == "retain" and not retain_batches and is_second_order(self.method):
            raise ValueError("Unlearn: curvature_data='retain' needs retain=<batches>; without retain data use"
                             " curvature_data='full_minus_forget' with a curvature checkpoint, or 'forget'")

        curvature = full = None
        if is_second_order(self.method):
            full = self._full_curvature(trainer, pl_module) if self.curvature_data == "full_minus_forget" else None
            source = retain_batches if self.curvature_data == "retain" else forget_batches
            curvature = request_curvature(model, self.backend, self.curvature_data, source, full=full, reduce=reduce,
                                          gather=gather, rank=rank, world_size=world, limit=self.curvature_batches,
                                          curvature_kwargs=self.curvature_kwargs)

        kwargs: dict[str, Any] = {"max_retain_increase": self.max_retain_increase}
        if self.steps is not None:
            kwargs["steps"] = self.steps
        kwargs.update(self.method_kwargs)
        unlearner = make_unlearner(
            self.method, model, curvature=curvature, full_curvature=full, backend=self.backend,
            curvature_data=self.curvature_data, damping=self.damping, scale=self.scale, reduce=reduce, gather=gather,
            curvature_kwargs=self.curvature_kwargs, **kwargs)
        # every process keeps its share of forget and holdout: the engine sums losses across processes
        records = unlearner.fit(share(forget_batches, rank, world),
                                share(retain_batches, rank, world) if retain_batches else None, held,
                                holdout_batches=share(holdout_batches, rank, world) if holdout_batches else None)
        if trainer is not None and trainer.world_size > 1:
            _broadcast_parameters(model, trainer)
        self.requests += 1
        if own_forget:
            self._done_forget = True
        self.history.extend(records)
        self.last_summary = unlearner.summary()
        if trainer is not None:
            self._log(trainer, records, self.last_summary)
        return records

    def _full_curvature(self, trainer: pl.Trainer | None, pl_module: nn.Module) -> Curvature:
        source = self.full_curvature
        if isinstance(source, Curvature):
            return source
        if source is None:
            if self.has_curvature or self._pending_state is not None:
                return self._ensure_curvature(trainer, pl_module)  # type: ignore[arg-type]
            raise ValueError(
                "Unlearn: curvature_data='full_minus_forget' needs a curvature checkpoint of the training data:"
                " pass full_curvature=<file or Lightning checkpoint>, or accumulate one during training with"
                " accumulate_every_n_batches=k"
            )
        model = self.model_getter(pl_module)
        state = (load_curvature_state(source, model=model, backend=self.backend) if isinstance(source, (str, Path))
                 else dict(source))
        full = self.new_curvature(trainer, model)
        full.load_state_dict(move_data_to_device(state, next(self.model_getter(pl_module).parameters()).device))
        self.full_curvature = full
        return full

    def _log(self, trainer: pl.Trainer, records: list[Any], summary: Mapping[str, Any] | None = None) -> None:
        request = self.requests
        for logger in trainer.loggers:
            for record in records:
                metrics = {f"unlearn/{k}": float(v) for k, v in _record_numbers(record).items()}
                metrics["unlearn/request"] = float(request)
                logger.log_metrics(metrics, step=int(record.step))
            if summary is not None:
                end = {f"unlearn/{k}": v for k, v in summary_numbers(summary).items()}
                end["unlearn/request"] = float(request)
                logger.log_metrics(end, step=int(records[-1].step) if records else 0)
            logger.save()


#: `unlearn/status_code` of each status of a run (the method's `status`)
STATUS_CODES = {"target_reached": 0, "budget_exhausted": 1, "nothing_accepted": 2}


def summary_numbers(summary: Mapping[str, Any]) -> dict[str, float]:
    """The loggable numbers of a method's `summary()`: `status_code` (see `STATUS_CODES`) and `target` (when
    there is one)."""
    out: dict[str, float] = {}
    status = summary.get("status")
    if status in STATUS_CODES:
        out["status_code"] = float(STATUS_CODES[status])
    target = summary.get("target")
    if target is not None and math.isfinite(float(target)):
        out["target"] = float(target)
    return out


def _record_numbers(record: Any) -> dict[str, float]:
    out = {}
    for field in ("damping", "scale", "forget_loss", "retain_loss", "accepted", "target", "evaluations",
                  "predicted_increase"):
        value = getattr(record, field, None)
        if value is None:
            continue
        value = float(value)
        if math.isfinite(value):
            out[field] = value
    return out


def is_second_order(method: str) -> bool:
    """Whether the method named `method` uses curvature (raises naming the choices for an unknown one)."""
    from .methods import METHODS, SecondOrderUnlearner

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    return issubclass(METHODS[method], SecondOrderUnlearner)


def make_unlearner(
    method: str,
    model: nn.Module,
    *,
    curvature: Curvature | None = None,
    full_curvature: Curvature | None = None,
    backend: str = "kfac",
    curvature_data: str = "retain",
    damping: float | None = None,
    scale: float | None = None,
    reduce: Reduce = identity,
    gather: Reduce = identity,
    curvature_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """`build_unlearner` with a driver's reductions; curvature arguments only for second-order methods, `damping`
    and `scale` only when set (None: the method's default recipe)."""
    from .methods import build_unlearner

    kw: dict[str, Any] = dict(reduce=reduce)
    if is_second_order(method):
        kw.update(curvature=curvature, curvature_backend=backend, curvature_data=curvature_data,
                  full_curvature=full_curvature, gather=gather, curvature_kwargs=dict(curvature_kwargs or {}))
        if damping is not None:
            kw["damping"] = damping
        if scale is not None:
            kw["scale"] = scale
    kw.update(kwargs)
    return build_unlearner(method, model, **kw)


def _broadcast_parameters(model: nn.Module, trainer: pl.Trainer) -> None:
    """Keep every process bit-identical after an update (accept/reject decisions could in principle differ)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    with torch.no_grad():
        for p in model.parameters():
            torch.distributed.broadcast(p.data, src=0)
