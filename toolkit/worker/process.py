"""The worker process: load the model, say Ready, then serve requests step by step until told to stop.

The spawn target: importable without side effects; only `run(settings, ipc_dir)` does work.
"""

from __future__ import annotations

import logging
import multiprocessing.util
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.settings import Settings
from toolkit.worker import messages as m
from toolkit.worker.engine_queue import EngineQueue
from toolkit.worker.heartbeat import StepHeartbeat

if TYPE_CHECKING:  # the parent imports this module (the spawn target): it must not pull in the engine package
    from toolkit.engine.protocol import EngineProtocol

log = logging.getLogger("toolkit.worker")

IDLE_POLL_S = 0.5  # how often an idle worker wakes: parent check and heartbeat, ~0 % CPU


def run(settings: Settings, ipc_dir: str) -> None:
    """Spawn entry point: what to serve is in `settings`; `ipc_dir` is the parent's private dir of the sockets."""
    parent_pid = os.getppid()
    _install_signal_handlers()
    _log_to_file(settings, ipc_dir)
    queue = EngineQueue.worker(ipc_dir)
    try:
        engine, ready = _load(settings, ipc_dir)
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
        shutil.rmtree(ipc_dir, ignore_errors=True)
    log.info("worker stopped")
    _exit(0)


def _exit(code: int) -> None:
    """Skip interpreter teardown (seconds with torch loaded), but not multiprocessing's exit finalizers.

    In a spawned child the default context is spawn, so a multiprocessing lock made here (tqdm makes one for its
    first progress bar, e.g. transformers' "Loading weights") is a named semaphore registered with the parent's
    resource tracker; without its finalizer it stays registered, and the tracker prints "leaked semaphore objects".
    `_exit_function` is what a normal exit runs for multiprocessing (private, but unchanged since Python 2.6).
    """
    multiprocessing.util._exit_function()
    logging.shutdown()
    os._exit(code)


def _load(settings: Settings, ipc_dir: str) -> tuple[EngineProtocol, m.Ready]:
    from toolkit import models

    started = time.perf_counter()
    if models.resolve(settings.model).task == "embed":
        from toolkit.embeddings.engine import EmbeddingsEngine

        engine: EngineProtocol = EmbeddingsEngine(settings, set_threads=True)
        tokenizer_dir = ""
    else:
        from toolkit.engine.core import Engine

        generator = Engine(settings, set_threads=True)
        tokenizer_dir = str(Path(ipc_dir, "tokenizer"))
        generator.tokenizer.save_pretrained(tokenizer_dir)
        engine = generator
    info = engine.ready_info()
    ready = m.Ready(pid=os.getpid(), load_time_s=time.perf_counter() - started, tokenizer_dir=tokenizer_dir, **info)
    return engine, ready


class WorkerLoop:
    """Blocks on the sockets while idle; while busy, drains messages between steps and runs one step each turn.

    Step rows are coalesced and sent every metrics_interval_s. On Shutdown the loop sends what it still holds
    before it returns; a worker killed (SIGKILL, a hang) loses at most the last metrics_interval_s of rows.
    """

    def __init__(self, engine: EngineProtocol, queue: EngineQueue, settings: Settings, parent_pid: int) -> None:
        self.engine = engine
        self.queue = queue
        self.settings = settings
        self.parent_pid = parent_pid
        self.stopping = False
        self.orphaned = False  # the parent died: exit at once, deliver nothing
        self.pending_steps: list[m.StepMetrics] = []
        self.last_metrics = time.time()  # Ready was the first word: the first interval starts now
        self.heartbeat = StepHeartbeat(queue, settings.metrics_interval_s)

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.heartbeat.close()

    def _run(self) -> None:
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
            self.maybe_send_metrics(force=self.stopping)

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
            with self.heartbeat.step(self.engine.kv_blocks_used):
                results, metrics = self.engine.step()
        except Exception as exc:  # a failed step fails the requests it ran, not the worker nor the waiting ones
            log.exception("step failed")
            self.fail(self.engine.fail_scheduled(), exc)
        else:
            self.deliver(results, metrics)
        if self.heartbeat.beats_in_step:  # a step long enough to beat in: say at once that it is over
            self.maybe_send_metrics(force=True)

    def deliver(self, results: list[Any], metrics: m.StepMetrics) -> None:
        """One StepOutput with every request's new tokens and failures; embedding results on their own."""
        self.pending_steps.append(metrics)
        failures = [_failure(rid, exc) for rid, exc in self.engine.pop_failures()]
        failed = {f.request_id for f in failures}
        deltas = [r for r in results if isinstance(r, m.TokenDelta) and r.request_id not in failed]
        if deltas or failures:
            self.queue.send_response(m.StepOutput(deltas=deltas, failures=failures))
        for result in results:
            if not isinstance(result, m.TokenDelta):
                self.queue.send_response(result)

    def fail(self, request_ids: list[str], exc: BaseException) -> None:
        failures = [_failure(rid, exc) for rid in request_ids]
        if failures:
            self.queue.send_response(m.StepOutput(deltas=[], failures=failures))

    def maybe_send_metrics(self, force: bool = False) -> None:
        """Send the coalesced rows (and a heartbeat) once per interval; `force` sends now (a long step just ended,
        or the loop is about to end)."""
        now = time.time()
        busy = self.engine.has_work
        interval = self.settings.metrics_interval_s if busy or self.pending_steps else IDLE_POLL_S * 2
        if now - self.last_metrics < interval and not force:
            return
        requests = self.engine.pop_request_metrics()
        used = self.engine.kv_blocks_used
        self.queue.send_response(m.Metrics(sent_at=now, busy=busy, steps=self.pending_steps, requests=requests,
                                           kv_blocks_used=used, step=self.heartbeat.step_index))
        self.pending_steps = []
        self.last_metrics = now


def _failure(request_id: str, exc: BaseException) -> m.RequestFailed:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return m.RequestFailed(request_id, type(exc).__name__, str(exc), tb)


def _install_signal_handlers() -> None:
    """SIGTERM exits cleanly; Ctrl-C in a notebook interrupts the request in the parent, not the worker.

    Parent death is found by polling getppid() rather than PR_SET_PDEATHSIG, which fires when the *thread*
    that started us exits, not the process.
    """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _log_to_file(settings: Settings, ipc_dir: str) -> None:
    """Worker output goes to a file, not into whichever notebook cell is running (ipykernel captures fds 1, 2)."""
    log_dir = Path(settings.log_dir or ipc_dir)
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
