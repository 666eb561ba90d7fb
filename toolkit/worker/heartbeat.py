"""Heartbeats from inside a long step: proof of life while the worker's loop is busy in one model forward.

The loop sends metrics (which double as heartbeats) between steps, so one forward longer than `hang_timeout_s`
(a long prefill, a first CUDA step) used to look like a hang. While a step runs, a small daemon thread sends a
busy heartbeat every `metrics_interval_s`; torch releases the GIL inside its kernels, and EngineQueue sends are
locked. Each heartbeat names the step and how long it has been running, so the parent still catches a forward
that never returns: it calls the worker hung when one step runs past `step_timeout_s`, or when nothing at all
arrives for `hang_timeout_s` (a frozen process sends no heartbeats either).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from toolkit.worker import messages as m
from toolkit.worker.engine_queue import EngineQueue


class StepHeartbeat:
    """`with heartbeat.step(kv_blocks_used):` around each engine step; beats only while a step is running."""

    def __init__(self, queue: EngineQueue, interval_s: float) -> None:
        self.queue = queue
        self.interval_s = interval_s
        self.step_index = 0  # steps started so far; the one running, if any
        self.beats_in_step = 0  # heartbeats sent during the current (or last) step
        self._started: float | None = None  # monotonic start of the running step; None between steps
        self._kv_blocks_used = 0
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="toolkit-step-heartbeat", daemon=True)
        self._thread.start()

    @contextmanager
    def step(self, kv_blocks_used: int) -> Iterator[None]:
        with self._cond:
            self.step_index += 1
            self.beats_in_step = 0
            self._started = time.monotonic()
            self._kv_blocks_used = kv_blocks_used
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._started = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._started is None:
                    self._cond.wait()  # between steps: the main loop's own metrics are the heartbeat
                    continue
                index = self.step_index
                self._cond.wait(self.interval_s)  # cut short only by the next step starting, or close()
                if self._closed or self._started is None or self.step_index != index:
                    continue
                beat = m.Metrics(sent_at=time.time(), busy=True, kv_blocks_used=self._kv_blocks_used, step=index,
                                 step_running_s=time.monotonic() - self._started)
                # sent under the lock, so no beat of a step can follow the loop's first message after that step
                self.queue.send_response(beat)
                self.beats_in_step += 1
