"""The `lightning-unlearn` command.

    lightning-unlearn demo [--output runs/demo]              # the whole pipeline on the embedded default
    lightning-unlearn fit --config configs/unlearn_kfac.yaml  # unlearning as a LightningCLI run
    lightning-unlearn validate|test --config ...              # forget / retain loss and perplexity
    lightning-unlearn evaluate --model DIR --tofu DIR         # TOFU / MUSE metrics as JSON (evaluate_command.py)

`fit`/`validate`/`test` are `LightningCLI` (jsonargparse) over `UnlearningModule` and `ForgetRetainDataModule`;
after `fit`, `--output DIR` receives the unlearned model (`save_pretrained`, safetensors) and its `run.json`.
`validate`/`test` evaluate the config's `output` when it holds a model (else the original, and they say so).
Logging: a CSV logger always, and the wandb logger in offline mode unless `WANDB_MODE` says otherwise (it never
asks for a login; `WANDB_MODE=online` without an API key or a reachable server says so and logs offline).

Outputs are checked before any work (`lightning_unlearn.io.check_output`): an existing non-empty `--output` needs
`--overwrite`, a plain file there is refused, and no output may be (or contain) the source model, the training
data, any config file or the log folder, with or without `--overwrite`. A run holds its `--output` until it ends
(`lightning_unlearn.io.claim_output`): a second run into it is refused at its start, and a folder that appears there
during the run is replaced only with `--overwrite` (and the run says so). `run.json` in the output folder says how
the run ended (status, steps accepted, exit code, start and end, `finished`); while a run is under way an earlier
output of ours (or an empty folder) at `--output` holds `finished: false`, so an interrupted run never leaves an older
model that looks like its own.

Exit status (`lightning_unlearn.errors`): 0 done; 2 bad input; 3 the request accepted no step (the model is
unchanged, nothing is written to `--output`); 130 / 143 stopped by SIGINT / SIGTERM (the atomic writers leave no
partial output, and the log files of the run are removed).

Errors, one line on stderr (`lightning-unlearn: error: ...`), exit 2, no traceback: `UserInputError` (and its
`ConfigError`) and jsonargparse's own config errors, which are certainly the user's; a `ValueError` raised by our
own code (a check not yet converted to `UserInputError`), an `OSError` naming a file (missing, not readable, not
writable) and a `UnicodeDecodeError` (a data file that is not text) are almost always the user's too, so they get
the same line plus a hint: set `LIGHTNING_UNLEARN_TRACEBACK=1` for the traceback. Anything else is a bug of ours
and keeps its traceback; `LIGHTNING_UNLEARN_TRACEBACK=1` re-raises every error. No message holds a forget id or
pattern (the values given on the command line are masked).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import EXIT_NOTHING_ACCEPTED, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USER_ERROR, UserInputError

DEMO_HELP = "run the whole pipeline offline on the embedded default corpus and write a report"
#: set to 1 to see the traceback of every error (instead of the one-line message)
TRACEBACK_ENV = "LIGHTNING_UNLEARN_TRACEBACK"
TRACEBACK_HINT = f"(set {TRACEBACK_ENV}=1 for the traceback)"


class ConfigError(UserInputError):
    """A configuration value is wrong; the message names the key."""


class Interrupted(BaseException):
    """Raised by the command's SIGINT/SIGTERM handler. Like KeyboardInterrupt it unwinds through every `finally`
    (the atomic writers delete their temporary output) and no `except Exception` stops it; it is not one, because
    Lightning turns a KeyboardInterrupt into exit status 1. `main` exits with `code` (128 + the signal number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.code = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM}.get(signum, 128 + signum)
        self.name = signal.Signals(signum).name


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


DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")


def _looks_local(value: str) -> bool:
    """A path rather than a hub id: explicit prefixes, a data-file suffix, or a first component that exists here."""
    path = Path(value).expanduser()
    return (value.startswith((".", "/", "~")) or path.suffix in DATA_SUFFIXES or path.exists()
            or (len(path.parts) > 1 and Path(path.parts[0]).exists()))


def _check_paths(config: Any) -> None:
    """Fail early, naming every key whose model or data path does not exist (or whose model id does not load its
    config offline)."""
    problems = []
    model = config.get("model") or {}
    value = model.get("model")
    if isinstance(value, str) and Path(value).expanduser().is_dir():
        problems += _unreadable_files(Path(value).expanduser())
    if isinstance(value, str) and not Path(value).expanduser().exists():
        if _looks_local(value):
            problems.append(f"model.model: path {value!r} does not exist; give a saved model directory "
                            "(e.g. runs/demo/original after `lightning-unlearn demo`) or a hub id")
        else:
            try:
                from transformers import AutoConfig

                AutoConfig.from_pretrained(value)
            except (OSError, ValueError) as err:
                problems.append(f"model.model: cannot load {value!r} ({type(err).__name__}); give a saved model "
                                "directory, or a hub id while online")
    data = config.get("data") or {}
    for key in ("train", "forget", "retain", "test", "holdout", "tokenizer"):
        value = data.get(key)
        if isinstance(value, str) and _looks_local(value) and not Path(value).expanduser().exists():
            problems.append(f"data.{key}: path {value!r} does not exist; fix the path in the config")
    if problems:
        raise ConfigError("\n  ".join(problems))


def _unreadable_files(folder: Path) -> list[str]:
    """model.model problems for the files of a saved model that cannot be opened (permissions, a link to a missing
    file, a folder in place of a file): said as such, not as a missing model or a corrupt one."""
    problems = []
    for file in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin"), folder / "config.json"]):
        if not (file.exists() or file.is_symlink()):
            continue
        try:
            with file.open("rb") as handle:
                handle.read(8)
        except OSError as err:
            why = err.strerror or type(err).__name__
            if file.is_symlink() and not file.exists():
                why += f": it is a link to {os.readlink(file)!r}, which does not exist"
            problems.append(f"model.model: {str(file)!r} cannot be read ({why}); the model's files must be readable "
                            "files: fix the permissions (chmod a+r) or the link, or save or copy the model again")
    return problems


def _check_choices(config: Any) -> None:
    from .methods import CURVATURE_BACKENDS, CURVATURE_DATA, METHODS

    model = config.get("model") or {}
    checks = (("method", sorted(METHODS)), ("curvature", CURVATURE_BACKENDS), ("curvature_data", CURVATURE_DATA))
    for key, choices in checks:
        value = model.get(key)
        if value is not None and value not in choices:
            raise ConfigError(f"model.{key}: unknown value {value!r}; choose one of {', '.join(choices)}")
    dtype = model.get("dtype")
    if isinstance(dtype, str):
        from .module import parse_dtype

        parse_dtype(dtype)  # raises UserInputError naming the valid dtypes


REDACTED_KEYS = ("data.forget_regex", "data.forget_ids")


def redact_forget_selection(config: Any) -> Any:
    """A copy of a parsed config whose forget selection is replaced by a placeholder that keeps nothing of it:
    `"<redacted regex>"`, `["<3 ids redacted>"]`. The pattern of a secret can be a secret itself, ids are short
    (an unsalted hash of `doc-10, doc-17` is brute-forced in a second), and the saved config goes to the logs."""
    config = config.clone()
    for key in REDACTED_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            config[key] = "<redacted regex>"
        else:
            count = len(list(value)) if isinstance(value, (list, tuple, set, frozenset)) else None
            config[key] = [f"<{count} ids redacted>" if count is not None else "<redacted ids>"]
    return config


def _forget_values(args: Sequence[str]) -> list[str]:
    """The forget selection as given on the command line (`--data.forget_regex X`, `--data.forget_ids=[...]`) and
    its items: masked in every message the command prints."""
    values: list[str] = []
    flags = tuple(f"--{key}" for key in REDACTED_KEYS)
    for i, arg in enumerate(args):
        for flag in flags:
            if arg == flag and i + 1 < len(args):
                values.append(args[i + 1])
            elif arg.startswith(flag + "="):
                values.append(arg[len(flag) + 1:])
    items = [item for value in values for item in value.strip("[]").replace('"', " ").replace("'", " ")
             .replace(",", " ").split()]
    return sorted({v for v in values + items if len(v) >= 3}, key=len, reverse=True)


def _mask(text: str, args: Sequence[str]) -> str:
    for value in _forget_values(args):
        text = text.replace(value, "<redacted>")
    return text


def _one_line(text: str) -> str:
    """A multi-line message (jsonargparse's `key:` + indented reason, several problems) as one line."""
    out = ""
    for line in (part.strip() for part in str(text).splitlines()):
        if line:
            out += (line if not out else (" " if out.endswith(":") else "; ") + line)
    return out


def _protected(config: Any, save_dir: str) -> dict[str, Any]:
    """What `--output` must never be nor contain: the source model, the training data, the config files, the log
    folder, the current folder (existing paths only, except the log folder, which the run creates)."""
    out: dict[str, Any] = {}
    model = config.get("model") or {}
    for key in ("model", "full_curvature"):
        value = model.get(key)
        if isinstance(value, (str, os.PathLike)) and Path(value).expanduser().exists():
            out[f"model.{key}"] = value
    data = config.get("data") or {}
    for key in ("train", "forget", "retain", "test", "holdout", "tokenizer"):
        value = data.get(key)
        if isinstance(value, (str, os.PathLike)) and Path(value).expanduser().exists():
            out[f"data.{key}"] = value
    files = list(config.get("config") or [])
    for n, path in enumerate(files, 1):  # every --config given, not only the last
        label = "the config file" if len(files) == 1 else f"config file {n} of {len(files)}"
        out[label] = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    out["the log folder (LIGHTNING_UNLEARN_LOG_DIR)"] = save_dir
    out["the current folder"] = os.getcwd()
    return out


def _has_model(path: Path) -> bool:
    return (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))


def _choose_evaluated_model(config: Any, args: Sequence[str]) -> None:
    """`validate`/`test`: evaluate the config's `output` (the unlearned model) when it holds a model, unless the
    command line names `--model.model`; say which model is evaluated either way."""
    from .io import MANIFEST, is_previous_output

    model = config.get("model") or {}
    current = model.get("model")
    output = config.get("output")
    explicit = any(a in ("--model", "--model.model") or a.startswith(("--model=", "--model.model=")) for a in args)
    if explicit or not isinstance(current, (str, os.PathLike)):
        print(f"evaluating the model {str(current)!r} (model.model)")
    elif output and _has_model(Path(output).expanduser()):
        config["model"]["model"] = str(output)
        note = ""
        if is_previous_output(Path(output).expanduser()):
            manifest = json.loads((Path(output).expanduser() / MANIFEST).read_text())
            if not manifest.get("finished"):
                note = f" (its {MANIFEST} says a later run did not finish: this model is from an earlier run)"
            elif manifest.get("model_written") is False:
                note = (f" (its {MANIFEST} says the last run, status {manifest.get('status')}, exit status "
                        f"{manifest.get('exit_code')}, wrote no model: this model is from an earlier run)")
        print(f"evaluating the unlearned model {str(output)!r} (the config's output{note}); pass --model.model to "
              "evaluate another")
    elif output:
        print(f"evaluating the ORIGINAL model {str(current)!r}: there is no unlearned model at output "
              f"{str(output)!r} yet (run `lightning-unlearn fit` first, or pass --model.model)")
    else:
        print(f"evaluating the model {str(current)!r} (model.model; no output in the config)")


class _RunRecord:
    """The `run.json` of a `fit` (or `demo`) run: what it wrote into the output folder, and the marker it left on an
    earlier output while running (numbers and status only)."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.output: Path | None = None
        self.started: str | None = None
        self.status: str | None = None
        self.steps_accepted: int | None = None
        self.exit_code: int | None = None
        self.marked = False  # a `finished: false` marker was written into an existing output folder
        self.claim: Any = None  # the output taken for this run (`lightning_unlearn.io.claim_output`)
        self.done = False  # the final run.json was written

    def fields(self, **extra: Any) -> dict[str, Any]:
        from .io import utc_now

        return {"command": self.command, "status": self.status, "steps_accepted": self.steps_accepted,
                "exit_code": self.exit_code, "started": self.started, "ended": utc_now(), **extra}

    def start(self) -> None:
        from .io import mark_running, utc_now

        self.started = utc_now()
        if self.output is not None:
            self.marked = mark_running(self.output, **self.fields(ended=None))

    def finish(self, **extra: Any) -> None:
        """The final run.json, where a marker was left (the model's own folder is written by `save_pretrained`)."""
        from .io import write_manifest

        if self.marked and self.output is not None:
            write_manifest(self.output, **self.fields(finished=True, **extra))
        self.done = True

    def abort(self, err: BaseException) -> None:
        """An interrupted or failed run: the marker says so (still `finished: false`)."""
        from .io import write_manifest

        if self.marked and not self.done and self.output is not None and self.output.is_dir():
            self.status = "interrupted" if isinstance(err, Interrupted) else "failed"
            self.exit_code = err.code if isinstance(err, Interrupted) else None
            with contextlib.suppress(OSError):
                write_manifest(self.output, **self.fields(finished=False, model_written=False))


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


def _lightning_cli(args: Sequence[str]) -> int:
    """Run `fit`/`validate`/`test`; returns the exit status (0, or 3 when `fit` accepted no step)."""
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from .callbacks import ProcessGroupTeardown
    from .data import ForgetRetainDataModule
    from .io import MANIFEST, check_output, claim_output, release_output
    from .module import UnlearningModule
    from .strategies import check_strategy_setting

    save_dir = os.environ.get("LIGHTNING_UNLEARN_LOG_DIR", "runs/cli")
    record = _RunRecord("fit")

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
            _check_choices(config)
            check_strategy_setting((config.get("trainer") or {}).get("strategy"))
            _check_paths(config)
            if self.subcommand == "fit" and config.get("output"):
                record.output = check_output(config["output"], bool(config.get("overwrite")),
                                             _protected(config, save_dir))
                # one run per output: a second run into it is refused now (the launcher's other processes of this
                # run, which start the command again, do not lock)
                record.claim = claim_output(record.output, bool(config.get("overwrite")), lock=_launching_process())
            elif self.subcommand in ("validate", "test"):
                _choose_evaluated_model(config, args)

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
            record.abort(err)
        raise
    finally:
        release_output(record.claim)
    return record.exit_code or 0


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


class _DemoParser(argparse.ArgumentParser):
    """argparse whose errors are a `UserInputError` (one line from `main`, exit 2) instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        raise UserInputError(f"{self.prog}: {message} (see --help)")


def _positive_int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
        return value

    parse.__name__ = flag
    return parse


def _demo(args: Sequence[str]) -> int:
    """Run the demo; returns the exit status (0, or 3 when the unlearning accepted no step)."""
    from .demo import run_demo, summary_table, timing_line

    parser = _DemoParser(prog="lightning-unlearn demo", description=DEMO_HELP)
    parser.add_argument("--output", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--config", default=None, help="a YAML file with `experiment:` and `unlearning:` sections")
    parser.add_argument("--train-steps", type=_positive_int("--train-steps"), default=None,
                        help="training steps of each model")
    parser.add_argument("--corpus-bytes", type=_positive_int("--corpus-bytes"), default=None,
                        help="size of the synthetic corpus")
    parser.add_argument("--cache", default=None, help="reuse trained models from this folder across runs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    ns = parser.parse_args(list(args))
    config, settings = load_demo_config(ns.config)
    if ns.train_steps is not None:
        config.train_steps = ns.train_steps
    if ns.corpus_bytes is not None:
        config.corpus_bytes = ns.corpus_bytes
    summary = run_demo(ns.output, config=config, settings=settings, progress=not ns.quiet, overwrite=ns.overwrite,
                       cache=ns.cache, protected={"--config": ns.config, "the current folder": os.getcwd()})
    from rich.console import Console

    console = Console()
    console.print(summary_table(summary))
    console.print(timing_line(summary))
    console.print(f"report: {Path(ns.output) / 'report.md'}   unlearned model: {Path(ns.output) / 'model'}")
    if summary.get("status") == "nothing_accepted":
        console.print(f"nothing accepted: every unlearning trial was rolled back, `model/` is the original model "
                      f"(exit status {EXIT_NOTHING_ACCEPTED}); see the report's steps for the reasons")
        return EXIT_NOTHING_ACCEPTED
    return 0


def load_demo_config(path: str | None):
    """(ExperimentConfig, UnlearnSettings) from a demo YAML (`experiment:` / `unlearning:`), defaults otherwise.

    Unknown keys and wrong types raise `ConfigError` naming the key."""
    import dataclasses
    import typing

    import yaml

    from .demo import DEFAULT_SETTINGS
    from .experiment import ExperimentConfig

    config, settings = ExperimentConfig(), dataclasses.replace(DEFAULT_SETTINGS)
    if path is None:
        return config, settings
    if not Path(path).is_file():
        raise ConfigError(f"--config: file {path!r} does not exist")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(raw) - {"experiment", "unlearning"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown section; a demo config has `experiment:` and `unlearning:`")
    for section, target in (("experiment", config), ("unlearning", settings)):
        fields = {f.name: f for f in dataclasses.fields(target)}
        hints = typing.get_type_hints(type(target))
        for key, value in (raw.get(section) or {}).items():
            if key not in fields:
                raise ConfigError(f"{section}.{key}: unknown key; valid keys: {', '.join(fields)}")
            default = getattr(target, key)
            if default is not None and not _same_kind(default, value):
                raise ConfigError(f"{section}.{key}: expected {type(default).__name__}, got {value!r}")
            if default is None and value is not None and not _fits_hint(hints.get(key), value):
                raise ConfigError(f"{section}.{key}: expected {hints.get(key)}, got {value!r}")
            setattr(target, key, tuple(value) if isinstance(default, tuple) else value)
    _check_choices({"model": {"method": settings.method, "curvature": settings.curvature,
                              "curvature_data": settings.curvature_data}})
    try:
        settings = settings.replace()  # every field checked again, together (`UnlearnSettings.validate`)
    except UserInputError as err:
        raise ConfigError(f"unlearning: {err}") from None
    return config, settings


def _fits_hint(hint: Any, value: Any) -> bool:
    """Whether `value` fits a field annotated `hint` whose default is None (e.g. `float | None`)."""
    import typing

    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or ([hint] if isinstance(hint, type) else [])
    samples = {float: 0.0, int: 0, str: "", bool: False}
    return not kinds or any(_same_kind(samples.get(k, None), value) if k in samples else isinstance(value, k)
                            for k in kinds if isinstance(k, type))


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(default))


def _user_error(err: BaseException, args: Sequence[str]) -> str | None:
    """The one-line message of an error that is the user's (see the module docstring), or None for a bug of ours."""
    from jsonargparse import ArgumentError

    if isinstance(err, ArgumentError):
        text = _hide_forget_values(str(err))
    elif isinstance(err, UserInputError):
        text = str(err)
    elif isinstance(err, UnicodeDecodeError):
        text = f"a file is not {err.encoding} text ({err.reason} at byte {err.start}) {TRACEBACK_HINT}"
    elif isinstance(err, OSError) and err.filename is not None or (
            isinstance(err, (ValueError, OSError)) and _raised_here(err)):
        text = f"{err or type(err).__name__} {TRACEBACK_HINT}"
    elif _trainer_setting_error(err):
        text = f"the trainer settings: {err} {TRACEBACK_HINT}"
    else:
        return None
    return _one_line(_mask(text, args))


def _trainer_setting_error(err: BaseException) -> bool:
    """Whether `err` is Lightning refusing a trainer setting (an accelerator, strategy, devices or precision it
    cannot use here): a `ValueError` or `MisconfigurationException` raised while the trainer reads its flags."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if not isinstance(err, (ValueError, MisconfigurationException)) or err.__traceback__ is None:
        return False
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    parts = Path(tb.tb_frame.f_code.co_filename).parts
    return "connectors" in parts and ("trainer" in parts or "fabric" in parts) and "lightning" in parts


def _hide_forget_values(text: str) -> str:
    """A config error of jsonargparse without the forget selection it would echo, whatever its length or source (a
    config file, `--data.forget_ids`, or a whole `--data '{...}'`): for a wrong type of `data.forget_ids` /
    `data.forget_regex` a message naming the key, the expected and the given type; for any other error that mentions
    them, the error without the given values and config text it quotes."""
    if not any(key.split(".")[-1] in text for key in REDACTED_KEYS):
        return text
    wrong = re.search(r'key "(?:data\.)?(forget_ids|forget_regex)"', text)
    if wrong:
        key = f"data.{wrong.group(1)}"
        given = re.search(r"Given value type: <class '([\w.]+)'>", text)
        want = ("a list of ids, e.g. [id-a, id-b] (one id too: [id-a])" if key.endswith("ids")
                else "one string, a regular expression")
        got = f"got a {given.group(1)}" if given else "got a value of another type"
        return (f"{key}: expected {want}, or null; {got} (the value is not shown: a forget selection may be a "
                "secret)")
    text = re.sub(r"Unable to load config '.*?'(?=;|\n|$)", "Unable to load config (not shown: it holds the forget "
                  "selection)", text, flags=re.S)
    return re.sub(r"(Given|Got) value: [^;\n]*", r"\1 value: <not shown>", text)


def _raised_here(err: BaseException) -> bool:
    """Whether `err` was raised by this package's own code (the innermost frame of its traceback)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    package = Path(__file__).resolve().parent
    return package in Path(tb.tb_frame.f_code.co_filename).resolve().parents


def _install_signal_handlers() -> Callable[[], None]:
    """SIGINT/SIGTERM raise `Interrupted` (once: a second signal during the cleanup is ignored); returns the
    function that restores the previous handlers. Nothing is installed outside the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    fired: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)

    return restore


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `lightning-unlearn` console script; exits with the statuses of `lightning_unlearn.errors`."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_X_DISABLE_META", "true")  # wandb would record the command line (it may hold a regex)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    restore = _install_signal_handlers()
    try:
        if args and args[0] == "evaluate":
            from .evaluate_command import run as _evaluate

            code = _evaluate(args[1:])
        else:
            code = _demo(args[1:]) if args and args[0] == "demo" else _lightning_cli(args)
    except Interrupted as err:
        print(f"lightning-unlearn: interrupted by {err.name}: stopped, no output of this run was written",
              file=sys.stderr)
        raise SystemExit(err.code) from None
    except Exception as err:
        message = _user_error(err, args)
        if message is None or os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print(f"lightning-unlearn: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        restore()
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
