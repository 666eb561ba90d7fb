"""MetricsLog: the worker's telemetry as it arrives in the parent, bounded, as pandas DataFrames."""

from __future__ import annotations

import threading
from collections import deque

import msgspec
import numpy as np
import pandas as pd

from toolkit.worker.messages import Metrics, RequestMetrics, StepMetrics

STEP_COLUMNS = list(StepMetrics.__struct_fields__)
REQUEST_COLUMNS = list(RequestMetrics.__struct_fields__)


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
        """Throughput, batch occupancy and latency percentiles over what is logged now."""
        steps, reqs = self.steps(), self.requests()
        out: dict[str, float] = {"steps": float(len(steps)), "requests": float(len(reqs))}
        if len(steps):
            span = max(float(steps.t.iloc[-1] - steps.t.iloc[0] + steps.step_ms.iloc[0] / 1000), 1e-9)
            out["output_tokens_per_s"] = float(steps.output_tokens.sum()) / span
            out["total_tokens_per_s"] = float(steps.prefill_tokens.sum() + steps.decode_tokens.sum()) / span
            out["mean_batch_size"] = float(steps.batch_size.mean())
            out["max_batch_size"] = float(steps.batch_size.max())
            if max_batch_size:
                out["mean_occupancy"] = out["mean_batch_size"] / max_batch_size
                out["max_occupancy"] = out["max_batch_size"] / max_batch_size
            out["preemptions"] = float(steps.preemptions.sum())
            queries = float(steps.prefix_cache_queries.sum())
            if queries:
                out["prefix_cache_hit_rate"] = float(steps.prefix_cache_hits.sum()) / queries
        if len(reqs):
            for col in ("ttft_s", "itl_mean_s", "e2e_s"):
                values = reqs[col].to_numpy(dtype=float)
                out[f"{col}_p50"] = float(np.percentile(values, 50))
                out[f"{col}_p99"] = float(np.percentile(values, 99))
        return out

