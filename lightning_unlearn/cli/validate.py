"""`lightning-unlearn validate|test`: which model is evaluated (the config's unlearned `output` when it holds one)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def choose_evaluated_model(config: Any, args: Sequence[str]) -> None:
    """`validate`/`test`: evaluate the config's `output` (the unlearned model) when it holds a model, unless the
    command line names `--model.model`; say which model is evaluated either way."""
    from ..io import MANIFEST, is_previous_output
    from ..models import has_saved_model

    model = config.get("model") or {}
    current = model.get("model")
    output = config.get("output")
    explicit = any(a in ("--model", "--model.model") or a.startswith(("--model=", "--model.model=")) for a in args)
    if explicit or not isinstance(current, (str, os.PathLike)):
        print(f"evaluating the model {str(current)!r} (model.model)")
    elif output and has_saved_model(Path(output).expanduser()):
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
