"""GET /metrics: the worker's own telemetry (`worker.metrics`, `worker.health()`) in Prometheus text format.

A collector computes every family at scrape time from what the handle already keeps, so it works the same for a
single worker, a restarted one (one MetricsLog spans restarts) and a pool whose `metrics` merges its replicas.
Counters and histograms cover the rows MetricsLog keeps (`Settings.metrics_capacity`); a `metrics.reset()`
shows as a counter reset, which Prometheus handles.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                   80.0, 160.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Families:
    """Families by name, so several workers (a generation and an embeddings model) share one HELP/TYPE each."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}

    def _family(self, cls: type, name: str, doc: str, labels: list[str]) -> Any:
        if name not in self.families:
            self.families[name] = cls(name, doc, labels=labels)
        return self.families[name]

    def gauge(self, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        self._family(GaugeMetricFamily, name, doc, list(labels)).add_metric(list(labels.values()), value)

    def counter(self, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        self._family(CounterMetricFamily, name, doc, list(labels)).add_metric(list(labels.values()), value)

    def histogram(self, name: str, doc: str, labels: dict[str, str], values: Any, buckets: tuple[float, ...]) -> None:
        data = np.asarray(values, dtype=float)
        data = data[~np.isnan(data)]
        cumulative = [(str(le), int((data <= le).sum())) for le in buckets] + [("+Inf", len(data))]
        family = self._family(HistogramMetricFamily, name, doc, list(labels))
        family.add_metric(list(labels.values()), cumulative, float(data.sum()))


def _add_worker(out: _Families, worker: Any, model_name: str) -> None:
    """One handle's telemetry, labelled with its model name."""
    labels = {"model_name": model_name}
    health = worker.health()
    steps, requests = worker.metrics.steps(), worker.metrics.requests()
    lasts = _last_steps(steps, health)
    busy_lasts = [last for last, busy in lasts if busy]
    out.gauge("toolkit:worker_up", "1 while the worker is alive and serving", labels, float(health["alive"]))
    for replica in health.get("replicas", []):  # a pool: which replicas serve
        out.gauge("toolkit:replica_up", "1 while this replica of the pool is alive and serving",
                  {**labels, "replica": str(replica["replica"])}, float(replica["alive"] and not replica["hung"]))
    out.counter("toolkit:worker_restarts", "restarts of the worker by this handle", labels,
                float(health.get("restarts") or 0))
    out.gauge("toolkit:num_requests_in_flight", "requests submitted and not yet answered", labels,
              float(health.get("in_flight") or 0))
    out.gauge("toolkit:num_requests_running", "sequences running in the worker (last step; 0 when idle)", labels,
              float(sum(last.num_running for last in busy_lasts)))
    out.gauge("toolkit:num_requests_waiting", "requests waiting in the worker (last step; 0 when idle)", labels,
              float(sum(last.num_waiting for last in busy_lasts)))
    used = float(health.get("kv_blocks_used") or 0)
    total = float(sum(last.kv_blocks_total for last, _ in lasts))
    out.gauge("toolkit:kv_cache_blocks_used", "KV-cache blocks in use (last heartbeat)", labels, used)
    out.gauge("toolkit:kv_cache_usage_perc", "fraction of the KV-cache blocks in use (last heartbeat)", labels,
              used / total if total else 0.0)
    out.counter("toolkit:steps", "scheduler steps the worker ran", labels, float(len(steps)))
    out.counter("toolkit:num_preemptions", "sequences preempted (recomputed later)", labels,
                float(steps.preemptions.sum()) if len(steps) else 0.0)
    out.counter("toolkit:prompt_tokens", "prompt tokens of finished requests", labels,
                float(requests.prompt_tokens.sum()) if len(requests) else 0.0)
    out.counter("toolkit:generation_tokens", "tokens sampled by the worker's steps", labels,
                float(steps.output_tokens.sum()) if len(steps) else 0.0)
    for column in ("prefix_cache_queries", "prefix_cache_hits"):  # once the prefix cache reports them
        if column in steps:
            out.counter(f"toolkit:{column}", f"{column.replace('_', ' ')} (tokens)", labels, float(steps[column].sum()))
    counts = requests.finish_reason.value_counts().to_dict() if len(requests) else {}
    for reason in sorted({"stop", "length", "cancelled", *counts}):
        out.counter("toolkit:request_success", "finished requests by finish reason",
                    {**labels, "finished_reason": str(reason)}, float(counts.get(reason, 0)))
    out.histogram("toolkit:batch_size", "sequences per scheduler step", labels,
                  steps.batch_size.to_numpy(dtype=float) if len(steps) else [], BATCH_BUCKETS)
    out.histogram("toolkit:step_duration_seconds", "wall time of one scheduler step in the worker", labels,
                  steps.step_ms.to_numpy(dtype=float) / 1000 if len(steps) else [], LATENCY_BUCKETS)
    for column, name, doc in (
        ("ttft_s", "toolkit:time_to_first_token_seconds", "time to first token, from arrival"),
        ("itl_mean_s", "toolkit:inter_token_latency_seconds", "mean inter-token latency of each request"),
        ("e2e_s", "toolkit:e2e_request_latency_seconds", "arrival to finish"),
        ("queued_s", "toolkit:request_queue_time_seconds", "arrival to first scheduled"),
    ):
        out.histogram(name, doc, labels, requests[column].to_numpy(dtype=float) if len(requests) else [],
                      LATENCY_BUCKETS)


def _last_steps(steps: pd.DataFrame, health: dict[str, Any]) -> list[tuple[Any, bool]]:
    """(last step row, busy now) of the worker, or of each live replica of a pool (whose rows carry `replica`)."""
    if not len(steps):
        return []
    if "replicas" not in health or "replica" not in steps:
        return [(steps.iloc[-1], bool(health.get("busy")))]
    lasts = steps.groupby("replica").tail(1).set_index("replica")
    return [(lasts.loc[r["replica"]], bool(r["busy"])) for r in health["replicas"]
            if r["alive"] and r["replica"] in lasts.index]


class WorkerCollector:
    """The Prometheus collector over every served handle: [(worker, model name), ...]."""

    def __init__(self, workers: list[tuple[Any, str]]) -> None:
        self.workers = workers

    def collect(self) -> Iterable[Metric]:
        out = _Families()
        for worker, name in self.workers:
            _add_worker(out, worker, name)
        return list(out.families.values())


def exposition(collector: WorkerCollector) -> bytes:
    """The Prometheus text of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
