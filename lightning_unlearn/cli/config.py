"""The command's checks of a parsed config before any work: the choices, the paths, the forget selection (redacted
wherever the config is shown or saved) and what `--output` must never be nor contain."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import UserInputError


class ConfigError(UserInputError):
    """A configuration value is wrong; the message names the key."""


DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")
#: the config keys of the data roles that name a path
DATA_PATH_KEYS = ("train", "forget", "retain", "test", "holdout", "tokenizer")


def _looks_local(value: str) -> bool:
    """A path rather than a hub id: explicit prefixes, a data-file suffix, or a first component that exists here."""
    path = Path(value).expanduser()
    return (value.startswith((".", "/", "~")) or path.suffix in DATA_SUFFIXES or path.exists()
            or (len(path.parts) > 1 and Path(path.parts[0]).exists()))


def check_paths(config: Any) -> None:
    """Fail early, naming every key whose model or data path does not exist (or whose model id does not load its
    config offline)."""
    from ..models import load_model_config, unreadable_model_files

    problems = []
    model = config.get("model") or {}
    value = model.get("model")
    if isinstance(value, str) and Path(value).expanduser().is_dir():
        problems += [f"model.model: {str(file)!r} cannot be read ({why}); the model's files must be readable "
                     "files: fix the permissions (chmod a+r) or the link, or save or copy the model again"
                     for file, why in unreadable_model_files(Path(value).expanduser())]
    if isinstance(value, str) and not Path(value).expanduser().exists():
        if _looks_local(value):
            problems.append(f"model.model: path {value!r} does not exist; give a saved model directory "
                            "(e.g. runs/demo/original after `lightning-unlearn demo`) or a hub id")
        else:
            try:
                load_model_config(value)
            except (OSError, ValueError) as err:
                problems.append(f"model.model: cannot load {value!r} ({type(err).__name__}); give a saved model "
                                "directory, or a hub id while online")
    data = config.get("data") or {}
    for key in DATA_PATH_KEYS:
        value = data.get(key)
        if isinstance(value, str) and _looks_local(value) and not Path(value).expanduser().exists():
            shown = ("(not shown: a string given here may be a text; give a YAML list for texts)"
                     if f"data.{key}" in REDACTED_TEXT_KEYS else repr(value))
            problems.append(f"data.{key}: path {shown} does not exist; fix the path in the config")
    if problems:
        raise ConfigError("\n  ".join(problems))


def check_fit_trainer(config: Any) -> None:
    """`fit`'s trainer settings that would make the run meaningless or fail inside Lightning, refused naming the key:
    no step at all (`max_steps`, `max_epochs` or `limit_train_batches` 0: the model written would be the original),
    a `fast_dev_run` with an `--output` (a debug step is not an unlearned model), and the automatic-optimisation
    settings an unlearning step cannot take (`gradient_clip_val`, `accumulate_grad_batches`: the method takes its
    own step, bounded by its trust region); a `ckpt_path` (a run cannot be resumed; `UnlearningModule` refuses it
    too)."""
    trainer = config.get("trainer") or {}
    for key in ("max_steps", "max_epochs", "limit_train_batches"):
        value = trainer.get(key)
        if value is not None and not isinstance(value, bool) and value == 0:
            raise ConfigError(f"trainer.{key}: 0 runs no unlearning step, so the model written would be the original; "
                              f"give at least 1, or leave it unset (the method's own number of steps)")
    if trainer.get("fast_dev_run") and config.get("output"):
        raise ConfigError("trainer.fast_dev_run runs a debug step, not an unlearning run, and its model would be "
                          "written to --output as the unlearned one; drop --output for a debug run, or drop "
                          "trainer.fast_dev_run")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and clip != 0:
        raise ConfigError("trainer.gradient_clip_val: the unlearning method takes its own steps (manual optimisation),"
                          " which Lightning does not clip; remove it (each step is already bounded by the method's "
                          "trust region, model.method_kwargs max_step_norm)")
    accumulate = trainer.get("accumulate_grad_batches")
    if accumulate is not None and accumulate != 1:
        raise ConfigError("trainer.accumulate_grad_batches: each unlearning step uses its whole forget batch (manual "
                          "optimisation, nothing to accumulate); remove it, and raise data.forget_batch_size for more "
                          "forget examples per step")
    ckpt = config.get("ckpt_path")
    if isinstance(ckpt, (str, os.PathLike)) and ckpt not in ("last", "best", "hpc", "registry") \
            and not Path(ckpt).expanduser().exists():
        raise ConfigError(f"ckpt_path: {str(ckpt)!r} does not exist; give an existing Lightning checkpoint (.ckpt) "
                          "or leave it unset")
    if ckpt:
        raise ConfigError("ckpt_path: an unlearning run cannot be resumed from a checkpoint (its retain budget, target "
                          "and curvature belong to the original model); run fit again from the original model without "
                          "ckpt_path, and evaluate a checkpoint with validate or test --ckpt_path")


def check_choices(config: Any) -> None:
    """`model.method`, `model.curvature`, `model.curvature_data` and `model.dtype` among the known values."""
    from ..methods import CURVATURE_BACKENDS, CURVATURE_DATA, METHODS

    model = config.get("model") or {}
    checks = (("method", sorted(METHODS)), ("curvature", CURVATURE_BACKENDS), ("curvature_data", CURVATURE_DATA))
    for key, choices in checks:
        value = model.get(key)
        if value is not None and value not in choices:
            raise ConfigError(f"model.{key}: unknown value {value!r}; choose one of {', '.join(choices)}")
    dtype = model.get("dtype")
    if isinstance(dtype, str):
        from ..models import parse_dtype

        parse_dtype(dtype)  # raises UserInputError naming the valid dtypes


REDACTED_KEYS = ("data.forget_regex", "data.forget_ids")
#: data sources that may be given as texts (a list, or by mistake one string): masked in every message the command
#: prints, unless the value is an existing path
TEXT_KEYS = ("data.forget", "data.retain", "data.holdout")
#: the text sources replaced in the saved config when they hold texts (retain texts are the data that stays)
REDACTED_TEXT_KEYS = ("data.forget", "data.holdout")


def holds_texts(value: Any) -> bool:
    """Whether a data source value of a config is texts rather than a place: a list, or a string that is neither an
    existing path nor an explicit `hub:` id (refused by the data module, as a text given where a list was meant)."""
    from ..data.sources import HUB_PREFIX

    if isinstance(value, (list, tuple)):
        return True
    return isinstance(value, str) and not value.startswith(HUB_PREFIX) and not Path(value).expanduser().exists()


def redact_forget_selection(config: Any) -> Any:
    """A copy of a parsed config whose forget selection is replaced by a placeholder that keeps nothing of it:
    `"<redacted regex>"`, `["<3 ids redacted>"]`, and forget or holdout texts `["<2 texts redacted>"]` (paths stay).
    The pattern of a secret can be a secret itself, ids are short (an unsalted hash of `doc-10, doc-17` is
    brute-forced in a second), forget texts are the secrets, and the saved config goes to the logs."""
    config = config.clone()
    for key in REDACTED_TEXT_KEYS:
        value = config.get(key)
        if value is not None and holds_texts(value):
            config[key] = ([f"<{len(value)} texts redacted>"] if isinstance(value, (list, tuple))
                           else "<redacted: not an existing path>")
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


def protected_paths(config: Any, save_dir: str) -> dict[str, Any]:
    """What `--output` must never be nor contain: the source model, the training data, the config files, the log
    folder, the current folder (existing paths only, except the log folder, which the run creates)."""
    out: dict[str, Any] = {}
    model = config.get("model") or {}
    for key in ("model", "full_curvature"):
        value = model.get(key)
        if isinstance(value, (str, os.PathLike)) and Path(value).expanduser().exists():
            out[f"model.{key}"] = value
    data = config.get("data") or {}
    for key in DATA_PATH_KEYS:
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
