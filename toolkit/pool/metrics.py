"""PoolMetrics: one MetricsLog per replica, read as one with a `replica` column."""

from __future__ import annotations

import pandas as pd

from toolkit.telemetry.metrics import REQUEST_COLUMNS, STEP_COLUMNS, MetricsLog
from toolkit.worker.messages import Metrics


class PoolMetrics(MetricsLog):
    """The merged telemetry of a pool: `steps()` and `requests()` carry a `replica` column (and, like every log, the
    `pid` of the process that produced the row); step rows sort by their wall-clock `t` across replicas.

    `summary()` is MetricsLog's over the merged rows: throughput counts every replica's tokens over the common span.
    """

    def __init__(self, logs: list[MetricsLog]) -> None:  # no super().__init__: the rows live in the replicas' logs
        self.logs = logs

    def add(self, message: Metrics) -> None:
        raise TypeError("PoolMetrics is read-only: each replica feeds its own MetricsLog (pool.metrics.logs[i])")

    def reset(self) -> None:
        for log in self.logs:
            log.reset()

    @property
    def last_heartbeat(self) -> float | None:  # type: ignore[override]
        """The oldest replica's latest heartbeat: every replica's rows are complete up to this time."""
        beats = [log.last_heartbeat for log in self.logs]
        return None if None in beats else min(beats)  # type: ignore[type-var]

    def steps(self) -> pd.DataFrame:
        """One row per step of any replica, oldest first."""
        return self._merged([log.steps() for log in self.logs], STEP_COLUMNS, "t")

    def requests(self) -> pd.DataFrame:
        """One row per finished request: replica 0's in finishing order, then replica 1's, and so on."""
        return self._merged([log.requests() for log in self.logs], REQUEST_COLUMNS, None)

    def steps_mark(self) -> tuple[int, float]:
        marks = [log.steps_mark() for log in self.logs]
        return sum(n for n, _ in marks), max((t for _, t in marks), default=0.0)

    @staticmethod
    def _merged(frames: list[pd.DataFrame], columns: list[str], order: str | None) -> pd.DataFrame:
        parts = [f.assign(replica=i) for i, f in enumerate(frames) if len(f)]
        if not parts:
            return pd.DataFrame({"replica": pd.Series(dtype=int), **{c: pd.Series(dtype=object) for c in columns}})
        merged = pd.concat(parts, ignore_index=True)[["replica", *columns]]
        if order is not None:
            merged = merged.sort_values(order, kind="stable", ignore_index=True)
        return merged
