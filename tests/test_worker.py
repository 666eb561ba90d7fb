"""The worker's lifecycle seen from the parent: handshake, logs, health, crash, restart, shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import tiny_settings
from toolkit import (
    QueueFullError,
    TokenGeneratorPipeline,
    WorkerCrashedError,
    WorkerStartupError,
    WorkerState,
    errors,
    start_model_worker,
)


def test_worker_is_a_separate_process_that_reports_ready(tiny_worker) -> None:
    assert tiny_worker.pid != os.getpid()
    assert tiny_worker.is_alive() and tiny_worker.state is WorkerState.READY
    info = tiny_worker.info
    assert (info.model, info.task, info.device, info.dtype) == ("tiny-random-llama", "generate", "cpu", "float32")
    assert info.num_kv_blocks > 0 and info.max_model_len > 0
    health = tiny_worker.health()
    assert health["alive"] and health["in_flight"] == 0 and health["pid"] == tiny_worker.pid
    assert "ready" in tiny_worker.logs()  # the worker's log goes to a file, readable from the handle


def test_idle_worker_does_not_spin(tiny_worker) -> None:
    proc = psutil.Process(tiny_worker.pid)
    before = proc.cpu_times()
    time.sleep(2.0)
    after = proc.cpu_times()
    busy = (after.user - before.user) + (after.system - before.system)
    assert busy < 0.2, f"idle worker used {busy:.2f} CPU-seconds in 2 s"


def test_factory_that_raises_is_a_startup_error_with_its_message() -> None:
    started = time.monotonic()
    with pytest.raises(WorkerStartupError, match="factory exploded on purpose") as info:
        start_model_worker(tiny_settings(model="tests.factories:raising"))
    assert "Traceback" in info.value.remote_traceback
    assert "raising" in info.value.remote_traceback  # the child's own frames travel with it
    assert time.monotonic() - started < 60


def test_unknown_model_is_a_startup_error_that_says_what_to_pass() -> None:
    with pytest.raises(WorkerStartupError, match="unknown model"):
        start_model_worker(tiny_settings(model="no-such-model-anywhere"))


def test_sigkill_mid_stream_fails_the_request_then_restart_serves() -> None:
    with start_model_worker(tiny_settings()) as worker:
        pipe = TokenGeneratorPipeline(worker)
        stream = pipe.stream("Tell me a long story", max_new_tokens=2000, ignore_eos=True)
        next(iter(stream))  # it is streaming
        old_pid = worker.pid
        os.kill(old_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(WorkerCrashedError) as info:
            for _ in stream:
                pass
        assert time.monotonic() - killed_at < 5
        assert info.value.signal == signal.SIGKILL
        assert worker.state is WorkerState.FAILED and not worker.is_alive()
        with pytest.raises(WorkerCrashedError):
            pipe.generate("hello", max_new_tokens=2)

        worker.restart()
        assert worker.pid != old_pid and worker.health()["restarts"] == 1
        out = TokenGeneratorPipeline(worker).generate("hello again", max_new_tokens=4, ignore_eos=True)
        assert len(out.token_ids) == 4
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE


def test_shutdown_stops_the_process_and_is_idempotent() -> None:
    worker = start_model_worker(tiny_settings())
    pipe = TokenGeneratorPipeline(worker)
    pid = worker.pid
    worker.shutdown()
    worker.shutdown()
    assert worker.state is WorkerState.STOPPED
    assert not psutil.pid_exists(pid)
    with pytest.raises(errors.WorkerNotRunningError):
        pipe.generate("anyone there?", max_new_tokens=2)


def test_dropping_the_handle_shuts_the_worker_down() -> None:
    worker = start_model_worker(tiny_settings())
    pid = worker.pid
    del worker  # what re-running a notebook's launch cell does to the old handle
    deadline = time.monotonic() + 15
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not psutil.pid_exists(pid)


def test_queue_full_for_the_excess_admitted_ones_finish() -> None:
    with start_model_worker(tiny_settings(max_queue_size=3)) as worker:
        pipe = TokenGeneratorPipeline(worker)
        streams = [pipe.stream("count to ten", max_new_tokens=8, ignore_eos=True) for _ in range(3)]
        with pytest.raises(QueueFullError):
            pipe.stream("one too many", max_new_tokens=8)
        assert [len(s.result().token_ids) for s in streams] == [8, 8, 8]
        assert len(pipe.generate("room again", max_new_tokens=2, ignore_eos=True).token_ids) == 2


def test_async_context_manager_and_astream() -> None:
    async def main() -> tuple[list, WorkerState]:
        async with start_model_worker(tiny_settings()) as worker:
            pipe = TokenGeneratorPipeline(worker)
            chunks = [c async for c in pipe.astream("async hello", max_new_tokens=5, ignore_eos=True)]
        return chunks, worker.state

    chunks, state = asyncio.run(main())
    assert sum(len(c.token_ids) for c in chunks) == 5
    assert chunks[-1].finish_reason == "length"
    assert state is WorkerState.STOPPED


def test_ready_reports_threads_kernels_and_host(tiny_worker) -> None:
    info = tiny_worker.info
    assert info.num_threads == 1  # tiny_settings: num_threads=1, set by the worker process itself
    assert info.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert info.linear_kernel.startswith("rows 1-4: ") and "; rows 5+: " in info.linear_kernel
    assert "ms" in info.linear_kernel  # the probe's measured times travel with the choice
    assert info.warnings == [] and tiny_worker.health()["warnings"] == []  # float32: nothing to warn about
    assert info.tokenizer_dir == str(Path(str(tiny_worker.ipc_dir), "tokenizer"))  # ipc_dir: the entry's argument


def test_a_dtype_without_native_support_is_warned_once_everywhere() -> None:
    """float16 has no native arithmetic on most x86 CPUs (no AVX512_FP16 / AMX-FP16); the host decides."""
    from toolkit.engine.hardware import dtype_warnings

    expected = dtype_warnings("cpu", torch.float16)
    with start_model_worker(tiny_settings(dtype="float16")) as worker:
        assert worker.info.dtype == "float16" and worker.info.warnings == expected
        assert worker.health()["warnings"] == expected
        assert worker.info.linear_kernel == "torch (float16: torch's own kernels)"
        for warning in expected:
            assert sum(" WARNING " in line and warning in line for line in worker.logs().splitlines()) == 1
        out = TokenGeneratorPipeline(worker).generate("still works", max_new_tokens=2, ignore_eos=True)
        assert len(out.token_ids) == 2


def test_no_leaked_semaphore_warning_after_a_worker_made_a_lock(tmp_path: Path) -> None:
    """tqdm (transformers' "Loading weights") makes a multiprocessing lock in the worker; it must be released."""
    script = tmp_path / "run.py"
    script.write_text(
        "from tests.conftest import tiny_settings\n"
        "from toolkit import TokenGeneratorPipeline, start_model_worker\n"
        "if __name__ == '__main__':\n"
        "    with start_model_worker(tiny_settings(model='tests.factories:with_mp_lock')) as worker:\n"
        "        print(len(TokenGeneratorPipeline(worker).generate('hi', max_new_tokens=2).token_ids))\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("1", "2")
    assert "leaked semaphore" not in done.stderr, done.stderr
