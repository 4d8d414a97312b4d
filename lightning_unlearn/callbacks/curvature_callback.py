"""`CurvatureCallback`: a curvature checkpoint of the training data, accumulated during `Trainer.fit` at a cadence
(`should_accumulate`), saved in Lightning checkpoints and as its own file; and `ProcessGroupTeardown`. The drop-in
`Unlearn` callback (`callbacks.unlearn`) extends it. Texts never reach a logger."""

from __future__ import annotations

import ast
import copy
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from ..checkpoint import curvature_header, save_curvature
from ..curvature import Curvature, identity, model_logits
from ..curvature.base import eval_mode
from ..curvature.registry import build_curvature
from ..distributed import leave_process_group, shard, strategy_gather, strategy_reduce
from ..errors import UserInputError
from ..fsdp import full_parameters, is_sharded
from ..request import (
    default_batch_transform,
    model_device,
    snapshot,
)
from ..strategies import check_strategy
from .model_check import first_batch, getter_example, optimized_parameters
from .resume import accumulator_names, all_gather_objects, placed, portable

ModelGetter = Callable[[pl.LightningModule], nn.Module]
BatchTransform = Callable[[Any], Mapping[str, Tensor]]


def default_model_getter(pl_module: nn.Module) -> nn.Module:
    """The model inside a LightningModule: its `model` attribute when that is a module, else the module itself."""
    inner = getattr(pl_module, "model", None)
    return inner if isinstance(inner, nn.Module) else pl_module


def _cpu(obj: Any) -> Any:
    return move_data_to_device(obj, torch.device("cpu"))


class CheckpointsPredateUnlearningWarning(UserWarning):
    """Checkpoint files saved before a deletion request still hold the weights before unlearning (the forget data):
    the request changes the model in memory, not the files `ModelCheckpoint` wrote earlier."""


class CurvatureResumeWarning(UserWarning):
    """A resumed run cannot continue the checkpoint's unfinished curvature statistics (they were gathered on
    another number of processes): the curvature checkpoint then covers the batches before the checkpoint only."""


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
    Lightning checkpoint (unfinished statistics are finalized on a copy, on every rank, at checkpoint time, and kept
    unfinished beside it: a run resumed with ``ckpt_path`` continues them, so it ends with the curvature of an
    uninterrupted run); with ``path`` it is also written on its own (one safetensors file, atomic: see
    ``lightning_unlearn.checkpoint``) when training ends. Reload it with ``load_curvature_state(path)`` (either file;
    Lightning checkpoints are read with ``weights_only=True``) to serve later deletion requests
    (``full_minus_forget``).

    The model is checked when ``fit`` starts (``check_model``): with the default getter, a ``model`` attribute the
    optimizers do not train (a teacher, a reference model) is refused, and the model must give logits for a batch
    (the first of ``dataloader``, else the first training batch, before its step); a wrong getter fails then, with a
    ``UserInputError`` naming ``model_getter=``, not after training.

    Args:
        backend: curvature backend (``kfac``, ``cg``, ``woodfisher``, ``diagonal``).
        every_n_batches: accumulate every k-th training batch; ``None`` for no accumulation during training.
        start_epoch: first epoch that accumulates (statistics closer to the final weights).
        max_batches: cap on the training batches accumulated per process.
        dataloader: batches accumulated at ``on_train_end`` with the final weights.
        path: where to write the finalized curvature on its own.
        model_getter: the ``nn.Module`` inside the LightningModule whose forward gives the logits (default:
            ``pl_module.model`` or itself), e.g. ``lambda m: m.student`` when ``model`` is a teacher.
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
        self._pending_state: dict[str, Any] | None = None  # a finalized curvature state, loaded when needed
        #: every process's unfinished statistics from a checkpoint taken during training (continued at `on_fit_start`)
        self._pending_accumulators: list[dict[str, Any]] | None = None
        self._model_probed = False  # the model has run once on a batch of ours (`check_model`)
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
        """The curvature state for a Lightning checkpoint.

        `curvature`: the finalized statistics (during training a finalized copy, so the checkpoint serves requests
        through `load_curvature_state`). During training also `accumulators`: every process's unfinished sums and
        batch count (gathered: Lightning writes rank 0's state only), so a run resumed from the checkpoint continues
        them and ends with the same curvature as an uninterrupted run. Collective during training: every rank dumps
        the checkpoint."""
        state: dict[str, Any] = {"backend": self.backend, "batches_seen": self.batches_seen, "curvature": None}
        if self._curvature is not None and self._curvature.finalized:
            state["curvature"] = _cpu(self._curvature.state_dict())
        elif self._curvature is not None and self.batches_seen > 0:
            # a checkpoint during training: finalize a copy (collective: every rank dumps the checkpoint)
            state["curvature"] = _cpu(snapshot(self._curvature).finalize().state_dict())
            state["accumulators"] = all_gather_objects(self._accumulator_state(self._curvature))
        elif self._pending_state is not None:
            state["curvature"] = self._pending_state
        if self._pending_accumulators is not None and "accumulators" not in state:
            state["accumulators"] = self._pending_accumulators  # loaded, not continued yet: kept as loaded
        if state["curvature"] is not None and self._curvature is not None:
            # shapes and fingerprint for load_curvature_state's model check (plain values: weights_only loads them)
            state["curvature_meta"] = curvature_header(self._curvature)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = int(state_dict.get("batches_seen", 0))
        accumulators = state_dict.get("accumulators")
        self._pending_accumulators = list(accumulators) if accumulators else None
        if self._pending_accumulators is not None:
            self._curvature = None  # continued on a fresh backend object at `on_fit_start`
        if state_dict.get("curvature") is not None:
            self._pending_state = dict(state_dict["curvature"])
            if self._curvature is not None:
                self._load_pending()

    def _key_fields(self, key: Any) -> dict[str, Any] | None:
        """The fields of a state key of this class (`Class{'backend': ..., 'path': ...}`) but the path; None for
        another class's key."""
        prefix = type(self).__qualname__
        if not isinstance(key, str) or not key.startswith(prefix + "{"):
            return None
        try:
            fields = ast.literal_eval(key[len(prefix):])
        except (ValueError, SyntaxError):
            return None
        return {k: v for k, v in fields.items() if k != "path"} if isinstance(fields, dict) else None

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
                           ) -> None:
        """Resume from the state of the same callback saved with another `path` (Lightning matches states by key,
        and the key holds the path: a resumed run writing its curvature elsewhere would silently start anew)."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return  # Lightning loads it
        taken = {callback.state_key for callback in trainer.callbacks}
        mine = self._key_fields(self.state_key)
        found = [k for k in states if k not in taken and self._key_fields(k) == mine and isinstance(states[k], dict)]
        if len(found) == 1:
            rank_zero_info(f"{type(self).__name__}: resuming the curvature state saved as {found[0]!r} (another path)")
            self.load_state_dict(copy.deepcopy(states[found[0]]))

    def _load_pending(self) -> None:
        assert self._curvature is not None and self._pending_state is not None
        self._curvature.load_state_dict(self._pending_state)
        self._pending_state = None

    def _accumulator_state(self, curvature: Curvature) -> dict[str, Any]:
        """This process's unfinished statistics, checkpoint-safe (CPU tensors and plain values)."""
        on_device: list[bool] = []
        attributes = portable({name: getattr(curvature, name) for name in accumulator_names(curvature)}, on_device)
        return {"batches_seen": self.batches_seen, "param_names": list(curvature.param_names),
                "attributes": attributes, "on_device": on_device}

    def _resume_accumulators(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Continue the checkpoint's unfinished statistics: this process's sums and batch count on a fresh backend
        object. With another number of processes they cannot be split again: the finalized copy is kept (warned)."""
        saved, self._pending_accumulators = self._pending_accumulators, None
        assert saved is not None
        who = type(self).__name__
        if len(saved) != trainer.world_size:
            rank_zero_warn(
                f"{who}: the checkpoint's unfinished curvature statistics were gathered on {len(saved)} process(es),"
                f" this run has {trainer.world_size}; they cannot be continued, so the curvature checkpoint keeps the"
                f" batches before the checkpoint only. Resume on {len(saved)} process(es) to continue them.",
                category=CurvatureResumeWarning)
            return
        entry = saved[trainer.global_rank]
        curvature = self.new_curvature(trainer, self.model_getter(pl_module))
        if (list(entry["param_names"]) != list(curvature.param_names)
                or set(entry["attributes"]) != set(accumulator_names(curvature))):
            raise UserInputError(
                f"{who}: the checkpoint's unfinished curvature statistics cover other parameters than this model's"
                f" tracked ones ({self.backend}); resume with the model and curvature settings of the checkpoint's"
                " run, or start a new run without ckpt_path")
        flags = iter(entry["on_device"])
        for name, value in placed(entry["attributes"], flags, model_device(curvature.model)).items():
            setattr(curvature, name, value)
        self._curvature = curvature
        self._pending_state = None  # the finalized copy of the checkpoint: superseded by the continued statistics
        self.batches_seen = int(entry["batches_seen"])

    # ------------------------------------------------------------------ engine plumbing
    def new_curvature(self, trainer: pl.Trainer | None, model: nn.Module) -> Curvature:
        """A fresh backend object on `model` whose reductions go through the trainer's strategy."""
        reduce = strategy_reduce(trainer) if trainer is not None else identity
        gather = strategy_gather(trainer) if trainer is not None else identity
        return build_curvature(self.backend, model, reduce=reduce, gather=gather, **self.curvature_kwargs)

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
        # a wrong model_getter fails here, before training, not after it
        self._model_probed = False  # this fit's module (a callback may serve several fits)
        self.check_model(pl_module, trainer, self._probe_data())
        if self._pending_accumulators is not None and self.accumulates:
            self._resume_accumulators(trainer, pl_module)  # a run resumed from a checkpoint taken during training
        if self.accumulates or self._pending_state is not None:
            self._ensure_curvature(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._model_probed and self.every_n_batches is not None:
            self.check_model(pl_module, trainer, [batch])  # statistics run on training batches: try the first

    # ------------------------------------------------------------------ the model
    def _probe_data(self) -> Any | None:
        """Batches whose first one the model is tried on before training (`dataloader`), or None."""
        return self.dataloader

    def check_model(self, pl_module: nn.Module, trainer: pl.Trainer | None = None, data: Any | None = None
                    ) -> nn.Module:
        """`model_getter(pl_module)`, checked: an `nn.Module`; with the default getter, one the trainer's optimizers
        update and that has trainable parameters (not a teacher or reference model kept beside the trained one);
        and, given batches (once per fit), one whose forward gives logits for their first batch. Raises
        `UserInputError` naming `model_getter=`: a wrong model would otherwise fail (or, worse, be changed silently)
        only after training."""
        who = type(self).__name__
        model = self.model_getter(pl_module)
        if not isinstance(model, nn.Module):
            raise UserInputError(
                f"{who}: model_getter returned a {type(model).__name__}, not an nn.Module; pass model_getter= returning"
                " the language model inside the LightningModule, e.g. model_getter=lambda m: m.model")
        if self.model_getter is default_model_getter and model is not pl_module:
            optimized = optimized_parameters(trainer)
            params = list(model.parameters())

            def example() -> str:
                return getter_example(who, pl_module, model, optimized)

            if (optimized and not any(id(p) in optimized for p in params)
                    and any(id(p) in optimized for p in pl_module.parameters())):
                raise UserInputError(
                    f"{who}: the default model getter picked pl_module.model (a {type(model).__name__}), but the"
                    " trainer's optimizers update none of its parameters: it is not the model being trained (a"
                    " teacher or reference model?), and unlearning it would leave the trained model unchanged. Pass"
                    f" model_getter= returning the trained model, e.g. {example()}")
            if params and not any(p.requires_grad for p in params):
                raise UserInputError(
                    f"{who}: the default model getter picked pl_module.model (a {type(model).__name__}), whose"
                    " parameters are all frozen (requires_grad=False): nothing in it can be unlearned. If it is a"
                    " frozen teacher or reference model, pass model_getter= returning the trained model, e.g."
                    f" {example()}; if it is the model to unlearn, unfreeze it")
        # not on an FSDP2-sharded model: a forward there gathers and reshards its modules, state the user's training
        # (and the request's own gathering) then start from; the sharded path is the multi-process one, checked by
        # its own drivers
        if data is not None and not self._model_probed and not is_sharded(model):
            with torch.random.fork_rng(devices=[]):  # a loader's iterator draws a seed: training randomness kept
                batch = first_batch(data)
                if batch is not None:
                    self._probe(pl_module, model, batch, trainer)
                    self._model_probed = True
        return model

    def _probe(self, pl_module: nn.Module, model: nn.Module, batch: Any, trainer: pl.Trainer | None) -> None:
        """One forward of `model` on `batch` (no grad, eval mode), as the engine runs it: a module that cannot take
        `input_ids` or gives no logits is refused by name. Errors of the batch itself are left as they are."""
        who = type(self).__name__
        if self.model_getter is not default_model_getter:
            picked = f"the model returned by model_getter (a {type(model).__name__})"
        elif model is pl_module:
            picked = (f"the LightningModule itself ({type(pl_module).__name__}: the default model getter's choice"
                      " when it has no `model` attribute)")
        else:
            picked = f"pl_module.model (a {type(model).__name__}, the default model getter's choice)"
        fix = ("pass model_getter= returning the nn.Module whose forward(input_ids=..., attention_mask=...) gives the"
               f" logits, e.g. {getter_example(who, pl_module, model, optimized_parameters(trainer))}")
        prepared = move_data_to_device(dict(self.batch_transform(batch)), model_device(model))
        try:
            with torch.no_grad(), eval_mode(model), full_parameters(model):
                logits = model_logits(model, prepared)
        except TypeError as err:  # a forward that takes other arguments, or an output without logits
            raise UserInputError(f"{who}: {picked} cannot be run as a language model on a batch"
                                 f" ({type(err).__name__}: {str(err)[:300]}); {fix}") from err
        if not isinstance(logits, Tensor) or not logits.is_floating_point():
            what = type(logits).__name__ if not isinstance(logits, Tensor) else f"a {logits.dtype} tensor"
            raise UserInputError(f"{who}: {picked} gives {what} where logits (a float tensor) are expected; {fix}")
        labels = prepared.get("labels")
        if (isinstance(labels, Tensor) and not labels.is_floating_point() and logits.dim() == labels.dim() + 1
                and labels.numel() and int(labels.max()) >= logits.shape[-1]):
            raise UserInputError(
                f"{who}: {picked} gives {logits.shape[-1]} outputs per position, fewer than the vocabulary the"
                f" labels use (token ids up to {int(labels.max())}): hidden states rather than logits?; {fix}")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.has_curvature or not self.should_accumulate(trainer, pl_module, batch, batch_idx):
            return
        curvature = self._ensure_curvature(trainer, pl_module)
        model = self.model_getter(pl_module)
        # FSDP2: statistics need the full weights (gathered for the batch, then resharded; a no-op otherwise)
        with torch.enable_grad(), eval_mode(model), full_parameters(model):
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
            model = self.model_getter(pl_module)
            with torch.enable_grad(), eval_mode(model), full_parameters(model):
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
