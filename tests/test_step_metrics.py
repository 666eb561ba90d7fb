"""StepProbe and both engines in this process: the columns every engine fills alike (worker side, torch loaded).

Apart from tests/test_telemetry.py because a notebook-kernel test there imports that module.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

from tests.conftest import tiny_settings
from toolkit import Settings, models
from toolkit.embeddings.engine import EmbeddingsEngine
from toolkit.engine.core import Engine
from toolkit.engine.protocol import EngineProtocol
from toolkit.engine.step_metrics import StepProbe, cpu_util
from toolkit.worker import messages as m

ROW = {"kind": "decode", "batch_size": 1, "prefill_tokens": 0, "decode_tokens": 1, "forward_ms": 0.0,
       "num_waiting": 0, "num_running": 1, "kv_blocks_used": 1, "kv_blocks_total": 8, "preemptions": 0}


def test_device_util_on_cpu_is_this_processs_cpu_use() -> None:
    probe = StepProbe("cpu")
    probe.start()
    deadline = time.perf_counter() + 0.2
    while time.perf_counter() < deadline:  # busy: burns CPU for the whole step
        pass
    busy = probe.finish(**ROW)
    probe.start()
    time.sleep(0.2)  # idle: the same wall time, no CPU
    idle = probe.finish(**ROW)
    assert busy.device_util > 5 and idle.device_util < 5 and busy.device_util > 5 * idle.device_util
    assert busy.pid == idle.pid == os.getpid() and abs(busy.t - time.time()) < 5 and busy.step_ms >= 200
    assert cpu_util(cpu_s=0.5, wall_s=1.0, threads=2) == 25.0 and cpu_util(1.0, 0.0, 1) == 0.0


def test_device_util_on_cuda_reads_nvml_and_is_nan_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(torch.cuda, "utilization", lambda device: calls.append(device) or 37)
    assert StepProbe("cuda")._read_cuda_util() == 37.0

    def no_nvml(device: object) -> int:
        calls.append(device)
        raise ModuleNotFoundError("pynvml")

    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    probe = StepProbe("cuda")
    calls.clear()
    assert math.isnan(probe._read_cuda_util()) and math.isnan(probe._read_cuda_util())
    assert len(calls) == 1, "a missing NVML is asked once, not every step"


@pytest.mark.timeout(120)
def test_both_engines_fill_the_same_columns_through_the_protocol() -> None:
    generator = Engine(tiny_settings(num_kv_blocks=32, block_size=8))
    embedder = EmbeddingsEngine(Settings(model=models.EMBED_MODEL, device="cpu", dtype="float32", num_threads=1))
    generator.add(m.GenerateRequest("one", [5, 6, 7], max_new_tokens=1, ignore_eos=True))
    embedder.add(m.EmbedRequest("e", ["some text", "more text"]))
    embedder.add(m.EmbedRequest("dropped", ["never embedded"]))
    embedder.cancel(["dropped"])
    for engine in (generator, embedder):
        assert isinstance(engine, EngineProtocol)
        _, row = engine.step()
        phases = row.schedule_ms + row.prepare_ms + row.forward_ms + row.sample_ms + row.update_ms
        assert 0 < row.forward_ms and phases <= row.step_ms and row.device_util > 0, row
        assert row.pid == os.getpid() and abs(row.t - time.time()) < 60 and row.rss_bytes > 0
        assert not engine.has_work
    rows = {r.request_id: r for r in generator.pop_request_metrics() + embedder.pop_request_metrics()}
    assert math.isnan(rows["one"].itl_mean_s) and rows["one"].ttft_s > 0, "one token: a TTFT, no ITL"
    assert math.isnan(rows["dropped"].ttft_s) and rows["e"].ttft_s == rows["e"].e2e_s > 0
    assert {r.pid for r in rows.values()} == {os.getpid()}
