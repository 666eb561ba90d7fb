"""Worker telemetry end to end (burst -> MetricsLog) and the Dashboard drawn from it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from tests.conftest import tiny_settings
from toolkit import ModelWorker, Settings, TokenGeneratorPipeline, start_model_worker
from toolkit.engine.request import Sequence
from toolkit.notebook import Dashboard, panels
from toolkit.pool.metrics import PoolMetrics
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
    assert steps.t.is_monotonic_increasing and (steps.pid == tiny_worker.pid).all()
    phases = steps[["schedule_ms", "prepare_ms", "forward_ms", "sample_ms", "update_ms"]]
    assert (phases >= 0).all().all() and (steps.forward_ms > 0).all()
    assert (steps.step_ms >= phases.sum(axis=1)).all(), "forward_ms is the forward alone; the phases fit in a step"
    assert (steps.device_util > 0).all(), "CPU steps report the worker's CPU use"

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


# ---- one time base across restarts, and nothing lost on a clean stop --------------------------------------


@pytest.fixture(scope="module")
def held_metrics_worker() -> Iterator[ModelWorker]:
    """Step rows held for 30 s: whatever reaches the log before then came from the flush on Shutdown."""
    with start_model_worker(tiny_settings(metrics_interval_s=30.0)) as worker:
        yield worker


@pytest.mark.timeout(180)
def test_a_restart_right_after_a_request_keeps_that_requests_step_rows(held_metrics_worker: ModelWorker) -> None:
    worker = held_metrics_worker
    pipe = TokenGeneratorPipeline(worker)
    worker.metrics.reset()
    done = pipe.generate("flush me", max_new_tokens=8, ignore_eos=True)
    assert worker.metrics.steps().empty, "the worker still holds the rows (metrics_interval_s=30)"
    old_pid = worker.pid
    worker.restart()

    steps = worker.metrics.steps()
    assert (steps.pid == old_pid).all() and steps.output_tokens.sum() == 8 and steps.decode_tokens.sum() == 7
    reqs = worker.metrics.requests()
    (row,) = reqs[reqs.request_id == done.request_id].itertuples()
    assert (row.pid, row.output_tokens, row.finish_reason) == (old_pid, 8, "length")


@pytest.mark.timeout(180)
def test_a_restart_between_two_requests_keeps_one_time_base(held_metrics_worker: ModelWorker) -> None:
    worker = held_metrics_worker
    pipe = TokenGeneratorPipeline(worker)
    worker.metrics.reset()
    pipe.generate("before the restart", max_new_tokens=6, ignore_eos=True)
    first_pid = worker.pid
    worker.restart()
    pipe.generate("after the restart", max_new_tokens=6, ignore_eos=True)
    second_pid = worker.pid
    worker.restart()  # flushes the second worker's rows too

    steps = worker.metrics.steps()
    assert first_pid != second_pid and steps.t.is_monotonic_increasing
    assert list(dict.fromkeys(steps.pid)) == [first_pid, second_pid], "rows in order, each naming its worker"
    assert steps.t.iloc[-1] - steps.t.iloc[0] < 600, "one wall clock, not a per-process one"
    summary = worker.metrics.summary(worker.settings.max_batch_size)
    assert all(math.isfinite(v) for v in summary.values()), summary
    assert summary["workers"] == 2 and summary["span_s"] > 0 and summary["output_tokens_per_s"] > 0
    assert summary["ttft_s_count"] == summary["itl_mean_s_count"] == summary["e2e_s_count"] == 2


def request_row(rid: str, ttft: float, itl: float, e2e: float, out: int, reason: str) -> m.RequestMetrics:
    return m.RequestMetrics(rid, prompt_tokens=5, output_tokens=out, queued_s=min(ttft, 0.01), ttft_s=ttft,
                            itl_mean_s=itl, e2e_s=e2e, finish_reason=reason)


def test_percentiles_skip_missing_values_and_say_how_many_rows_they_cover() -> None:
    nan = math.nan
    log = MetricsLog()
    log.add(m.Metrics(sent_at=0.0, busy=False, requests=[
        request_row("a", 0.1, 0.02, 0.5, 20, "length"),
        request_row("b", 0.3, 0.04, 0.9, 20, "length"),
        request_row("cancelled-early", nan, nan, 0.2, 0, "cancelled"),
        request_row("one-token", 0.2, nan, 0.2, 1, "length"),
        request_row("embedding", 0.05, nan, 0.05, 0, "stop"),
    ]))
    summary = log.summary()
    assert all(math.isfinite(v) for v in summary.values()), summary
    assert (summary["ttft_s_count"], summary["itl_mean_s_count"], summary["e2e_s_count"]) == (4, 2, 5)
    assert summary["ttft_s_p50"] == pytest.approx(0.15) and summary["itl_mean_s_p50"] == pytest.approx(0.03)
    assert summary["e2e_s_p99"] == pytest.approx(np.percentile([0.5, 0.9, 0.2, 0.2, 0.05], 99))


def test_the_span_is_never_negative_even_when_rows_come_out_of_order() -> None:
    """Steps of a second worker stamped earlier than the first's (a clock stepped back): rates stay sane."""
    first, second = fake_steps(10), fake_steps(10)
    for row in first:
        row.t, row.pid = 1000.0 + row.t, 1
    for row in second:
        row.t, row.pid = 990.0 + row.t, 2
    log = MetricsLog()
    log.add(m.Metrics(sent_at=0.0, busy=True, steps=first + second))
    summary = log.summary()
    assert summary["span_s"] == pytest.approx(1000.9 - (990.0 - 0.09))
    assert summary["workers"] == 2 and 0 < summary["total_tokens_per_s"] < 1e6
    assert MetricsLog().summary() == {"steps": 0.0, "requests": 0.0}


def test_an_output_of_one_token_has_no_inter_token_latency() -> None:
    seq = Sequence.from_request(m.GenerateRequest("r", [1, 2, 3], max_new_tokens=1))
    seq.append_token(7, now=10.0)
    assert math.isnan(seq.itl_mean)
    seq.append_token(8, now=10.5)
    assert seq.itl_mean == pytest.approx(0.5)


@pytest.mark.timeout(120)
def test_completion_times_end_when_the_request_finished_not_when_read(tiny_pipe: TokenGeneratorPipeline) -> None:
    stream = tiny_pipe.stream("finish, then wait to be read", max_new_tokens=4, ignore_eos=True)
    wait_until(lambda: stream.sink.finished_at is not None, timeout_s=60)
    time.sleep(1.0)
    done = stream.result()
    arrival = stream.request.arrival_time
    assert done.e2e_s == pytest.approx(stream.sink.finished_at - arrival)
    assert time.time() - arrival - done.e2e_s >= 1.0, "the second spent unread is not part of e2e_s"
    assert done.ttft_s is not None and 0 < done.ttft_s <= done.e2e_s


# ---- the dashboard on the real worker ---------------------------------------------------------------------


def _wait_until_metrics_settle(worker: ModelWorker, quiet_s: float, timeout_s: float) -> None:
    """Until no step row has arrived for `quiet_s`: on a loaded host the last rows can come a while after the load."""
    deadline = time.monotonic() + timeout_s
    mark, since = worker.metrics.steps_mark(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, f"step rows still arriving after {timeout_s} s"
        time.sleep(0.05)
        if worker.metrics.steps_mark() != mark:
            mark, since = worker.metrics.steps_mark(), time.monotonic()


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
    _wait_until_metrics_settle(tiny_worker, quiet_s=0.75, timeout_s=15.0)
    time.sleep(0.5)  # one more refresh draws the last steps
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


def test_a_restart_is_marked_and_both_workers_bins_are_drawn() -> None:
    first, second = fake_steps(10), fake_steps(10)
    for row in first:
        row.t, row.pid = 1.7e9 + row.t, 11
    for row in second:
        row.t, row.pid = 1.7e9 + 5 + row.t, 12  # five seconds of restart in between
    worker = FakeWorker(device="cpu")
    worker.metrics.add(m.Metrics(sent_at=0.0, busy=True, steps=first + second))
    fig = Dashboard(worker).snapshot()  # type: ignore[arg-type]
    dashed = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert [line.get_xdata()[0] for line in dashed] == [pytest.approx(5.09)], "one restart, 5.09 s after the start"
    steps = panels.since_first_step(worker.metrics.steps())
    rates = panels.throughput(steps, bin_s=0.5)
    assert rates.index.min() >= 0 and rates.prefill_tok_s.sum() * 0.5 == pytest.approx(80)


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


def test_occupancy_is_the_steps_batch_for_every_kind_in_summary_and_dashboard() -> None:
    steps = pd.DataFrame({"kind": ["embed", "decode"], "batch_size": [4, 3], "num_running": [0, 2]})
    assert list(panels.occupancy(steps, 8)) == [0.5, 0.375]
    log = MetricsLog()
    log.add(m.Metrics(sent_at=0.0, busy=True, steps=fake_steps(20)))
    summary = log.summary(max_batch_size=8)
    assert summary["mean_occupancy"] == pytest.approx(panels.occupancy(log.steps(), 8).mean())
    assert summary["max_occupancy"] == 1.0


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


# ---- the dashboard on a fake pool ------------------------------------------------------------------------


@dataclass
class FakePool(FakeWorker):
    """Two replicas' logs merged as WorkerPool merges them, and a health() we set by hand."""

    replicas: list[dict[str, object]] = field(default_factory=list)
    pool_metrics: PoolMetrics = field(default_factory=lambda: PoolMetrics([MetricsLog(), MetricsLog()]))

    def __post_init__(self) -> None:
        self.metrics = self.pool_metrics
        self.replicas = [{"replica": i, "state": "ready", "died": None, "died_at": None} for i in range(2)]

    def health(self) -> dict[str, object]:
        return {"state": "ready", "replicas": [dict(r) for r in self.replicas]}


def pool_steps(pid: int, t0: float) -> list[m.StepMetrics]:
    return [msgspec.structs.replace(s, t=t0 + s.t, pid=pid) for s in fake_steps(10)]


def status_texts(fig: Figure) -> dict[str, str]:
    """The replica status line (figure-level texts other than the title) and its colours."""
    return {t.get_text(): to_hex(t.get_color()) for t in fig.texts if t is not fig._suptitle}


def test_replica_statuses_read_a_pools_health_and_a_single_worker_has_none() -> None:
    health = {"replicas": [{"replica": 0, "state": "ready", "died_at": None},
                           {"replica": 1, "state": "failed", "died_at": 105.0, "died": "ActorDiedError: killed"}]}
    alive, dead = panels.replica_statuses(health)
    assert (alive.dead, dead.dead, dead.died) == (False, True, "ActorDiedError: killed")
    assert alive.label(100.0) == "replica 0 alive"
    assert dead.label(100.0) == "replica 1 DEAD since t=5.0 s"
    assert dead.label(None) == "replica 1 DEAD"  # no step logged yet: no time axis to place it on
    assert panels.ReplicaStatus(2, "starting").label(0.0) == "replica 2 starting"
    assert panels.replica_statuses({"state": "ready", "pid": 1}) == []  # ModelWorker.health()


def test_a_dead_replica_is_marked_with_the_time_it_died_and_restarts_are_told_apart_per_replica() -> None:
    pool = FakePool(device="cpu")
    t0 = 1.7e9
    pool.metrics.logs[0].add(m.Metrics(sent_at=0.0, busy=True, steps=pool_steps(11, t0)))
    pool.metrics.logs[1].add(m.Metrics(sent_at=0.0, busy=True, steps=pool_steps(21, t0 + 0.05)))
    dash = Dashboard(pool)  # type: ignore[arg-type]
    fig = dash.snapshot()
    assert status_texts(fig) == {"replica 0 alive": to_hex("tab:green"), "replica 1 alive": to_hex("tab:green")}
    occupancy_panel = fig.axes[0]
    assert [t.get_text() for t in occupancy_panel.get_legend().get_texts()] == ["replica 0", "replica 1"]
    assert not [ln for ln in occupancy_panel.get_lines() if ln.get_linestyle() in ("--", "-.")], (
        "interleaved replicas are not restarts"
    )
    dash.refresh()  # a live frame
    assert dash.refresh(force=False) is False  # nothing new since it
    start = t0 - 0.09  # the first step began step_ms before it ended: t=0 on the panels
    pool.replicas[1].update(state="failed", died="ActorDiedError: killed", died_at=start + 3.0)
    assert dash.refresh(force=False) is True, "a death redraws even when no step follows it"
    texts = status_texts(dash._figure)
    assert texts == {"replica 0 alive": to_hex("tab:green"), "replica 1 DEAD since t=3.0 s": to_hex("tab:red")}
    marks = [ln.get_xdata()[0] for ln in dash._figure.axes[0].get_lines() if ln.get_linestyle() == "-."]
    assert marks == [pytest.approx(3.0)]
    pool.metrics.logs[1].add(m.Metrics(sent_at=1.0, busy=True, steps=pool_steps(22, t0 + 5)))  # restarted
    pool.replicas[1].update(state="ready", died=None, died_at=None)
    fig = dash.snapshot()
    assert set(status_texts(fig)) == {"replica 0 alive", "replica 1 alive"}
    restarts = [ln.get_xdata()[0] for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert restarts == [pytest.approx(5.09)], "one restart: replica 1's new process, 5.09 s in"
