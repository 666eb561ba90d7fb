"""Worker telemetry end to end (burst -> MetricsLog) and the Dashboard drawn from it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pandas as pd
import pytest

from toolkit import ModelWorker, Settings, TokenGeneratorPipeline
from toolkit.notebook import Dashboard, panels
from toolkit.telemetry.metrics import MetricsLog
from toolkit.worker import messages as m

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---- the worker's telemetry -------------------------------------------------------------------------------


def test_a_burst_of_24_shows_batching_and_every_requests_timings(
    tiny_worker: ModelWorker, tiny_pipe: TokenGeneratorPipeline
) -> None:
    tiny_worker.metrics.reset()
    outs = tiny_pipe.generate_batch([f"request number {i}" for i in range(24)], max_new_tokens=16, ignore_eos=True,
                                    progress=False)
    ids = {c.request_id for c in outs}
    wait_until(lambda: ids <= set(tiny_worker.metrics.requests().request_id))

    steps = tiny_worker.metrics.steps()
    max_batch = tiny_worker.settings.max_batch_size
    assert steps.batch_size.max() > 1, "continuous batching runs several requests per step"
    assert (steps.batch_size <= max_batch).all() and (panels.occupancy(steps, max_batch) <= 1).all()
    assert (steps.kv_blocks_used <= steps.kv_blocks_total).all() and steps.kv_blocks_used.max() > 0
    assert set(steps.kind) <= {"prefill", "decode", "mixed"} and "decode" in set(steps.kind)
    assert steps.decode_tokens.sum() == 24 * 15, "each request's first token comes from its prefill"
    assert steps.t.is_monotonic_increasing and (steps.step_ms >= steps.forward_ms).all()

    reqs = tiny_worker.metrics.requests().set_index("request_id").loc[sorted(ids)]
    assert len(reqs) == 24
    assert reqs.ttft_s.notna().all() and (reqs.ttft_s > 0).all()
    assert (reqs.ttft_s <= reqs.e2e_s).all() and (reqs.queued_s <= reqs.ttft_s).all()
    assert (reqs.output_tokens == 16).all() and (reqs.finish_reason == "length").all()

    summary = tiny_worker.metrics.summary(max_batch)
    assert summary["requests"] == 24 and summary["max_batch_size"] > 1
    assert 0 < summary["mean_occupancy"] <= summary["max_occupancy"] <= 1
    assert summary["ttft_s_p50"] <= summary["ttft_s_p99"] <= summary["e2e_s_p99"]


def test_metrics_double_as_a_heartbeat_while_idle(tiny_worker: ModelWorker) -> None:
    before = tiny_worker.metrics.last_heartbeat
    wait_until(lambda: tiny_worker.metrics.last_heartbeat != before, timeout_s=3)
    assert tiny_worker.health()["heartbeat_age_s"] < 3


# ---- the dashboard on the real worker ---------------------------------------------------------------------


def test_dashboard_refreshes_while_the_worker_runs_and_stops(
    tiny_worker: ModelWorker, tiny_pipe: TokenGeneratorPipeline, tmp_path: Path
) -> None:
    tiny_worker.metrics.reset()
    dash = Dashboard(tiny_worker, interval_s=0.25).start()
    assert dash.running and dash.frames == 1
    started = time.monotonic()
    while time.monotonic() - started < 2.5:  # keep the worker busy for a while, whatever this machine's speed
        streams = [tiny_pipe.stream("keep the worker busy", max_new_tokens=64, ignore_eos=True) for _ in range(4)]
        for s in streams:
            s.result()
    time.sleep(0.6)  # the last metrics message, then one more refresh
    frames = dash.frames
    assert frames >= 4, f"only {frames} frames in {time.monotonic() - started:.1f} s of load"

    time.sleep(1.0)
    assert dash.frames <= frames + 1, "an idle worker brings no new steps, so nothing is redrawn"
    dash.stop()
    assert not dash.running

    fig = dash.snapshot()
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("Batch occupancy") for t in titles) and "Queue depth" in titles
    assert "Tokens/s on CPU" in titles
    path = dash.save(tmp_path / "dash" / "snapshot.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000


# ---- the dashboard on a fake CUDA worker ------------------------------------------------------------------


@dataclass
class FakeWorker:
    """Just what Dashboard reads from a ModelWorker, with telemetry we write ourselves."""

    device: str = "cuda:0"
    settings: Settings = field(default_factory=lambda: Settings(model="tiny-random-llama", max_batch_size=8))
    metrics: MetricsLog = field(default_factory=MetricsLog)
    alive: bool = True

    @property
    def info(self) -> m.Ready:
        return m.Ready(1, "tiny-random-llama", "generate", self.device, "bfloat16", 64, 16, 2048, 100, [2], 0.1)

    def is_alive(self) -> bool:
        return self.alive


def fake_steps(n: int, dt: float = 0.1) -> list[m.StepMetrics]:
    return [
        m.StepMetrics(t=i * dt, kind="prefill" if i == 0 else "decode", batch_size=min(i + 1, 8),
                      prefill_tokens=40 if i == 0 else 0, decode_tokens=0 if i == 0 else min(i + 1, 8),
                      step_ms=dt * 900, forward_ms=dt * 800, num_waiting=max(0, 10 - i), num_running=min(i + 1, 8),
                      kv_blocks_used=i, kv_blocks_total=64, preemptions=0, rss_bytes=2**30,
                      device_mem_bytes=(i + 1) * 2**28)
        for i in range(n)
    ]


def test_on_cuda_the_device_figures_are_labelled_gpu() -> None:
    worker = FakeWorker()
    worker.metrics.add(m.Metrics(sent_at=0.0, busy=True, steps=fake_steps(20)))
    fig = Dashboard(worker).snapshot()  # type: ignore[arg-type]
    assert "GPU cuda:0" in fig.get_suptitle()
    assert "Tokens/s on GPU cuda:0" in [ax.get_title() for ax in fig.axes]
    assert "GPU memory (GiB)" in [ax.get_ylabel() for ax in fig.axes]


def test_the_live_loop_ends_by_itself_when_the_worker_stops() -> None:
    worker = FakeWorker(device="cpu")
    dash = Dashboard(worker, interval_s=0.05).start()  # type: ignore[arg-type]
    worker.metrics.add(m.Metrics(sent_at=0.0, busy=True, steps=fake_steps(5)))
    wait_until(lambda: dash.frames >= 2)
    worker.alive = False
    wait_until(lambda: not dash.running, timeout_s=2)
    dash.stop()


def test_an_empty_log_draws_placeholders() -> None:
    fig = Dashboard(FakeWorker(device="cpu")).snapshot()  # type: ignore[arg-type]
    assert "0 steps" in fig.get_suptitle()
    assert sum("no steps yet" in t.get_text() for ax in fig.axes for t in ax.texts) == 5


def test_throughput_bins_conserve_tokens() -> None:
    log = MetricsLog()
    log.add(m.Metrics(sent_at=0.0, busy=True, steps=fake_steps(50, dt=0.1)))
    steps = log.steps()
    rates = panels.throughput(steps, bin_s=0.5)
    assert list(rates.columns) == ["prefill_tok_s", "decode_tok_s"]
    assert rates.prefill_tok_s.sum() * 0.5 == pytest.approx(steps.prefill_tokens.sum())
    assert rates.decode_tok_s.sum() * 0.5 == pytest.approx(steps.decode_tokens.sum())
    assert rates.index[1] - rates.index[0] == pytest.approx(0.5)
    assert panels.throughput(steps.iloc[:0]).empty


def test_prefix_hit_rate_per_bin_and_since_start() -> None:
    steps = pd.DataFrame({"t": [0.0, 0.2, 0.6, 1.1, 1.2], "prefix_cache_queries": [100, 0, 50, 0, 50],
                          "prefix_cache_hits": [0, 0, 40, 0, 50]})
    rates = panels.prefix_hit_rate(steps, bin_s=0.5)
    assert list(rates.index) == pytest.approx([0.0, 0.5, 1.0])
    assert rates.hit_rate.iloc[0] == 0.0 and rates.hit_rate.iloc[1] == 0.8 and rates.hit_rate.iloc[2] == 1.0
    assert list(rates.cumulative) == pytest.approx([0.0, 40 / 150, 90 / 200])
    idle = panels.prefix_hit_rate(steps.assign(prefix_cache_queries=0, prefix_cache_hits=0), bin_s=0.5)
    assert idle.hit_rate.isna().all() and idle.cumulative.isna().all()  # nothing looked up: no rate, not 0 %


def test_the_dashboard_draws_the_hit_rate_and_cached_blocks() -> None:
    worker = FakeWorker(device="cpu")
    rows = [msgspec.structs.replace(s, prefix_cache_queries=64, prefix_cache_hits=48 if i else 0, kv_blocks_cached=i)
            for i, s in enumerate(fake_steps(20))]
    worker.metrics.add(m.Metrics(sent_at=0.0, busy=True, steps=rows))
    fig = Dashboard(worker).snapshot()  # type: ignore[arg-type]
    (panel,) = [ax for ax in fig.axes if ax.get_title().startswith("Prefix cache hit rate")]
    per_interval, since_start = panel.get_lines()
    assert max(per_interval.get_ydata()) == 75.0 and 0 < since_start.get_ydata()[-1] < 75.0
    (kv,) = [ax for ax in fig.axes if ax.get_title() == "KV-cache use and memory"]
    assert [t.get_text() for t in kv.get_legend().get_texts()] == ["in use", "caching a prefix"]
    assert worker.metrics.summary()["prefix_cache_hit_rate"] == pytest.approx(48 * 19 / (64 * 20))
    plain = FakeWorker(device="cpu")
    plain.metrics.add(m.Metrics(sent_at=0.0, busy=True, steps=fake_steps(5)))
    texts = [t.get_text() for ax in Dashboard(plain).snapshot().axes for t in ax.texts]  # type: ignore[arg-type]
    assert "no prefix-cache lookups" in texts and "prefix_cache_hit_rate" not in plain.metrics.summary()


def test_embedding_steps_count_their_batch_as_occupancy() -> None:
    steps = pd.DataFrame({"kind": ["embed", "decode"], "batch_size": [4, 3], "num_running": [0, 2]})
    assert list(panels.occupancy(steps, 8)) == [0.5, 0.25]
    assert not math.isnan(panels.occupancy(steps, 8).sum())


# ---- in a real kernel (ipykernel 7 routes a thread's output by its parent message) ------------------------

START_CELL = """
from tests.test_telemetry import FakeWorker
from toolkit.notebook import Dashboard
worker = FakeWorker(device="cpu")
dash = Dashboard(worker, interval_s=0.1).start()
"""
FEED_CELL = """
import time
from tests.test_telemetry import fake_steps
from toolkit.worker import messages as m
for i in range(1, 6):
    worker.metrics.add(m.Metrics(sent_at=float(i), busy=True, steps=fake_steps(5 * i)[-5:]))
    time.sleep(0.3)
"""


def run_cell(client, code: str) -> tuple[str, list[dict]]:
    """Execute `code`; return its msg_id and every iopub message up to its idle status."""
    msg_id = client.execute(code)
    messages = []
    while True:
        msg = client.get_iopub_msg(timeout=30)
        messages.append(msg)
        if (msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
                and msg["parent_header"].get("msg_id") == msg_id):
            return msg_id, messages


def test_live_updates_belong_to_the_cell_that_started_the_dashboard() -> None:
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3", cwd=str(Path(__file__).resolve().parents[1]))
    try:
        start_id, started = run_cell(client, START_CELL)
        _feed_id, fed = run_cell(client, FEED_CELL)
        run_cell(client, "dash.stop()")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    shown = [msg for msg in started if msg["msg_type"] == "display_data"]
    assert len(shown) == 1 and "image/png" in shown[0]["content"]["data"]
    display_id = shown[0]["content"]["transient"]["display_id"]
    updates = [msg for msg in fed if msg["msg_type"] == "update_display_data"]
    assert len(updates) >= 2, "the thread refreshed the figure while the other cell ran"
    assert all(u["content"]["transient"]["display_id"] == display_id for u in updates)
    assert all(u["parent_header"]["msg_id"] == start_id for u in updates), "updates stay in the starting cell"
    assert not [msg for msg in fed if msg["msg_type"] in ("display_data", "stream", "error")]
