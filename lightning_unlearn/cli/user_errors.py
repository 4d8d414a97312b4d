"""Which errors are the user's (one line on stderr, exit 2) and which are bugs of ours (a traceback); the forget
selection given on the command line is masked in every message (see the docstring of `lightning_unlearn.cli`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserInputError
from .config import REDACTED_KEYS

#: set to 1 to see the traceback of every error (instead of the one-line message)
TRACEBACK_ENV = "LIGHTNING_UNLEARN_TRACEBACK"
TRACEBACK_HINT = f"(set {TRACEBACK_ENV}=1 for the traceback)"


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
    package = Path(__file__).resolve().parents[1]  # lightning_unlearn/
    return package in Path(tb.tb_frame.f_code.co_filename).resolve().parents
