"""`lightning-unlearn fit|validate|test`: LightningCLI over `UnlearningModule` and `ForgetRetainDataModule`, with the
checks of `cli.config` before any work, an `--output` held for the run and its `run.json`, the loggers, and a
progress bar counting unlearning steps (see the docstring of `lightning_unlearn.cli`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import EXIT_NOTHING_ACCEPTED
from .config import check_choices, check_fit_trainer, check_paths, protected_paths, redact_forget_selection
from .signals import Interrupted
from .validate import choose_evaluated_model


def _loggers(save_dir: str) -> list[dict[str, Any]]:
    """A CSV logger always; wandb offline unless the user set WANDB_MODE=online (never asks for a login)."""
    offline = os.environ.get("WANDB_MODE", "offline") != "online" or not _wandb_online_possible()
    return [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": save_dir, "name": "csv"}},
            {"class_path": "lightning.pytorch.loggers.WandbLogger",
             "init_args": {"project": "lightning-unlearn", "save_dir": save_dir, "offline": offline}}]


def _wandb_online_possible() -> bool:
    """With WANDB_MODE=online: whether wandb has an API key and its server answers within a few seconds; if not,
    say so and switch to offline (WANDB_MODE=offline), instead of a traceback after wandb's own minutes of retries."""
    import netrc
    import socket
    from urllib.parse import urlparse

    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = urlparse(url).hostname or "api.wandb.ai"
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        with contextlib.suppress(OSError, netrc.NetrcParseError):
            key = (netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) or (None, None, None))[2]
    problem = None
    if not key:
        problem = "no wandb API key (set WANDB_API_KEY or run `wandb login`)"
    else:
        port = urlparse(url).port or (443 if url.startswith("https") else 80)
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as err:
            problem = f"{host} cannot be reached ({err.strerror or type(err).__name__})"
    if problem is None:
        return True
    os.environ["WANDB_MODE"] = "offline"
    print(f"lightning-unlearn: warning: WANDB_MODE=online but {problem}: logging to wandb offline instead (upload "
          "later with `wandb sync`)", file=sys.stderr)
    return False


def _step_progress_bar(bar: Any) -> Any:
    """Lightning's default progress bar counting unlearning steps (`global_step` of `max_steps`) instead of epochs:
    an epoch of the data module is one pass over the forget set (often one batch) and `max_epochs` is -1, so the
    stock bar said "Epoch 0/-2". Returns `bar` unchanged when it is not one of the two stock bars."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    def steps(trainer: Any) -> int | None:
        return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None

    class StepRichProgressBar(RichProgressBar):
        @property
        def total_train_batches(self) -> int | float:
            return steps(self.trainer) or super().total_train_batches

        def _get_train_description(self, current_epoch: int) -> str:
            return "unlearning steps"

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if self.train_progress_bar_id is None or self._leave or steps(trainer) is None:
                super().on_train_epoch_start(trainer, pl_module)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if steps(trainer) is not None:
                self._update(self.train_progress_bar_id, trainer.global_step)

    class StepTQDMProgressBar(TQDMProgressBar):
        @property
        def total_train_batches(self) -> int | float:
            return steps(self.trainer) or super().total_train_batches

        def on_train_epoch_start(self, trainer: Any, *_: Any) -> None:
            if trainer.current_epoch == 0 or self._leave or steps(trainer) is None:
                super().on_train_epoch_start(trainer)
                self.train_progress_bar.set_description("unlearning steps")

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if steps(trainer) is None:
                return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    if type(bar) is RichProgressBar:
        return StepRichProgressBar()
    if type(bar) is TQDMProgressBar:
        return StepTQDMProgressBar(refresh_rate=bar.refresh_rate)
    return bar


def run(args: Sequence[str]) -> int:
    """Run `fit`/`validate`/`test`; returns the exit status (0, or 3 when `fit` accepted no step)."""
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from ..callbacks import ProcessGroupTeardown
    from ..data import ForgetRetainDataModule
    from ..io import MANIFEST, RunRecord, check_output, claim_output, release_output
    from ..module import UnlearningModule
    from ..strategies import check_strategy_setting

    save_dir = os.environ.get("LIGHTNING_UNLEARN_LOG_DIR", "runs/cli")
    record = RunRecord("fit")

    class RedactedSaveConfig(SaveConfigCallback):
        """Lightning's config saving, with the forget selection redacted (see `redact_forget_selection`)."""

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            original, self.config = self.config, redact_forget_selection(self.config)
            try:
                super().setup(trainer, pl_module, stage)
            finally:
                self.config = original

    class UnlearnCLI(LightningCLI):
        """LightningCLI with an `--output` for the unlearned model (checked before any work), early key-naming
        config checks, a `run.json` and exit status 3 when no step was accepted."""

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_argument("--output", type=str | None, default=None,
                                help="directory for the unlearned model (save_pretrained, safetensors) after fit; "
                                     "validate/test evaluate it when it exists")
            parser.add_argument("--overwrite", action="store_true",
                                help="replace an existing non-empty --output (never the source model or data)")

        def parse_arguments(self, parser: Any, args: Any) -> None:
            # LightningCLI's own version warns with the whole command line when `args` and sys.argv are both given
            # (a run from Python, `main([...])`): the line may hold a forget regex or ids
            self.config = parser.parse_args(args)

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            check_choices(config)
            check_strategy_setting((config.get("trainer") or {}).get("strategy"))
            check_paths(config)
            if self.subcommand == "fit":
                check_fit_trainer(config)
                check_log_folder(config, save_dir)
            if self.subcommand == "fit" and config.get("output"):
                record.output = check_output(config["output"], bool(config.get("overwrite")),
                                             protected_paths(config, save_dir))
                # one run per output: a second run into it is refused now (the launcher's other processes of this
                # run, which start the command again, do not lock)
                record.claim = claim_output(record.output, bool(config.get("overwrite")), lock=_launching_process())
            elif self.subcommand in ("validate", "test"):
                choose_evaluated_model(config, args)

        def after_instantiate_classes(self) -> None:
            super().after_instantiate_classes()
            callbacks = self.trainer.callbacks
            callbacks[:] = [_step_progress_bar(c) for c in callbacks]

        def before_fit(self) -> None:
            if self.trainer.is_global_zero:
                record.start()

        def after_fit(self) -> None:
            status = getattr(self.model, "status", None)
            if not self.trainer.is_global_zero:
                return
            summary = self.model.summary() if status is not None else {}
            record.status, record.steps_accepted = status, summary.get("steps_accepted")
            if status is not None:
                target = summary.get("target")
                print(f"unlearning status: {status} (target {'none' if target is None else f'{target:.4g}'}, "
                      f"source {summary.get('target_source')}, {summary.get('steps_accepted')} step(s) accepted)")
            output = self.config[self.subcommand].get("output")
            if status is None:  # no training step ran (an empty forget loader, a trainer limit): nothing was unlearned
                record.exit_code = EXIT_NOTHING_ACCEPTED
                print("no unlearning step ran (the trainer stopped before the first step: e.g. trainer.max_time), so "
                      f"{'no model was written to ' + repr(str(output)) if output else 'nothing was written'} "
                      f"(exit status {EXIT_NOTHING_ACCEPTED})")
                record.finish(model_written=False)
                return
            if status == "nothing_accepted":
                record.exit_code = EXIT_NOTHING_ACCEPTED
                reasons: dict[str, int] = {}
                for step in self.model.history:
                    reasons[step.reason] = reasons.get(step.reason, 0) + 1
                why = ", ".join(f"{reason} x{count}" for reason, count in sorted(reasons.items()))
                print(f"nothing accepted: every trial was rolled back ({why}), the model is unchanged, so "
                      f"{'no model was written to ' + repr(str(output)) if output else 'nothing was written'} "
                      f"(exit status {EXIT_NOTHING_ACCEPTED}); retain_increase: raise model.max_retain_increase or "
                      "give more retain data; non_finite: lower model.scale or raise model.damping")
                record.finish(model_written=False)
                return
            record.exit_code = 0
            if output:
                manifest = {"tool": "lightning-unlearn", **record.fields(finished=True, model_written=True)}
                path = self.model.save_pretrained(output, extra_files={MANIFEST: json.dumps(manifest, indent=2)})
                record.done = True
                print(f"unlearned model written to {path}")
                if record.claim is not None and record.claim.replaced_during_run:
                    print(f"note: --output {str(output)!r} appeared during the run with files in it (another run or "
                          "program wrote it); they were replaced by this run's model because --overwrite was given")
            else:
                record.finish(model_written=False)

    no_exit = {"exit_on_error": False}
    try:
        with _removed_on_failure(Path(save_dir)):
            UnlearnCLI(
                UnlearningModule, ForgetRetainDataModule, args=list(args),
                trainer_defaults={"logger": _loggers(save_dir), "accelerator": "auto", "enable_checkpointing": False,
                                  "log_every_n_steps": 1,
                                  # multi-process runs leave the process group together (a clean exit)
                                  "callbacks": [ProcessGroupTeardown()]},
                save_config_callback=RedactedSaveConfig, save_config_kwargs={"overwrite": True},
                parser_kwargs={**no_exit, **{sub: dict(no_exit) for sub in ("fit", "validate", "test", "predict")}},
            )
    except BaseException as err:
        if not (isinstance(err, SystemExit) and not err.code):
            record.abort(err, interrupted=isinstance(err, Interrupted), model_written=False)
        raise
    finally:
        release_output(record.claim)
    return record.exit_code or 0


def check_log_folder(config: Any, save_dir: str) -> None:
    """Refuse a log folder (`LIGHTNING_UNLEARN_LOG_DIR`) inside the source model's folder: the run's CSV and wandb
    logs would be written into the model the request must leave as it was."""
    from .config import ConfigError

    model = (config.get("model") or {}).get("model")
    if not isinstance(model, (str, os.PathLike)) or not Path(model).expanduser().is_dir():
        return
    source, logs = Path(model).expanduser().resolve(), Path(save_dir).expanduser().resolve()
    if logs == source or source in logs.parents:
        raise ConfigError(f"the log folder (LIGHTNING_UNLEARN_LOG_DIR={save_dir!r}) is inside the source model's "
                          f"folder {str(model)!r}; the logs would be written into the model: set "
                          "LIGHTNING_UNLEARN_LOG_DIR to a folder outside it")


def _launching_process() -> bool:
    """Whether this process is the one the user started (not a process a launcher started for another rank)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


@contextlib.contextmanager
def _removed_on_failure(root: Path) -> Iterator[None]:
    """Delete what a failed run created under `root` (log versions, wandb runs, saved configs): no partial output."""
    def listing() -> set[Path]:
        if not root.exists():
            return set()
        return {p for p in root.rglob("*") if len(p.relative_to(root).parts) <= 3}

    existed, before = root.exists(), listing()
    try:
        yield
    except BaseException as err:
        if isinstance(err, SystemExit) and not err.code:
            raise
        wandb = sys.modules.get("wandb")
        if wandb is not None:  # else its service writes the run's files again after the cleanup
            with contextlib.suppress(Exception):
                if getattr(wandb, "run", None) is not None:
                    wandb.finish(exit_code=1)
        if not existed:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for path in sorted(listing() - before, key=lambda p: len(p.parts)):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists():
                    path.unlink()
        raise


