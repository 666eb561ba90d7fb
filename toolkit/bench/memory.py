"""Peak resident memory of a process, sampled from a background thread while a system runs."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import psutil


@dataclass(slots=True)
class RssSampler:
    """Samples psutil RSS of `pid` (summed with `others`) every `interval_s`; `peak` is the largest sample.
    Use as a context manager."""

    pid: int = field(default_factory=os.getpid)
    others: tuple[int, ...] = ()  # more processes of the same system (a pool's replicas)
    interval_s: float = 0.05
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        total = 0
        for pid in (self.pid, *self.others):
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="bench-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        self.sample()
