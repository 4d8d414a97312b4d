"""`UnlearningModule`: a LightningModule around any causal LM whose training steps are unlearning steps.

    module = UnlearningModule("path/to/model", method="newton", curvature="kfac")   # the default recipe
    module.set_holdout_data(holdout_loader)   # or a datamodule with a `holdout` split
    trainer = L.Trainer(max_steps=7)          # a cap: the run stops itself when the target is reached
    trainer.fit(module, train_dataloaders=CombinedLoader({"forget": f, "retain": r}), val_dataloaders=[f, r])
    module.status                             # "target_reached" | "budget_exhausted" | "nothing_accepted"
    module.save_pretrained("unlearned/")

Manual optimisation: each `training_step` runs the chosen method's `step` (a trial update with the safety check)
on the combined forget/retain batch. The curvature is fitted once at `on_train_start` from `set_curvature_data(...)`
or the datamodule's `curvature_dataloader(split)`, by `lightning_unlearn.request.prepare_request` (the first half of
every driver's request); the target is calibrated there too, on `set_holdout_data(...)` or the datamodule's `holdout`
split. The run is the method's protocol (`Unlearner.begin` before the first step, `should_stop` after each,
`finish` at the end), so its status and summary are the method's. Constructor arguments are the knobs of
`UnlearnSettings` (plain types, LightningCLI-friendly: `--model.method`, with the dataclass's defaults).
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from torch import Tensor

from .distributed import broadcast_parameters, share, strategy_gather, strategy_reduce
from .errors import UserInputError
from .fsdp import full_parameters, gathered_state_dict, is_sharded, shard_model
from .methods.knowledge import KNOWLEDGE_STEPS
from .methods.newton import DEFAULT_NEWTON_STEPS
from .methods.records import SUMMARY_FIELDS
from .methods.repair import REPAIR_BATCHES
from .models import atomic_save_pretrained, build_model
from .module_evaluation import ModuleEvaluation
from .request import STATUS_CODES, default_batch_transform, prepare_request, record_numbers, summary_numbers
from .settings import KNOBS, UnlearnSettings, setting, takes_settings
from .strategies import check_strategy


class ForgetBatchWarning(UserWarning):
    """The training loader has several batches but no forget loader to read the whole forget set from, so
    `UnlearningModule` can only judge the target (nothing to do, stop) on each step's forget batch."""


@contextlib.contextmanager
def _random_state_kept(loader: Any) -> Iterator[None]:
    """Iterate `loader` inside without moving the random state its own passes during the fit read: the global torch
    RNG (a sampler without a generator seeds itself from it) and the generators of the loader and its samplers (the
    data module shuffles with a seeded generator). So reading the forget set at the start leaves the order in which
    the fit sees the batches as it was without that read."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    owners = (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None))
    generators = {id(g): (g, g.get_state()) for g in (getattr(o, "generator", None) for o in owners)
                  if isinstance(g, torch.Generator)}
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            for generator, state in generators.values():
                generator.set_state(state)


def _batch_count(loader: Any) -> int | None:
    """`len(loader)`, or None for a loader without a length (an iterable dataset)."""
    try:
        return len(loader)
    except TypeError:
        return None


class UnlearningModule(ModuleEvaluation, pl.LightningModule):
    """Unlearning as a Lightning fit: `training_step` runs one step of `method` on `{"forget": b, "retain": b}`.

    Args:
        model: a saved model directory (or hub id), a transformers config, or an `nn.Module` mapping ids to logits.
        settings: an `UnlearnSettings` (default: its defaults), changed by the knobs given as keywords.
        **knobs: the request's settings by name (every field of `UnlearnSettings` but `steps`, with its defaults:
            the method's default recipe, relative damping and a step-length search, see `SecondOrderUnlearner`; at
            most 16 curvature and 16 holdout batches). `full_curvature` is a curvature file or a Lightning
            checkpoint written by `CurvatureCallback`/`Unlearn`. The trainer's `max_steps` caps the steps.
        dtype: load/cast the model in this torch dtype ("float32", "bfloat16", ...).

    The target: `set_holdout_data(batches)` (never-trained data of the forget set's kind, labelled like the forget
    batches) or else the datamodule's `holdout` split (`datamodule.dataloader("holdout")`) calibrates the method at
    `on_train_start` (`Unlearner.calibrate`): the run stops (`trainer.should_stop`) as soon as the forget set
    cannot be told from the holdout any more (the method's target, see `lightning_unlearn.methods.target`), when a
    step spends the retain budget, or when a step is rolled back after all retries (`Unlearner.should_stop`, the
    rule of the method's own `fit`). `trainer.max_steps` is then only a cap: a second-order request takes the steps
    every driver takes (5 staged steps and up to 2 repeats of the last; 10 and 2 in the knowledge regime) within
    it, fewer giving fewer, larger stages (`Unlearner.limit_steps`). For
    span-level forgetting the holdout must be labelled on its spans too (never-inserted canaries on their secret):
    `ForgetRetainDataModule.holdout_dataloader` refuses a holdout of whole texts (or none), naming the fix; pass
    `holdout=` to the data module, `set_holdout_data(...)`, or `holdout_batches=0` for no holdout target.
    After the fit, `status` tells how the run ended and `summary()` gives the numbers.

    A forget loader of several batches (`data.forget_batch_size` below the forget set's size): each step's update
    comes from its forget batch, but the target is judged on the whole forget set, read once at `on_train_start`
    (`begin`'s "nothing to do", the stop after each step, the losses before and after), as the `Unlearn` callback
    and `serve_request` judge it: one batch that happens to look unseen must not end the run while the rest of the
    forget set is still memorised (a step whose batch already looks unseen takes the whole forget set instead: that
    batch has nothing left to forget). A run cannot be resumed from a checkpoint (`fit(ckpt_path=...)` is refused, see
    `on_load_checkpoint`).
    """

    @takes_settings(skip=("steps",), types={"full_curvature": str | None}, hide=("settings",))
    def __init__(self, model: str | Any = None, *, settings: UnlearnSettings | None = None, dtype: str | None = None,
                 **knobs: Any) -> None:
        # the base class by name, not super(): the signature is generated (`takes_settings`), its knobs are not locals
        # of this frame, and Lightning reads the locals of an `__init__` that names `super` for its hyperparameters
        pl.LightningModule.__init__(self)
        if model is None:
            raise ValueError("UnlearningModule needs model=<saved model directory, transformers config or nn.Module>")
        if "steps" in knobs:
            from .errors import UserInputError

            raise UserInputError("UnlearningModule: the trainer's max_steps caps the steps (Lightning drives them); "
                                 "set Trainer(max_steps=...) instead of steps")
        is_path = isinstance(model, (str, Path))
        self.source_path = Path(model).expanduser().resolve() if is_path and Path(model).exists() else None
        # checked before the model is loaded: a typo or a nonsense value fails in a second, not after the load
        self.settings = UnlearnSettings.from_kwargs(settings, **knobs)
        self.save_hyperparameters({**({"model": model} if is_path else {}),
                                   **{k: getattr(self.settings, k) for k in KNOBS if k != "steps"}, "dtype": dtype})
        self.model = build_model(model, dtype)
        self.automatic_optimization = False
        self.init_evaluation()
        self.unlearner: Any = None
        self.history: list[Any] = []  # the record of each training step (its last trial)
        self._curvature_data: Iterable[Any] | None = None
        self._holdout_data: Iterable[Any] | None = None
        self._held_retain: Mapping[str, Tensor] | None = None
        self._forget: Mapping[str, Tensor] | None = None  # the last step's forget batch (the losses after the run)
        # the whole forget set when the forget loader has several batches: what the target is judged on
        self._forget_set: list[dict[str, Tensor]] | None = None
        self._begun = False

    method = setting("method")
    curvature_backend = setting("curvature")
    curvature_data = setting("curvature_data")

    @property
    def curvature_kwargs(self) -> dict[str, Any]:
        """The backend's arguments: `curvature_kwargs` with `fisher_type` (see `UnlearnSettings.backend_kwargs`)."""
        return self.settings.backend_kwargs()

    # ------------------------------------------------------------------ data
    def set_curvature_data(self, batches: Iterable[Any]) -> UnlearningModule:
        """The batches the curvature is fitted on at `on_train_start` (any iterable of batches; overrides the
        datamodule's `curvature_dataloader`). Returns self."""
        self._curvature_data = batches
        return self

    def set_holdout_data(self, batches: Iterable[Any] | None) -> UnlearningModule:
        """Never-trained batches of the forget set's kind (labelled like the forget batches): the run aims at the
        forget set looking like them (overrides the datamodule's `holdout` split; None: back to it). Returns self."""
        self._holdout_data = batches
        return self

    def _holdout_source(self) -> list[dict[str, Tensor]]:
        """This process's holdout batches for the target ([] for none): `set_holdout_data`, else the datamodule's
        `holdout` split (a `holdout_dataloader()` or `dataloader("holdout")`), at most `holdout_batches`."""
        limit = self.settings.holdout_batches
        if limit == 0:
            return []
        batches = self._holdout_data
        if batches is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is not None and hasattr(datamodule, "holdout_dataloader"):
                batches = datamodule.holdout_dataloader()
            elif datamodule is not None and hasattr(datamodule, "dataloader"):
                try:
                    batches = datamodule.dataloader("holdout")
                except (ValueError, KeyError, TypeError):  # a data module without a holdout split
                    batches = None
        out: list[dict[str, Tensor]] = []
        for batch in batches if batches is not None else ():
            if limit is not None and len(out) >= limit:
                break
            out.append(self._prepare(batch))
        return out

    def _curvature_source(self) -> list[dict[str, Tensor]]:
        split = "retain" if self.curvature_data == "retain" else "forget"
        batches = self._curvature_data
        if batches is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is not None and hasattr(datamodule, "curvature_dataloader"):
                batches = datamodule.curvature_dataloader(split)
        if batches is None:
            raise ValueError(
                f"UnlearningModule: no curvature data for curvature_data={self.curvature_data!r}; call"
                f" module.set_curvature_data(<{split} batches>) or use a datamodule with curvature_dataloader(split)"
            )
        limit = self.settings.curvature_batches
        out = []
        for batch in batches:
            if limit is not None and len(out) >= limit:
                break
            out.append(self._prepare(batch))
        return out

    def _prepare(self, batch: Any) -> dict[str, Tensor]:
        return move_data_to_device(dict(default_batch_transform(batch)), self.device)

    # ------------------------------------------------------------------ fit
    def setup(self, stage: str) -> None:
        check_strategy(self.trainer.strategy, type(self).__name__)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """A stand-in optimizer whose `step(closure)` runs the method's step: the method updates the weights itself,
        while Lightning counts optimizer steps (`global_step`, `max_steps`, logging and checkpoint cadence)."""
        return MethodStep([p for p in self.model.parameters() if p.requires_grad])

    def configure_model(self) -> None:
        """Under Lightning's `ModelParallelStrategy` (FSDP2): shard the model over the data-parallel mesh
        (`lightning_unlearn.fsdp.shard_model`: every transformer block, then the whole model), unless it is sharded
        already. Other strategies: nothing to do."""
        mesh = getattr(self._trainer.strategy, "device_mesh", None) if self._trainer is not None else None
        if mesh is None or is_sharded(self.model):
            return
        check_strategy(self.trainer.strategy, type(self).__name__)
        shard_model(self.model, mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh)

    def on_train_start(self) -> None:
        """Fit the curvature and build the method (`prepare_request`, the first half of every driver's request),
        then calibrate the target on this process's share of the holdout batches. An FSDP2-sharded model works on
        its gathered parameters until the end of the run (`lightning_unlearn.fsdp.full_parameters`)."""
        trainer = self.trainer
        self._full_parameters = contextlib.ExitStack()
        self._full_parameters.enter_context(full_parameters(self.model))
        rank, world = trainer.global_rank, trainer.world_size
        source = self._curvature_source() if self.settings.second_order else None
        holdout = self._holdout_source()
        planned = trainer.num_training_batches
        counts = {"forget": int(planned) if math.isfinite(planned) else 1,
                  "curvature": None if source is None else len(source), "holdout": len(holdout) or None}
        self.unlearner = prepare_request(
            self.model, settings=self.settings, curvature_source=source, reduce=strategy_reduce(trainer),
            gather=strategy_gather(trainer), rank=rank, world_size=world, batch_counts=counts,
            required=("forget", "curvature") if source is not None else ("forget",), who=type(self).__name__,
            steps=None if self.settings.second_order else self._planned_steps())
        self.history = []
        self._held_retain, self._forget, self._begun = None, None, False
        self._recent_retain: deque[dict[str, Tensor]] = deque(maxlen=REPAIR_BATCHES)  # what the retain repair descends
        self._forget_set = self._read_forget_set()
        if holdout:  # every process keeps its share: the engine sums the holdout statistics across processes
            self.unlearner.calibrate(share(holdout, rank, world))

    def _read_forget_set(self) -> list[dict[str, Tensor]] | None:
        """This process's whole forget set (its batches, on the device) when the training loader's forget loader has
        more than one batch (on any process); None when it has one (each step then sees the whole forget set, the
        target is judged on it as it comes). The forget loader is the "forget" loader of a `CombinedLoader` (or dict)
        of named loaders, or the training loader itself when its batches are forget batches alone. The forget set is
        small (what is to be forgotten), and the steps measure it whole anyway when it is one batch. Without a forget
        loader of known length (an iterable dataset, or a loader of already-combined batches) and with several
        training batches, a `ForgetBatchWarning` says that the target is judged per forget batch, and the fix. Every
        process takes the same decision (the engine's measurements of the forget set are collectives)."""
        trainer = self.trainer
        loader = trainer.train_dataloader
        iterables = loader.iterables if isinstance(loader, CombinedLoader) else loader
        named = isinstance(iterables, Mapping)
        source = iterables.get("forget") if named else iterables
        if isinstance(source, (list, tuple)):
            source = None  # loaders by position: no forget loader to tell apart
        batches: list[dict[str, Tensor]] | None = None
        if source is not None and _batch_count(source) is not None:
            batches = []
            seen: set[tuple[int, ...]] = set()
            read: list[Any] = []  # every batch read, kept alive: the identities in `seen` stay unique
            with _random_state_kept(source):
                for batch in source:
                    if not named and isinstance(batch, Mapping) and "forget" in batch:
                        batches = None  # the loader combines forget and retain itself: no forget set apart
                        break
                    read.append(batch)
                    tensors = tuple(id(v) for v in (batch.values() if isinstance(batch, Mapping) else ())
                                    if isinstance(v, Tensor))
                    if tensors and tensors in seen:
                        continue  # the very same batch again (a loader that repeats one batch): counted once
                    seen.add(tensors)
                    batches.append(self._prepare(batch))
        flags = torch.tensor([float(batches is None), float(batches is not None and len(batches) > 1)],
                             device=self.device)
        unreadable, several = (float(x) > 0 for x in strategy_reduce(trainer)(flags))
        if not unreadable:
            return batches if several else None
        planned = trainer.num_training_batches
        if not math.isfinite(planned) or planned > 1:
            rank_zero_warn(
                "UnlearningModule: the training loader has several batches but no forget loader of known length to "
                "read the whole forget set from, so the target (nothing to do, stop) is judged on each step's forget "
                "batch alone: one batch that looks unseen can end the run while the rest of the forget set is still "
                "memorised. Pass CombinedLoader({'forget': <forget loader>, 'retain': <retain loader>}) with a forget "
                "loader of finite length, put the whole forget set in one batch (data.forget_batch_size), or use the "
                "Unlearn callback / serve_request, which judge the whole forget set.", category=ForgetBatchWarning)
        return None

    def _planned_steps(self) -> int:
        """A first-order method's step budget: the trainer's `max_steps`, or the methods' default when it is
        unbounded."""
        cap = self._step_cap()
        return cap if cap is not None else DEFAULT_NEWTON_STEPS

    def _step_cap(self) -> int | None:
        """The trainer's `max_steps` (None: unbounded). A second-order request takes its own staged steps and repeats
        of the last stage, as every other driver's (5 and 2; 10 and 2 in the knowledge regime), within it
        (`Unlearner.limit_steps`): fewer steps give fewer, larger stages and no repeat."""
        max_steps = self.trainer.max_steps
        return int(max_steps) if max_steps is not None and max_steps > 0 else None

    def _warn_if_the_regime_is_short(self, unlearner: Any) -> None:
        """The knowledge regime (memorised retain data) was measured with `KNOWLEDGE_STEPS` staged steps; under
        Lightning a `max_steps` below it caps their number, so fewer is said once, with the fix."""
        steps = getattr(unlearner, "steps", KNOWLEDGE_STEPS)
        if getattr(unlearner, "knowledge_regime", False) and steps < KNOWLEDGE_STEPS:
            rank_zero_warn(
                "UnlearningModule: the held retain data is memorised, so the default recipe runs its knowledge "
                f"regime, chosen with {KNOWLEDGE_STEPS} staged steps; the trainer's max_steps={steps} gives it "
                f"{steps} larger stages (on TOFU-style data 5 stages ended budget_exhausted with less forgetting: "
                f"docs/recipe.md §9). Set Trainer(max_steps={KNOWLEDGE_STEPS}) (--trainer.max_steps "
                f"{KNOWLEDGE_STEPS}); the run still stops at its target.", category=UserWarning)

    def _split(self, batch: Any) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        if isinstance(batch, Mapping) and "forget" in batch:
            forget = self._prepare(batch["forget"])
            retain = self._prepare(batch["retain"]) if batch.get("retain") is not None else None
            return forget, retain
        return self._prepare(batch), None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        forget, retain = self._split(batch)
        unlearner = self.unlearner
        if unlearner.refresh_due(self.global_step):
            # iterative Newton: re-estimate the curvature at the current weights (the method's fit() does this in its
            # own loop; here Lightning drives the steps), from this process's share like the first fit
            unlearner.fit_curvature(share(self._curvature_source(), self.global_rank, self.trainer.world_size))
        if retain is not None and self._held_retain is None:
            self._held_retain = retain  # the first retain batch: the safety budget bounds the damage of the whole run
        elif retain is not None:
            self._recent_retain.append(retain)
        size = forget["input_ids"].shape[0]
        self._forget = forget
        if not self._begun:
            self._begun = True
            # the whole forget set (not this step's batch) decides whether it already looks unseen: nothing to do
            if unlearner.begin(self._forget_set or [forget], [], self._held_retain):
                self.trainer.should_stop = True
                self.log_dict({f"unlearn/{k}": v for k, v in summary_numbers(unlearner.summary()).items()},
                              on_step=True, on_epoch=False, batch_size=size)
                return None
            if self.settings.second_order:  # the request's steps and repeats, within the trainer's max_steps
                unlearner.limit_steps(self._step_cap())
            self._warn_if_the_regime_is_short(unlearner)
        step_forget = self._forget_to_step_on(forget)
        record = self.optimizers().step(closure=lambda: unlearner.step(step_forget, retain, self._held_retain))
        if self._forget_set is not None:
            self._judge_on_forget_set(record)
        self.history.append(record)
        if unlearner.should_stop(record) or (self.settings.second_order
                                             and not unlearner.step_due(len(self.history), record)):
            self.trainer.should_stop = True
        numbers = {f"unlearn/{k}": v for k, v in record_numbers(record).items()}
        numbers["unlearn/status_code"] = float(STATUS_CODES[self.status])  # how the run would end now
        self.log_dict(numbers, on_step=True, on_epoch=False, batch_size=size)
        return torch.tensor(record.forget_loss)

    def _forget_to_step_on(self, forget: dict[str, Tensor]) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """What this step forgets: its forget batch, or the whole forget set when the batch already reaches the
        target on its own while the whole set does not (else the run would have ended). Such a batch has nothing left
        to forget: the method's step-length search would take a vanishing step on it and start every later search
        from that step, and the run would stall on the batches still memorised. Only with a forget set of several
        batches and a target; the batch's score is the one the step itself starts from (measured once)."""
        target = self.unlearner.current_target()
        if self._forget_set is None or target is None:
            return forget
        score, _ = self.unlearner.forget_score([forget])
        return self._forget_set if math.isfinite(score) and score >= target else forget

    def _judge_on_forget_set(self, record: Any) -> None:
        """Make an accepted step's record speak for the whole forget set, not the step's batch: its forget loss and
        score become the whole set's, and its reason "target_reached" exactly when the whole set reached the target
        (a batch that reached it alone: "accepted"). `should_stop` and the run's status read the reason, so neither
        the stop nor the status is decided on one batch. Rolled-back records keep their numbers (the weights are
        those of before the step). The record is changed in place: it is the one in the method's history."""
        if not record.accepted or self._forget_set is None:
            return
        score, loss = self.unlearner.forget_score(self._forget_set)
        record.forget_score, record.forget_loss = score, loss
        if record.target is not None and math.isfinite(score) and score >= record.target:
            record.reason = "target_reached"
        elif record.reason == "target_reached":
            record.reason = "accepted"

    def on_train_end(self) -> None:
        if self._begun and self._forget is not None:
            # the retain repair (knowledge regime) on the last retain batches; the losses after (on the whole forget
            # set), the status, the warning
            self.unlearner.finish(self._forget_set or [self._forget], list(self._recent_retain), self._held_retain)
        self._forget_set = None  # let the forget batches go
        if self.trainer.world_size > 1:
            broadcast_parameters(self.model)  # every process ends with the same weights (see serve_request)
        if is_sharded(self.model) and self.trainer.is_global_zero:  # full values for save_pretrained on rank 0
            self._gathered_state = gathered_state_dict(self.model)
        self._leave_full_parameters(None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume a fit from a checkpoint (`trainer.fit(..., ckpt_path=...)`): an unlearning run's retain
        budget, its losses before and its target are measured on the original model at the start of the run, and
        `on_train_start` would measure them again on the checkpoint's weights, so a resumed run would get a second
        full retain budget on top of the one spent, report the checkpoint as "before", and go on after a run that
        had ended. Validating or testing a checkpoint (`trainer.validate/test(ckpt_path=...)`) loads it as usual."""
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            raise UserInputError(
                "UnlearningModule: an unlearning run cannot be resumed from a checkpoint (fit with ckpt_path): its "
                "retain budget, its losses before and its target belong to the original model, and a resumed run "
                "would measure them anew on the checkpoint's weights (a second retain budget on top of the spent "
                "one); re-run the unlearning from the original model without ckpt_path (--ckpt_path), and evaluate a "
                "checkpoint with trainer.validate/test(ckpt_path=...)")

    def on_exception(self, exception: BaseException) -> None:
        self._leave_full_parameters(exception)  # the shards keep their values from before the run

    def _leave_full_parameters(self, error: BaseException | None) -> None:
        stack, self._full_parameters = getattr(self, "_full_parameters", None), None
        if stack is not None:
            if error is None:
                stack.close()
            else:
                stack.__exit__(type(error), error, error.__traceback__)

    # ------------------------------------------------------------------ outcome
    @property
    def status(self) -> str | None:
        """How the run ended (None before a step): "target_reached", "budget_exhausted" or "nothing_accepted"; during
        the run, how it would end now: the method's `status`."""
        return self.unlearner.status if self.unlearner is not None and self._begun else None

    def summary(self) -> dict[str, Any]:
        """The method's `summary()`: the same numbers as a request's (`records.SUMMARY_FIELDS`); the forget losses
        are those of the whole forget set (of the last step's forget batch when the forget loader has one batch, or
        no forget loader could be told apart) and the retain losses those of the held retain batch (the first retain
        batch)."""
        if self.unlearner is None or not self._begun:
            return dict.fromkeys(SUMMARY_FIELDS)
        return self.unlearner.summary()

    # ------------------------------------------------------------------ export
    def save_pretrained(self, path: str | Path, extra_files: Mapping[str, str] | None = None) -> Path:
        """Write the (unlearned) model with `save_pretrained` (safetensors), atomically: into a temporary directory
        beside `path`, then renamed; tokenizer files of the source directory are copied along, and `extra_files`
        (name -> text, e.g. the command's `run.json`) are written in before the folder appears. The source
        checkpoint is never overwritten. Only global rank 0 writes."""
        path = Path(path).expanduser().resolve()
        if self.source_path is not None and path == self.source_path:
            raise ValueError(f"refusing to overwrite the original checkpoint {str(path)!r}; save the unlearned model"
                             " to another directory")
        if self._trainer is not None and not self.trainer.is_global_zero:
            return path
        gathered = getattr(self, "_gathered_state", None) if is_sharded(self.model) else None
        if is_sharded(self.model) and gathered is None:
            raise RuntimeError("UnlearningModule.save_pretrained: the model is sharded (FSDP2) and no gathered copy of "
                               "its weights is at hand; save after a fit on this module (rank 0 keeps one)")
        return atomic_save_pretrained(self.model, path, state_dict=gathered, files_from=self.source_path,
                                      extra_files=extra_files)


class MethodStep(torch.optim.Optimizer):
    """The optimizer Lightning sees in `UnlearningModule`: `step(closure)` returns `closure()` (the method's
    `StepRecord`); the update itself, its safety check and rollback are the method's."""

    def __init__(self, params: Iterable[Tensor]) -> None:
        super().__init__(params, defaults={})

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if closure is None:
            raise ValueError("MethodStep.step needs closure=<a call of the unlearning method's step>")
        return closure()
