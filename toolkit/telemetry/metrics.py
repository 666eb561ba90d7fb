"""MetricsLog: the worker's telemetry as it arrives in the parent, bounded, as pandas DataFrames.

One log outlives worker restarts: step rows carry wall-clock `t` (time.time(), the parent's clock too) and the
`pid` of the worker that produced them, so rows from successive workers stay in order and can be told apart.
"""

from __future__ import annotations

import math
import threading
from collections import deque

import msgspec
import numpy as np
import pandas as pd

from toolkit.worker.messages import Metrics, RequestMetrics, StepMetrics

STEP_COLUMNS = list(StepMetrics.__struct_fields__)
REQUEST_COLUMNS = list(RequestMetrics.__struct_fields__)
LATENCY_COLUMNS = ("ttft_s", "itl_mean_s", "e2e_s")


def occupancy(steps: pd.DataFrame, max_batch_size: int) -> pd.Series:
    """Batch occupancy per step: sequences in the step's batch / max_batch_size (texts, for an embedding step).

    The one definition, used by summary() and the dashboard: what the step ran, not what is left running after it.
    """
    return steps.batch_size / max_batch_size


class MetricsLog:
    """Keeps the last `capacity` step rows and request rows; fed by the worker handle's I/O thread."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._steps: deque[StepMetrics] = deque(maxlen=capacity)
        self._requests: deque[RequestMetrics] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.last_heartbeat: float | None = None

    def add(self, message: Metrics) -> None:
        with self._lock:
            self._steps.extend(message.steps)
            self._requests.extend(message.requests)
            self.last_heartbeat = message.sent_at

    def reset(self) -> None:
        with self._lock:
            self._steps.clear()
            self._requests.clear()

    def steps(self) -> pd.DataFrame:
        """One row per worker step (see StepMetrics), oldest first."""
        return self._frame(self._steps, STEP_COLUMNS)

    def requests(self) -> pd.DataFrame:
        """One row per finished request (see RequestMetrics), in finishing order."""
        return self._frame(self._requests, REQUEST_COLUMNS)

    def steps_mark(self) -> tuple[int, float]:
        """(rows kept, `t` of the newest): changes when steps arrive or the log is reset; cheap to poll."""
        with self._lock:
            return len(self._steps), self._steps[-1].t if self._steps else 0.0

    def _frame(self, rows: deque[StepMetrics] | deque[RequestMetrics], columns: list[str]) -> pd.DataFrame:
        with self._lock:
            tuples = [msgspec.structs.astuple(r) for r in rows]
        return pd.DataFrame(tuples, columns=columns)

    def summary(self, max_batch_size: int | None = None) -> dict[str, float]:
        """Throughput, batch occupancy and latency percentiles over what is logged now.

        Rates are over the wall-clock span from the first logged step's start to the last one's end, restarts and
        idle time included. Percentiles skip missing values (NaN: a request cancelled before its first token has
        no TTFT, an embedding or a one-token output no ITL); `<col>_count` says how many rows each covers.
        """
        steps, reqs = self.steps(), self.requests()
        out: dict[str, float] = {"steps": float(len(steps)), "requests": float(len(reqs))}
        if len(steps):
            span = float(steps.t.max() - (steps.t - steps.step_ms / 1000).min())  # >= 0: each step ends after it began
            rate = (lambda n: float(n) / span) if span > 0 else (lambda n: math.nan)
            out["span_s"] = span
            out["workers"] = float(steps.pid.nunique())
            out["output_tokens_per_s"] = rate(steps.output_tokens.sum())
            out["total_tokens_per_s"] = rate(steps.prefill_tokens.sum() + steps.decode_tokens.sum())
            out["mean_batch_size"] = float(steps.batch_size.mean())
            out["max_batch_size"] = float(steps.batch_size.max())
            if max_batch_size:
                occupied = occupancy(steps, max_batch_size)
                out["mean_occupancy"] = float(occupied.mean())
                out["max_occupancy"] = float(occupied.max())
            out["preemptions"] = float(steps.preemptions.sum())
            queries = float(steps.prefix_cache_queries.sum())
            if queries:
                out["prefix_cache_hit_rate"] = float(steps.prefix_cache_hits.sum()) / queries
        if len(reqs):
            for col in LATENCY_COLUMNS:
                values = reqs[col].to_numpy(dtype=float)
                values = values[~np.isnan(values)]
                out[f"{col}_count"] = float(values.size)
                out[f"{col}_p50"] = float(np.percentile(values, 50)) if values.size else math.nan
                out[f"{col}_p99"] = float(np.percentile(values, 99)) if values.size else math.nan
        return out
