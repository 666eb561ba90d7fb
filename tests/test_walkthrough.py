"""The notebooks' helper package (notebooks/walkthrough): the stored seed excerpt, the trace parsing and patching,
and the event-loop lag probe measure what they claim."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "notebooks"))

from walkthrough.lag import loop_lag, under_load
from walkthrough.seed import seed_excerpts, side_by_side, source_of
from walkthrough.trace import hop_table, kernel_trace, worker_trace

from toolkit.worker import messages as m
from toolkit.worker.engine_queue import EngineQueue


def test_seed_excerpt_is_attributed_and_has_both_functions() -> None:
    seed = seed_excerpts()
    assert "d7a8d034d13083a5024860e03494ee3820f429b1" in seed["header"] and "LLVM Exceptions" in seed["header"]
    start, main = seed["start_model_worker"], next(v for k, v in seed.items() if k.startswith("_model_worker"))
    assert 'get_context("spawn")' in start and "worker.start()" in start
    assert "_set_pdeathsig(signal.SIGTERM)" in main and "pipeline = model_factory()" in main
    assert main.index("pc.set_started()") < main.index("scheduler.run()") < main.index("pc.set_completed()")


def test_side_by_side_escapes_code_and_names_the_source() -> None:
    ours = source_of(seed_excerpts)
    assert ours.startswith("# walkthrough.seed.seed_excerpts  (seed.py:") and "def seed_excerpts" in ours
    html = side_by_side("left", "a < b", "right", ours)
    assert "a &lt; b" in html and html.count("<td") == 2


def test_worker_trace_keeps_only_trace_lines_since_a_time() -> None:
    log = "\n".join([
        "2026 INFO walkthrough.factories [pid 7] trace 100.500000 worker receives GenerateRequest req-1-0",
        "2026 INFO toolkit.worker [pid 7] ready: Ready(...)",
        "2026 INFO walkthrough.factories [pid 7] trace 99.000000 forward starts 3 tokens",
        "2026 INFO walkthrough.factories [pid 7] trace 100.501000 forward starts 3 tokens",
        "2026 INFO walkthrough.factories [pid 7] trace 100.502500 response sent StepOutput req-1-0:1",
    ])
    rows = worker_trace(log, since=100.0)
    assert [(hop, detail) for _, _, hop, detail in rows] == [
        ("worker receives", "GenerateRequest"), ("forward starts", "3 tokens"), ("response sent", "StepOutput")]
    table = hop_table(rows, t0=100.5)
    assert table.ms.round(3).tolist() == [0.0, 1.0, 2.5] and table["+ms"].round(3).tolist() == [0.0, 1.0, 1.5]


def test_kernel_trace_stamps_sends_and_restores_the_queue(tmp_path: Path) -> None:
    send, drain = EngineQueue.send_request, EngineQueue.drain
    parent, worker = EngineQueue.parent(str(tmp_path)), EngineQueue.worker(str(tmp_path))
    try:
        with kernel_trace() as rows:
            parent.send_request(m.Cancel(["r"]))
            worker.send_response(m.StepOutput(deltas=[m.TokenDelta("r", [1, 2], None)]))
            deadline = time.monotonic() + 10
            while len(rows) < 2 and time.monotonic() < deadline:
                parent.poll(0.1)
                list(parent.drain())
        assert [(proc, hop, detail) for _, proc, hop, detail in rows] == [
            ("kernel", "EngineQueue send", "Cancel"), ("kernel I/O thread", "parent receives", "StepOutput, 2 token")]
    finally:
        parent.close()
        worker.close()
    assert EngineQueue.send_request is send and EngineQueue.drain is drain


def test_loop_lag_sees_a_blocked_loop() -> None:
    async def block() -> int:
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # what an engine step does to the loop
        return 1

    result = asyncio.run(asyncio.wait_for(under_load(block), timeout=30))
    lag = result["lag"][:, 1]
    assert result["tokens"] == 1 and result["wall_s"] >= 0.2
    assert lag.max() >= 150, "the probe missed the 200 ms block"
    assert result["tokens_per_s"] == pytest.approx(1 / result["wall_s"])


def test_loop_lag_stops_when_told() -> None:
    async def run() -> int:
        stop = asyncio.Event()
        probe = asyncio.create_task(loop_lag(stop, every_s=0.005))
        await asyncio.sleep(0.1)
        stop.set()
        return len(await asyncio.wait_for(probe, timeout=5))

    assert asyncio.run(run()) >= 5
