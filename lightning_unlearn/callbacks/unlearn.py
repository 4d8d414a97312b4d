"""The drop-in `Unlearn` callback: a `CurvatureCallback` that serves a deletion request at the end of training (or
whenever `should_unlearn` says so) through `lightning_unlearn.request.serve_request`; only the numbers of each
`StepRecord` reach the loggers."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from ..curvature import Curvature, identity
from ..distributed import strategy_gather, strategy_reduce
from ..request import (
    RequestResult,
    model_device,
    record_numbers,
    serve_request,
    summary_numbers,
)
from ..settings import FullCurvature, UnlearnSettings, setting, takes_settings
from .curvature_callback import (
    BatchTransform,
    CheckpointsPredateUnlearningWarning,
    CurvatureCallback,
    ModelGetter,
)


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
