"""Lightning drivers of the unlearning engine: `CurvatureCallback` and the drop-in `Unlearn` callback.

    trainer = L.Trainer(callbacks=[Unlearn(forget=forget_loader, retain=retain_loader, method="newton",
                                           curvature="kfac", accumulate_every_n_batches=4,
                                           curvature_path="curvature.pt")])
    trainer.fit(my_lightning_module, datamodule=my_data)   # trains, keeps a curvature checkpoint, then unlearns

Thin drivers: every computation is the engine's (`lightning_unlearn.curvature`, `lightning_unlearn.methods`).
This module only decides *when* (cadence, `should_accumulate`, `should_unlearn`), *on what* (the unwrapped model
returned by `model_getter`, batches moved to the module's device, curvature batches sharded across ranks) and
*how statistics meet* (the strategy's all-reduce as the engine's `reduce`); a deletion request is
`lightning_unlearn.request.serve_request`, the same function every driver calls, with the settings of
`lightning_unlearn.settings.UnlearnSettings` (whose defaults are this callback's). Texts never reach a logger: only
the numbers of each `StepRecord` are logged.
"""

from __future__ import annotations

import ast
import copy
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from .callback_model_check import first_batch, getter_example, optimized_parameters
from .callback_resume import accumulator_names, all_gather_objects, placed, portable
from .checkpoint import curvature_header, save_curvature
from .curvature import Curvature, identity, model_logits
from .curvature.base import eval_mode
from .curvature.registry import build_curvature
from .distributed import leave_process_group, shard, strategy_gather, strategy_reduce
from .errors import UserInputError
from .fsdp import full_parameters, is_sharded
from .request import (
    RequestResult,
    default_batch_transform,
    model_device,
    record_numbers,
    serve_request,
    snapshot,
    summary_numbers,
)
from .settings import FullCurvature, UnlearnSettings, setting, takes_settings
from .strategies import check_strategy

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


class Unlearn(CurvatureCallback):
    r"""Drop-in unlearning for an existing ``Trainer.fit`` of any LightningModule whose model yields logits.

    At ``on_train_end`` (or after any training batch where ``should_unlearn()`` says so) the ``forget`` batches are
    unlearned with ``method`` (see ``lightning_unlearn.methods``) on the unwrapped model, through
    ``lightning_unlearn.request.serve_request``; every ``StepRecord`` is logged through the trainer's loggers under
    ``unlearn/`` (numbers only, never texts). With ``accumulate_every_n_batches`` the callback also keeps a curvature
    checkpoint of the training data (saved in the Lightning checkpoint and, with ``curvature_path``, as its own file)
    that later requests use with ``curvature_data="full_minus_forget"`` and no retain data: ``Unlearn(forget=...,
    curvature_data="full_minus_forget", full_curvature=path).unlearn(pl_module)``.

    The default recipe of the second-order methods applies unless a knob is set (``damping``, ``scale``,
    ``steps``, ``forget_loss`` are passed to the method only when given): relative damping, a step-length search,
    up to 5 steps, stopping as soon as the forget set cannot be told from ``holdout`` data (never-trained data of the
    forget set's kind; see ``lightning_unlearn.methods.target`` for the target).
    After each request ``last_summary`` holds the method's ``summary()`` (status, target, losses), ``last_result``
    the ``RequestResult``, and the loggers get ``unlearn/status_code`` (0 target_reached, 1 budget_exhausted,
    2 nothing_accepted) and ``unlearn/target``. The request changes the model in memory only: when ``ModelCheckpoint``
    saved files before it, a ``CheckpointsPredateUnlearningWarning`` names them (they still hold the forget data, and
    ``trainer.test(ckpt_path="best")`` would load them back). The model (``model_getter``) is tried on the first
    forget batch when ``fit`` starts (see ``CurvatureCallback.check_model``).

    Args:
        forget: the forget batches (every process reads all of them and keeps its share; losses and gradients
            are summed across processes, so each takes the same update).
        retain: retain batches (curvature for ``curvature_data="retain"``, and the retain term of some methods);
            curvature batches are sharded across processes and their statistics summed.
        held_retain: a held-out retain batch for the safety check (default: the first retain batch, if any).
        holdout: never-trained batches of the forget set's kind (e.g. the data module's ``holdout`` split,
            labelled like the forget batches): the run aims at the forget set looking like them (sharded like
            ``forget``). Without it (and without ``forget_target``) there is no target and each step takes the
            largest step within the retain budget.
        settings: an ``UnlearnSettings`` (default: its defaults), changed by the knobs given as keywords.
        **knobs: the request's settings by name (every field of ``UnlearnSettings``, with its defaults; at most 16
            curvature and 16 holdout batches). ``full_curvature`` defaults to this callback's own curvature
            checkpoint.
        accumulate_every_n_batches, accumulate_from_epoch, max_accumulate_batches, curvature_path: the curvature
            checkpoint cadence (see ``CurvatureCallback``); off by default.
        unlearn_on_train_end: unlearn ``forget`` when training ends (unless a request already did).
    """

    @takes_settings()
    def __init__(
        self,
        forget: Iterable[Any] | None = None,
        *,
        retain: Iterable[Any] | None = None,
        held_retain: Any | None = None,
        holdout: Iterable[Any] | None = None,
        settings: UnlearnSettings | None = None,
        accumulate_every_n_batches: int | None = None,
        accumulate_from_epoch: int = 0,
        max_accumulate_batches: int | None = None,
        curvature_path: str | Path | None = None,
        unlearn_on_train_end: bool = True,
        model_getter: ModelGetter | None = None,
        batch_transform: BatchTransform | None = None,
        **knobs: Any,
    ) -> None:
        # checked first: a typo or a nonsense value fails here, before training
        settings = UnlearnSettings.from_kwargs(settings, **knobs)
        super().__init__(
            settings.curvature, every_n_batches=accumulate_every_n_batches, start_epoch=accumulate_from_epoch,
            max_batches=max_accumulate_batches, path=curvature_path, model_getter=model_getter,
            batch_transform=batch_transform, curvature_kwargs=settings.backend_kwargs(),
        )
        self.settings = settings
        self.forget = forget
        self.retain = retain
        self.held_retain = held_retain
        self.holdout = holdout
        self.unlearn_on_train_end = unlearn_on_train_end
        self.history: list[Any] = []  # StepRecords of every request, in order
        self.last_summary: dict[str, Any] | None = None  # the method's summary() of the last request
        self.last_result: RequestResult | None = None  # the last request's records, summary and method
        self.requests = 0
        self._done_forget = False
        self._loaded_full: Curvature | None = None  # `full_curvature` read from its file, once

    method = setting("method")
    curvature_data = setting("curvature_data")
    damping = setting("damping")
    scale = setting("scale")
    steps = setting("steps")
    max_retain_increase = setting("max_retain_increase")
    curvature_batches = setting("curvature_batches")
    full_curvature = setting("full_curvature")
    method_kwargs = setting("method_kwargs")

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
    def _probe_data(self) -> Any | None:
        """The forget batches: the model is tried on the first before training (see `check_model`)."""
        return self.forget

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
    ) -> RequestResult:
        """Serve one deletion request now (`serve_request`): unlearn `forget` (default: the callback's) and return
        its StepRecords (a `RequestResult`: a list with `status`, `summary` and the method); `holdout` (default: the
        callback's) sets the forget loss to reach. The summary is also kept in `last_summary`.

        Without a trainer (after `fit`, or outside Lightning) it runs on one process with no loggers.
        """
        own_forget = forget is None
        forget = self.forget if forget is None else forget
        retain = self.retain if retain is None else retain
        held_retain = self.held_retain if held_retain is None else held_retain
        holdout = self.holdout if holdout is None else holdout
        if forget is None:
            raise ValueError("Unlearn: no forget data; pass forget=<loader or list of batches>")
        model = self.check_model(pl_module, trainer, forget)
        device = model_device(model)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

        def prepare(batch: Any) -> dict[str, Tensor]:
            return move_data_to_device(dict(self.batch_transform(batch)), device)

        result = serve_request(
            model, forget, retain, holdout, settings=self.settings, held_retain=held_retain,
            full_curvature=self._full_curvature(trainer, pl_module),
            reduce=strategy_reduce(trainer) if trainer is not None else identity,
            gather=strategy_gather(trainer) if trainer is not None else identity,
            rank=rank, world_size=world, prepare=prepare, who="Unlearn")
        loaded = getattr(result.unlearner, "full_curvature", None)
        if isinstance(loaded, Curvature) and not isinstance(self.settings.full_curvature, Curvature):
            self._loaded_full = loaded  # read (and checked) once; later requests reuse it
        self.requests += 1
        if own_forget:
            self._done_forget = True
        self.history.extend(result)
        self.last_summary = result.summary
        self.last_result = result
        if trainer is not None:
            self._log(trainer, result, self.last_summary)
            self._warn_saved_checkpoints(trainer)
        return result

    def _warn_saved_checkpoints(self, trainer: pl.Trainer) -> None:
        """Warn about the files `ModelCheckpoint` saved before this request: they hold the weights before unlearning
        (the forget data), and `trainer.test(ckpt_path="best")` would load them back into the module."""
        if not trainer.is_global_zero:
            return
        files: list[str] = []
        for callback in trainer.checkpoint_callbacks:
            saved = [getattr(callback, "best_model_path", ""), getattr(callback, "last_model_path", ""),
                     *getattr(callback, "best_k_models", {})]
            for file in map(str, filter(None, saved)):
                if file not in files:
                    files.append(file)
        if files:
            warnings.warn(CheckpointsPredateUnlearningWarning(
                f"Unlearn: {len(files)} checkpoint file(s) saved before this deletion request predate unlearning and"
                f" still hold the forget data: {', '.join(files)}. Delete them, or save the unlearned model again"
                " (trainer.save_checkpoint(path)); trainer.test/validate/predict(ckpt_path='best', 'last' or one of"
                " these files) would restore the weights before unlearning."), stacklevel=2)

    def _full_curvature(self, trainer: pl.Trainer | None, pl_module: nn.Module) -> FullCurvature:
        """The training data's curvature for `full_minus_forget` (None when the request does not need one): the
        `full_curvature` setting (read once), else this callback's own curvature checkpoint."""
        if self.settings.curvature_data != "full_minus_forget" or not self.settings.second_order:
            return None
        if self._loaded_full is not None:
            return self._loaded_full
        if self.settings.full_curvature is not None:
            return self.settings.full_curvature
        if self.has_curvature or self._pending_state is not None:
            return self._ensure_curvature(trainer, pl_module)  # type: ignore[arg-type]
        raise ValueError(
            "Unlearn: curvature_data='full_minus_forget' needs a curvature checkpoint of the training data:"
            " pass full_curvature=<file or Lightning checkpoint>, or accumulate one during training with"
            " accumulate_every_n_batches=k"
        )

    def _log(self, trainer: pl.Trainer, records: list[Any], summary: Mapping[str, Any] | None = None) -> None:
        request = self.requests
        for logger in trainer.loggers:
            for record in records:
                metrics = {f"unlearn/{k}": float(v) for k, v in record_numbers(record).items()}
                metrics["unlearn/request"] = float(request)
                logger.log_metrics(metrics, step=int(record.step))
            if summary is not None:
                end = {f"unlearn/{k}": v for k, v in summary_numbers(summary).items()}
                end["unlearn/request"] = float(request)
                logger.log_metrics(end, step=int(records[-1].step) if records else 0)
            logger.save()
