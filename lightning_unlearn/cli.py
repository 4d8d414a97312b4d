"""The `lightning-unlearn` command.

    lightning-unlearn demo [--output runs/demo]              # the whole pipeline on the embedded default
    lightning-unlearn fit --config configs/unlearn_kfac.yaml  # unlearning as a LightningCLI run
    lightning-unlearn validate|test --config ...              # forget / retain loss and perplexity

`fit`/`validate`/`test` are `LightningCLI` (jsonargparse) over `UnlearningModule` and `ForgetRetainDataModule`;
after `fit`, `--output DIR` receives the unlearned model (`save_pretrained`, safetensors). Logging: a CSV logger
always, and the wandb logger in offline mode unless `WANDB_MODE` says otherwise (it never asks for a login).
A bad config (unknown method, missing file, wrong type) stops with an error that names the key, before anything
is written.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

DEMO_HELP = "run the whole pipeline offline on the embedded default corpus and write a report"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


def _loggers(save_dir: str) -> list[dict[str, Any]]:
    """A CSV logger always; wandb offline unless the user set WANDB_MODE=online (never asks for a login)."""
    offline = os.environ.get("WANDB_MODE", "offline") != "online"
    return [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": save_dir, "name": "csv"}},
            {"class_path": "lightning.pytorch.loggers.WandbLogger",
             "init_args": {"project": "lightning-unlearn", "save_dir": save_dir, "offline": offline}}]


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


def _check_choices(config: Any) -> None:
    from .methods import CURVATURE_BACKENDS, CURVATURE_DATA, METHODS

    model = config.get("model") or {}
    checks = (("method", sorted(METHODS)), ("curvature", CURVATURE_BACKENDS), ("curvature_data", CURVATURE_DATA))
    for key, choices in checks:
        value = model.get(key)
        if value is not None and value not in choices:
            raise ConfigError(f"model.{key}: unknown value {value!r}; choose one of {', '.join(choices)}")


REDACTED_KEYS = ("data.forget_regex", "data.forget_ids")


def redact_forget_selection(config: Any) -> Any:
    """A copy of a parsed config whose forget selection (a regex, ids) is replaced by its sha256: the pattern of a
    secret can be a secret itself, and the saved config goes to the log folder."""
    import hashlib

    config = config.clone()
    for key in REDACTED_KEYS:
        value = config.get(key)
        if value is not None:
            text = value if isinstance(value, str) else "\n".join(map(str, value))
            digest = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
            config[key] = digest if isinstance(value, str) else [digest]
    return config


def _lightning_cli(args: Sequence[str] | None) -> None:
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from .data import ForgetRetainDataModule
    from .module import UnlearningModule

    class RedactedSaveConfig(SaveConfigCallback):
        """Lightning's config saving, with the forget selection hashed (see `redact_forget_selection`)."""

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            original, self.config = self.config, redact_forget_selection(self.config)
            try:
                super().setup(trainer, pl_module, stage)
            finally:
                self.config = original

    class UnlearnCLI(LightningCLI):
        """LightningCLI with an `--output` for the unlearned model and early, key-naming config checks."""

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_argument("--output", type=str | None, default=None,
                                help="directory for the unlearned model (save_pretrained, safetensors) after fit")

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            _check_choices(config)
            _check_paths(config)

        def after_fit(self) -> None:
            status = getattr(self.model, "status", None)
            if status is not None and self.trainer.is_global_zero:
                summary = self.model.summary()
                target = summary.get("target")
                print(f"unlearning status: {status} (target {'none' if target is None else f'{target:.4g}'}, "
                      f"source {summary.get('target_source')}, {summary.get('steps_accepted')} step(s) accepted)")
            output = self.config[self.subcommand].get("output")
            if output:
                path = self.model.save_pretrained(output)
                print(f"unlearned model written to {path}")

    save_dir = os.environ.get("LIGHTNING_UNLEARN_LOG_DIR", "runs/cli")
    with _removed_on_failure(Path(save_dir)):
        UnlearnCLI(
            UnlearningModule, ForgetRetainDataModule, args=args,
            trainer_defaults={"logger": _loggers(save_dir), "accelerator": "auto", "enable_checkpointing": False,
                              "log_every_n_steps": 1},
            save_config_callback=RedactedSaveConfig, save_config_kwargs={"overwrite": True},
        )


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
        if not existed:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for path in sorted(listing() - before, key=lambda p: len(p.parts)):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists():
                    path.unlink()
        raise


def _demo(args: Sequence[str]) -> None:
    from .demo import run_demo, summary_table, timing_line

    parser = argparse.ArgumentParser(prog="lightning-unlearn demo", description=DEMO_HELP)
    parser.add_argument("--output", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--config", default=None, help="a YAML file with `experiment:` and `unlearning:` sections")
    parser.add_argument("--train-steps", type=int, default=None, help="training steps of each model")
    parser.add_argument("--corpus-bytes", type=int, default=None, help="size of the synthetic corpus")
    parser.add_argument("--cache", default=None, help="reuse trained models from this folder across runs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    ns = parser.parse_args(list(args))
    config, settings = load_demo_config(ns.config)
    if ns.train_steps is not None:
        config.train_steps = ns.train_steps
    if ns.corpus_bytes is not None:
        config.corpus_bytes = ns.corpus_bytes
    summary = run_demo(ns.output, config=config, settings=settings, progress=not ns.quiet, overwrite=ns.overwrite,
                       cache=ns.cache)
    from rich.console import Console

    console = Console()
    console.print(summary_table(summary))
    console.print(timing_line(summary))
    console.print(f"report: {Path(ns.output) / 'report.md'}   unlearned model: {Path(ns.output) / 'model'}")


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


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `lightning-unlearn` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_X_DISABLE_META", "true")  # wandb would record the command line (it may hold a regex)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args and args[0] == "demo":
            _demo(args[1:])
        else:
            _lightning_cli(None if argv is None else args)
    except ConfigError as err:
        print(f"lightning-unlearn: configuration error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
