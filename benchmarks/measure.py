"""Time and memory of one unlearning run of the sweep: peak resident memory (`PeakRSS`), the seconds of one
forward+backward pass (the unit of `time_over_fwd_bwd`), and the bytes of parameters."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch


class PeakRSS:
    """Peak resident memory of this process while the block runs (psutil sampled every `interval` s, in a thread)."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def param_bytes(model: torch.nn.Module, names: Sequence[str] | None = None) -> int:
    named = dict(model.named_parameters())
    keys = list(named) if names is None else list(names)
    return sum(named[n].numel() * named[n].element_size() for n in keys)
