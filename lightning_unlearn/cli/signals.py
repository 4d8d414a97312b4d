"""SIGINT/SIGTERM of the command: an exception that unwinds every `finally` (no partial output), then exit 130/143."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from ..errors import EXIT_SIGINT, EXIT_SIGTERM


class Interrupted(BaseException):
    """Raised by the command's SIGINT/SIGTERM handler. Like KeyboardInterrupt it unwinds through every `finally`
    (the atomic writers delete their temporary output) and no `except Exception` stops it; it is not one, because
    Lightning turns a KeyboardInterrupt into exit status 1. `main` exits with `code` (128 + the signal number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.code = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM}.get(signum, 128 + signum)
        self.name = signal.Signals(signum).name


def install_signal_handlers() -> Callable[[], None]:
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
