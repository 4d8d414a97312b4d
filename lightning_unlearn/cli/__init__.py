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

The modules: `fit` (LightningCLI), `validate` (which model `validate`/`test` evaluate), `demo`, `config` (the
checks of a config, the redaction of the forget selection, what `--output` must not touch), `user_errors` (the
one-line messages), `signals` (SIGINT/SIGTERM); `lightning_unlearn.evaluate_command` is `evaluate`, and
`lightning_unlearn.io` holds the outputs' checks, claims and `run.json` (`RunRecord`, shared with the demo).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..errors import EXIT_USER_ERROR
from .config import ConfigError, redact_forget_selection
from .demo import DEMO_HELP, load_demo_config
from .signals import Interrupted, install_signal_handlers
from .user_errors import TRACEBACK_ENV, TRACEBACK_HINT, user_error

__all__ = ["DEMO_HELP", "TRACEBACK_ENV", "TRACEBACK_HINT", "ConfigError", "Interrupted", "load_demo_config", "main",
           "redact_forget_selection"]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `lightning-unlearn` console script; exits with the statuses of `lightning_unlearn.errors`."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_X_DISABLE_META", "true")  # wandb would record the command line (it may hold a regex)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    restore = install_signal_handlers()
    try:
        if args and args[0] == "evaluate":
            from ..evaluate_command import run as evaluate

            code = evaluate(args[1:])
        elif args and args[0] == "demo":
            from .demo import run as demo

            code = demo(args[1:])
        else:
            from .fit import run as fit

            code = fit(args)
    except Interrupted as err:
        print(f"lightning-unlearn: interrupted by {err.name}: stopped, no output of this run was written",
              file=sys.stderr)
        raise SystemExit(err.code) from None
    except Exception as err:
        message = user_error(err, args)
        if message is None or os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print(f"lightning-unlearn: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        restore()
    if code:
        raise SystemExit(code)

