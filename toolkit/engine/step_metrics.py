"""StepProbe: how every engine times its step and reads its process (memory, device use), so both report alike.

`Engine` and `EmbeddingsEngine` build their StepMetrics rows through one StepProbe: the same wall-clock time
base, the same pid column, the same phase laps and the same device_util definition (see messages.StepMetrics).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from toolkit.worker.messages import StepMetrics

log = logging.getLogger(__name__)

CUDA_UTIL_REFRESH_S = 0.2  # NVML averages over 1/6 s to 1 s anyway; asking every step would only cost time


@dataclass(slots=True)
class PhaseTimes:
    """Where a runner's part of one step went, in milliseconds; the runner keeps the last step's."""

    prepare_ms: float = 0.0
    forward_ms: float = 0.0
    sample_ms: float = 0.0


class StepProbe:
    """Brackets one step: start() at its beginning, lap() between phases, finish(**row) for its StepMetrics."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.pid = os.getpid()
        self._process = psutil.Process()
        self._started = self._lap = 0.0
        self._cpu_started = 0.0
        self._nvml = self.device.type == "cuda"  # turned off after the first failure: the answer will not change
        self._cuda_util = math.nan
        self._cuda_util_at = -math.inf

    def start(self) -> None:
        self._started = self._lap = time.perf_counter()
        self._cpu_started = time.process_time()  # every thread of this process, in ns (psutil's /proc is 10 ms)

    def lap(self) -> float:
        """Milliseconds since start() or the previous lap()."""
        now = time.perf_counter()
        ms, self._lap = (now - self._lap) * 1000, now
        return ms

    def finish(self, **row: Any) -> StepMetrics:
        """The step's StepMetrics: `row` holds what the engine knows; time, pid, memory and device use come here."""
        wall_s = time.perf_counter() - self._started
        cpu_s = time.process_time() - self._cpu_started
        on_cuda = self.device.type == "cuda"
        return StepMetrics(
            t=time.time(), step_ms=wall_s * 1000, pid=self.pid, rss_bytes=self._process.memory_info().rss,
            device_mem_bytes=torch.cuda.memory_allocated(self.device) if on_cuda else 0,
            device_util=self._read_cuda_util() if on_cuda else cpu_util(cpu_s, wall_s, torch.get_num_threads()),
            **row,
        )

    def _read_cuda_util(self) -> float:
        """NVML's GPU utilisation in percent, refreshed at most every CUDA_UTIL_REFRESH_S; NaN without NVML."""
        if not self._nvml:
            return math.nan
        now = time.monotonic()
        if now - self._cuda_util_at >= CUDA_UTIL_REFRESH_S:
            try:
                self._cuda_util = float(torch.cuda.utilization(self.device))
            except Exception as exc:  # pynvml missing, or NVML refuses (containers, MIG): unknown, not idle
                log.warning("device_util is NaN: torch.cuda.utilization() failed (%s: %s)", type(exc).__name__, exc)
                self._nvml = False
                return math.nan
            self._cuda_util_at = now
        return self._cuda_util


def cpu_util(cpu_s: float, wall_s: float, threads: int) -> float:
    """Percent of `threads` cores this process kept busy over `wall_s` seconds, given the CPU seconds it used."""
    return 100.0 * cpu_s / (wall_s * max(threads, 1)) if wall_s > 0 else 0.0
