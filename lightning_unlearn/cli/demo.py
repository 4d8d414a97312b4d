"""`lightning-unlearn demo`: its arguments, its YAML config (`experiment:` / `unlearning:`), the run and its summary."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..errors import EXIT_NOTHING_ACCEPTED, UserInputError
from .config import ConfigError, check_choices

DEMO_HELP = "run the whole pipeline offline on the embedded default corpus and write a report"


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


def run(args: Sequence[str]) -> int:
    """Run the demo; returns the exit status (0, or 3 when the unlearning accepted no step)."""
    from ..demo import run_demo, summary_table, timing_line

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
    try:
        summary = run_demo(ns.output, config=config, settings=settings, progress=not ns.quiet, overwrite=ns.overwrite,
                           cache=ns.cache, protected={"--config": ns.config, "the current folder": os.getcwd()})
    except UserInputError as err:
        if " split is empty (0 examples)" not in str(err):
            raise
        # the data module's fix names its own options; the demo's corpus is what the user sets here
        raise UserInputError(f"the demo's synthetic corpus ({config.corpus_bytes} bytes) is too small to leave "
                             f"examples for every split ({str(err).split(';')[0]}); raise --corpus-bytes (default "
                             f"{type(config)().corpus_bytes})") from err
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

    from ..demo import DEFAULT_SETTINGS
    from ..experiment import ExperimentConfig

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
    check_choices({"model": {"method": settings.method, "curvature": settings.curvature,
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
