"""Which errors are the user's (one line on stderr, exit 2) and which are bugs of ours (a traceback); the forget
selection given on the command line is masked in every message (see the docstring of `lightning_unlearn.cli`)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from ..errors import UserInputError
from .config import REDACTED_KEYS, TEXT_KEYS, holds_texts

#: set to 1 to see the traceback of every error (instead of the one-line message)
TRACEBACK_ENV = "LIGHTNING_UNLEARN_TRACEBACK"
TRACEBACK_HINT = f"(set {TRACEBACK_ENV}=1 for the traceback)"


def _flag_values(args: Sequence[str], keys: Sequence[str]) -> list[str]:
    """The values given on the command line to the flags `--<key>` (as `--key value` or `--key=value`)."""
    values: list[str] = []
    flags = tuple(f"--{key}" for key in keys)
    for i, arg in enumerate(args):
        for flag in flags:
            if arg == flag and i + 1 < len(args):
                values.append(args[i + 1])
            elif arg.startswith(flag + "="):
                values.append(arg[len(flag) + 1:])
    return values


def _forget_values(args: Sequence[str]) -> list[str]:
    """The forget selection as given on the command line (`--data.forget_regex X`, `--data.forget_ids=[...]`) and
    its items: masked in every message the command prints."""
    values = _flag_values(args, REDACTED_KEYS)
    items = [item for value in values for item in value.strip("[]").replace('"', " ").replace("'", " ")
             .replace(",", " ").split()]
    return sorted({v for v in values + items + _text_values(args) if len(v) >= 3}, key=len, reverse=True)


def _text_values(args: Sequence[str]) -> list[str]:
    """The forget, retain and holdout sources given on the command line as texts (`--data.forget '["a text"]'`, or
    one string that is no existing path), and each text in them: masked whole (never word by word), as written and
    as a message would quote it."""
    out: list[str] = []
    for value in _flag_values(args, TEXT_KEYS):
        if not holds_texts(value):
            continue
        out.append(value)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            continue
        items = parsed if isinstance(parsed, list) else [parsed]
        for item in items:
            if isinstance(item, str):
                out += [item, repr(item)[1:-1], json.dumps(item)[1:-1]]
    return out


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


def user_error(err: BaseException, args: Sequence[str]) -> str | None:
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
    `data.forget_regex` (or of a text source, `data.forget` / `data.retain` / `data.holdout`) a message naming the
    key, the expected and the given type; for any other error that mentions them, the error without the given values
    and config text it quotes."""
    source = re.search(r'key "(?:data\.)?(forget|retain|holdout)"', text)
    if source:  # a data source of the wrong type (e.g. a list of texts with a number in it)
        key = f"data.{source.group(1)}"
        given = re.search(r"Given value type: <class '([\w.]+)'>", text)
        got = f"got a {given.group(1)}" if given else "got a value of another type"
        return (f"{key}: expected the path of a file or folder, a list of texts (strings only), or null; {got} (the "
                "value is not shown: it may hold texts to forget)")
    names = [key.split(".")[-1] for key in REDACTED_KEYS] + [f"{q}{key.split('.')[-1]}{q}" for key in TEXT_KEYS
                                                             for q in ('"', "'")]
    if not any(name in text for name in names):
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
    package = Path(__file__).resolve().parents[1]  # lightning_unlearn/
    return package in Path(tb.tb_frame.f_code.co_filename).resolve().parents
