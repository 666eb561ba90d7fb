"""The worker process: load the model, say Ready, then serve requests step by step until told to stop.

This module is the spawn target, so it stays importable without side effects; only `run(settings)` does work.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from toolkit.settings import Settings
from toolkit.worker import messages as m
from toolkit.worker.engine_queue import EngineQueue

log = logging.getLogger("toolkit.worker")

IDLE_POLL_S = 0.5  # how often an idle worker wakes: parent check and heartbeat, ~0 % CPU


def run(settings: Settings) -> None:
    """Spawn entry point: everything the worker needs is in `settings` (ipc_dir set by the parent)."""
    assert settings.ipc_dir, "start_model_worker sets ipc_dir"
    parent_pid = os.getppid()
    _install_signal_handlers()
    _log_to_file(settings)
    queue = EngineQueue.worker(settings.ipc_dir)
    try:
        engine, ready = _load(settings)
    except BaseException as exc:  # report any load failure, then exit non-zero
        log.exception("model load failed")
        queue.send_response(m.StartupFailed(type(exc).__name__, str(exc), traceback.format_exc()))
        queue.close()
        _exit(1)
    log.info("ready: %s", ready)  # logged first: whoever reads the log after Ready finds this line
    queue.send_response(ready)
    loop = WorkerLoop(engine, queue, settings, parent_pid)
    try:
        loop.run()
    finally:
        queue.close(linger_ms=0 if loop.orphaned else None)
    if loop.orphaned:  # nobody is left to remove our sockets and saved tokenizer: the dir was made for us alone
        shutil.rmtree(settings.ipc_dir, ignore_errors=True)
    log.info("worker stopped")
    _exit(0)


def _exit(code: int) -> None:
    """Skip interpreter teardown: seconds with torch loaded, and nothing is left to free once the logs are flushed."""
    logging.shutdown()
    os._exit(code)


def _load(settings: Settings) -> tuple[Any, m.Ready]:
    from toolkit import models

    started = time.perf_counter()
    if models.resolve(settings.model).task == "embed":
        from toolkit.embeddings.engine import EmbeddingsEngine

        engine: Any = EmbeddingsEngine(settings)
        tokenizer_dir = ""
    else:
        from toolkit.engine.core import Engine

        engine = Engine(settings)
        tokenizer_dir = str(Path(settings.ipc_dir or ".", "tokenizer"))
        engine.tokenizer.save_pretrained(tokenizer_dir)
    info = engine.ready_info()
    ready = m.Ready(pid=os.getpid(), load_time_s=time.perf_counter() - started, tokenizer_dir=tokenizer_dir, **info)
    return engine, ready


class WorkerLoop:
    """Blocks on the sockets while idle; while busy, drains messages between steps and runs one step each turn."""

    def __init__(self, engine: Any, queue: EngineQueue, settings: Settings, parent_pid: int) -> None:
        self.engine = engine
        self.queue = queue
        self.settings = settings
        self.parent_pid = parent_pid
        self.stopping = False
        self.orphaned = False  # the parent died: exit at once, deliver nothing
        self.pending_steps: list[m.StepMetrics] = []
        self.last_metrics = 0.0

    def run(self) -> None:
        while not self.stopping:
            busy = self.engine.has_work
            self.queue.poll(0 if busy else IDLE_POLL_S)
            for message in self.queue.drain():
                self.handle(message)
            if os.getppid() != self.parent_pid:  # checked every step when busy, every IDLE_POLL_S when idle
                log.warning("parent %d is gone; exiting", self.parent_pid)
                self.orphaned = True
                return
            if self.engine.has_work and not self.stopping:
                self.step()
            self.maybe_send_metrics()

    def handle(self, message: Any) -> None:
        if isinstance(message, (m.GenerateRequest, m.EmbedRequest)):
            try:
                self.engine.add(message)
            except Exception as exc:
                self.fail([message.request_id], exc)
        elif isinstance(message, m.Cancel):
            deltas = self.engine.cancel(message.request_ids)
            if deltas:
                self.queue.send_response(m.StepOutput(deltas=deltas))
        elif isinstance(message, m.Shutdown):
            log.info("shutdown requested")
            self.stopping = True
        elif isinstance(message, m.ResetPrefixCache):
            self.queue.send_response(self.reset_prefix_cache(message.id))
        else:
            log.warning("ignored unexpected message %r", type(message).__name__)

    def reset_prefix_cache(self, reply_id: str) -> m.PrefixCacheReset:
        """Answer a reset: the blocks dropped, or the error that refused it (requests running, no prefix cache)."""
        reset = getattr(self.engine, "reset_prefix_cache", None)
        if reset is None:
            return m.PrefixCacheReset(reply_id, error_type="InvalidRequestError",
                                      message="an embedding worker has no prefix cache")
        try:
            cleared = reset()
        except Exception as exc:
            return m.PrefixCacheReset(reply_id, error_type=type(exc).__name__, message=str(exc))
        log.info("prefix cache reset: %d blocks dropped", cleared)
        return m.PrefixCacheReset(reply_id, blocks_cleared=cleared)

    def step(self) -> None:
        try:
            results, metrics = self.engine.step()
        except Exception as exc:  # a failed step fails its requests, not the worker
            log.exception("step failed")
            self.fail(self.engine.abort_all(), exc)
            return
        self.pending_steps.append(metrics)
        deltas = [r for r in results if isinstance(r, m.TokenDelta)]
        if deltas:
            self.queue.send_response(m.StepOutput(deltas=deltas))
        for result in results:
            if not isinstance(result, m.TokenDelta):
                self.queue.send_response(result)

    def fail(self, request_ids: list[str], exc: BaseException) -> None:
        tb = traceback.format_exc()
        failures = [m.RequestFailed(rid, type(exc).__name__, str(exc), tb) for rid in request_ids]
        if failures:
            self.queue.send_response(m.StepOutput(deltas=[], failures=failures))

    def maybe_send_metrics(self) -> None:
        now = time.time()
        busy = self.engine.has_work
        interval = self.settings.metrics_interval_s if busy or self.pending_steps else IDLE_POLL_S * 2
        if now - self.last_metrics < interval:
            return
        requests = self.engine.pop_request_metrics()
        used = self.engine.kv_blocks_used
        self.queue.send_response(
            m.Metrics(sent_at=now, busy=busy, steps=self.pending_steps, requests=requests, kv_blocks_used=used)
        )
        self.pending_steps = []
        self.last_metrics = now


def _install_signal_handlers() -> None:
    """SIGTERM exits cleanly; Ctrl-C in a notebook interrupts the request in the parent, not the worker.

    Parent death is found by polling getppid() rather than PR_SET_PDEATHSIG, which fires when the *thread*
    that started us exits, not the process.
    """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _log_to_file(settings: Settings) -> None:
    """Worker output goes to a file, not into whichever notebook cell is running (ipykernel captures fds 1, 2)."""
    log_dir = Path(settings.log_dir or settings.ipc_dir or ".")
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "worker.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s [pid %(process)d] %(message)s",
        stream=sys.stderr,
        force=True,
    )
