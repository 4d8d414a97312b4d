"""The errors a user can cause and the exit codes of the command.

`UserInputError` marks bad input (a config value, a file, data, a checkpoint): its message names the problem and the
fix, so the command prints it as one line and exits with `EXIT_USER_ERROR`, without a traceback. Anything else is
a bug of ours and keeps its traceback. The exit codes are documented in the README.
"""

from __future__ import annotations

#: a bad config value, file, data or checkpoint (the message says which and how to fix it)
EXIT_USER_ERROR = 2
#: the request ran but accepted no step: the model written (if any) is the original, so the run failed
EXIT_NOTHING_ACCEPTED = 3
#: ended by SIGINT (Ctrl-C) / SIGTERM (SLURM, Kubernetes): 128 + the signal number, as shells report it
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class UserInputError(ValueError):
    """Bad input from the user; the message names the problem and the fix (never the text of a forget example or
    a forget pattern: those may be secrets)."""
