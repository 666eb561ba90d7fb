"""The parent's handle on a model worker: spawn, handshake, monitor, restart, shutdown.

`ModelWorker` is what users hold. The live process, its sockets and the I/O thread sit in a `_Connection`
that does not point back at the handle, so dropping the handle (re-running a notebook cell) lets a finalizer
shut the process down; the same finalizer runs at interpreter exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import multiprocessing as mp
import queue
import shutil
import signal
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from toolkit.errors import (
    InvalidRequestError,
    PrefixCacheBusyError,
    QueueFullError,
    RemoteError,
    WorkerCrashedError,
    WorkerHungError,
    WorkerNotRunningError,
    WorkerStartupError,
)
from toolkit.settings import Settings
from toolkit.telemetry.metrics import MetricsLog
from toolkit.worker import messages as m
from toolkit.worker import process as worker_process
from toolkit.worker.engine_queue import EngineQueue
from toolkit.worker.main_guard import check_main_guard

log = logging.getLogger(__name__)

POLL_S = 0.1  # I/O thread wake-up: bounds how late a death or hang is noticed
FINAL_METRICS_WAIT_S = 0.05  # after the worker exited: how long to wait for more of its last frames
EXIT_DRAIN_S = 1.0  # after the worker exited during start-up: how long its last message may still be in flight


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class Sink:
    """Where one request's responses land: a thread-safe queue, or an asyncio queue on the caller's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop
        self.items: Any = asyncio.Queue() if loop else queue.SimpleQueue()
        self.first_at: float | None = None  # time.time() when the request's first response reached this process
        self.finished_at: float | None = None  # ... and its last (final delta, result or error)

    def deliver(self, item: object, *, final: bool) -> None:
        """The I/O thread's entry: note when responses arrived (the caller may read them much later), then put."""
        now = time.time()
        if self.first_at is None:
            self.first_at = now
        if final and self.finished_at is None:
            self.finished_at = now
        self.put(item)

    def put(self, item: object) -> None:
        if self.loop is None:
            self.items.put(item)
        else:
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is listening any more
                self.loop.call_soon_threadsafe(self.items.put_nowait, item)


@dataclass(slots=True)
class _Pending:
    request: m.GenerateRequest | m.EmbedRequest
    sink: Sink


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit code unknown"
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


class ResponseRouter:
    """What a worker's responses do in the parent, for one worker process or one pool replica: route each to its
    request's sink, keep the metrics and heartbeats, and call the worker hung when it goes silent or stuck.

    Subclasses say where the responses come from (`_where`), whether it serves now (`_check_serving`), how a control
    message reaches it (`_send_control`), how to drop hung work (`_cancel_hung`), and what to do after a hang
    (`_after_hang`).
    """

    def __init__(self, settings: Settings, metrics: MetricsLog) -> None:
        self.settings = settings
        self.metrics = metrics
        self.pending: dict[str, _Pending] = {}
        self.lock = threading.RLock()  # re-entrant: a dropped stream's __del__ may cancel from inside a locked section
        self.last_heard = time.monotonic()
        self.last_metrics: m.Metrics | None = None  # the latest heartbeat: busy, KV blocks in use now
        self.step_clock: tuple[int, float] | None = None  # (step, monotonic start) of a step heard running now
        self.hung = False
        self.replies: dict[str, queue.SimpleQueue[m.PrefixCacheReset]] = {}  # control calls awaiting the worker

    def _where(self) -> str:
        raise NotImplementedError

    def _cancel_hung(self, request_ids: list[str]) -> None:
        raise NotImplementedError

    def _after_hang(self) -> None:
        raise NotImplementedError

    def _check_serving(self) -> None:
        """Raise the typed error that a request sent now would get (dead, hung, not started, shutting down)."""
        raise NotImplementedError

    def _send_control(self, message: m.ResetPrefixCache) -> None:
        """Send a control message behind every request sent before it (called under self.lock)."""
        raise NotImplementedError

    def reset_prefix_cache(self, timeout_s: float) -> int:
        """Ask the worker to drop its cached prompt blocks and wait for the answer; returns how many it dropped."""
        reply_id = f"reset-{uuid.uuid4().hex[:12]}"
        waiter: queue.SimpleQueue[m.PrefixCacheReset] = queue.SimpleQueue()
        with self.lock:
            self._check_serving()
            self.replies[reply_id] = waiter
            self._send_control(m.ResetPrefixCache(reply_id))
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    reply = waiter.get(timeout=POLL_S)
                    break
                except queue.Empty:
                    self._check_serving()  # died, hung or shut down while we waited
                    if time.monotonic() > deadline:
                        raise WorkerHungError(f"no answer to reset_prefix_cache within {timeout_s} s") from None
        finally:
            with self.lock:
                self.replies.pop(reply_id, None)
        errors = {"PrefixCacheBusyError": PrefixCacheBusyError, "InvalidRequestError": InvalidRequestError}
        if reply.error_type in errors:
            raise errors[reply.error_type](reply.message)
        if reply.error_type:
            raise RemoteError(f"{reply.error_type}: {reply.message}", error_type=reply.error_type)
        return reply.blocks_cleared

    def receive(self, message: object) -> None:
        """One message from the worker: proof of life, then routed; a bad one is logged, never raised."""
        self.last_heard = time.monotonic()
        if not _beat_inside_a_step(message):
            self.hung = False  # its loop moves again: a slow step, not a dead loop
            self.step_clock = None  # the loop sent it, so no step is running (beats are never late)
        try:
            self._dispatch(message)
        except Exception:  # one bad message must not take down the thread every request depends on
            log.exception("could not route %s from %s", type(message).__name__, self._where())

    def _dispatch(self, message: object) -> None:
        if isinstance(message, m.StepOutput):
            for delta in message.deltas:
                self._route(delta.request_id, delta, final=delta.finish_reason is not None)
            for failure in message.failures:
                self._route(failure.request_id, failure, final=True)
        elif isinstance(message, m.EmbedResult):
            self._route(message.request_id, message, final=True)
        elif isinstance(message, m.Metrics):  # step rows carry wall-clock t: they sort across workers as they are
            self.last_metrics = message
            self.metrics.add(message)
            if message.step_running_s > 0 and (self.step_clock is None or self.step_clock[0] != message.step):
                self.step_clock = (message.step, time.monotonic() - message.step_running_s)
        elif isinstance(message, m.PrefixCacheReset):
            with self.lock:
                waiter = self.replies.get(message.id)
            if waiter is not None:
                waiter.put(message)
        else:
            log.warning("unexpected message from %s: %r", self._where(), type(message).__name__)

    def _route(self, request_id: str, item: object, *, final: bool) -> None:
        with self.lock:
            pending = self.pending.pop(request_id, None) if final else self.pending.get(request_id)
        if pending is not None:
            pending.sink.deliver(item, final=final)

    def fail_pending(self, error: Exception) -> list[str]:
        """Hand `error` to every outstanding request; returns their ids."""
        with self.lock:
            pending, self.pending = self.pending, {}
        for p in pending.values():
            p.sink.deliver(error, final=True)
        return list(pending)

    def _check_hang(self) -> None:
        """Hung: silent (no heartbeat either) past hang_timeout_s, or one step running past step_timeout_s."""
        if not self.pending or self.hung:
            return
        now, where = time.monotonic(), self._where()
        silent = now - self.last_heard
        stuck = now - self.step_clock[1] if self.step_clock else 0.0
        if silent >= self.settings.hang_timeout_s:
            why = f"{where} sent nothing for {silent:.1f} s (hang_timeout_s={self.settings.hang_timeout_s})"
        elif stuck >= self.settings.step_timeout_s:
            why = (f"{where} has been in one step for {stuck:.1f} s (step_timeout_s={self.settings.step_timeout_s}); "
                   "it still sends heartbeats")
        else:
            return
        log.error("%s, with %d requests in flight", why, len(self.pending))
        with self.lock:
            self.hung = True  # under the lock: no request slips in between the failing and the refusing
        failed = self.fail_pending(WorkerHungError(why))
        self._cancel_hung(failed)  # if it ever wakes, it drops work nobody waits for
        if self.settings.restart_on_hang:
            self._after_hang()


class _Connection(ResponseRouter):
    """One worker process, its EngineQueue and the I/O thread that routes responses and watches for death."""

    def __init__(self, settings: Settings, log_dir: str, metrics: MetricsLog, on_hang: Callable[[], None]) -> None:
        super().__init__(settings.replace(log_dir=log_dir), metrics)
        self.ipc_dir = tempfile.mkdtemp(prefix="tk-")  # mode 0700: only this user reaches the sockets
        self.on_hang = on_hang
        self.queue = EngineQueue.parent(self.ipc_dir)
        ctx = mp.get_context("spawn")
        self.process = ctx.Process(
            target=worker_process.run, args=(self.settings, self.ipc_dir), name="toolkit-worker", daemon=True
        )
        self.state = WorkerState.STARTING
        self.ready: m.Ready | None = None
        self.closing = False
        self.thread = threading.Thread(target=self._io_loop, name="toolkit-worker-io", daemon=True)

    # ---- start-up -----------------------------------------------------------------------------

    def start(self) -> None:
        self.process.start()
        try:
            self.ready = self._handshake()
        except BaseException:
            self.close()
            raise
        self.state = WorkerState.READY
        self.last_heard = time.monotonic()
        self.thread.start()

    def _handshake(self) -> m.Ready:
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            died = self.queue.poll(min(remaining, 1.0), extra_fds=(self.process.sentinel,))
            if died:  # a StartupFailed sent just before the exit may still be on its way: it has the traceback
                self.process.join(1)
                self.queue.poll(EXIT_DRAIN_S)
            for message in self.queue.drain():
                if isinstance(message, m.Ready):
                    return message
                if isinstance(message, m.StartupFailed):
                    raise WorkerStartupError(
                        f"model worker failed to start: {message.error_type}: {message.message}",
                        message.traceback,
                        message.error_type,
                    )
            if died:
                raise WorkerStartupError(
                    f"model worker exited before it was ready ({describe_exit(self.process.exitcode)})",
                    _tail(Path(self.settings.log_dir or "", "worker.log")),
                )
        raise WorkerStartupError(
            f"model worker not ready after startup_timeout_s={self.settings.startup_timeout_s}",
            _tail(Path(self.settings.log_dir or "", "worker.log")),
        )

    # ---- requests -----------------------------------------------------------------------------

    def submit(self, request: m.GenerateRequest | m.EmbedRequest, sink: Sink) -> None:
        with self.lock:  # held with close() and fail_pending(): a request is either refused or sure to get an answer
            self._check_serving()
            if len(self.pending) >= self.settings.max_queue_size:
                raise QueueFullError(f"{len(self.pending)} requests outstanding (max_queue_size)")
            self.pending[request.request_id] = _Pending(request, sink)
            self.queue.send_request(request)

    def cancel(self, request_ids: list[str]) -> None:
        """On the requests channel, behind the request itself, so a cancel never reaches the worker first."""
        with self.lock:
            if self.state is WorkerState.READY and not self.closing:
                self.queue.send_request(m.Cancel(request_ids))

    def _send_control(self, message: m.ResetPrefixCache) -> None:
        self.queue.send_request(message)  # on the requests channel: behind every request sent before it

    def _check_serving(self) -> None:
        if self.state is WorkerState.FAILED:
            raise WorkerCrashedError(
                f"model worker {self.process.pid} is dead ({describe_exit(self.process.exitcode)}); call restart()",
                self.process.exitcode,
            )
        if self.closing or self.state is not WorkerState.READY:
            state = "shutting down" if self.closing else self.state.value
            raise WorkerNotRunningError(f"model worker is {state}")
        if self.hung:
            raise WorkerHungError(
                f"model worker {self.process.pid} is not responding (hang_timeout_s / step_timeout_s); call restart()"
            )

    # ---- the I/O thread -----------------------------------------------------------------------

    def _io_loop(self) -> None:
        sentinel = self.process.sentinel
        while not self.closing:
            died = self.queue.poll(POLL_S, extra_fds=(sentinel,))
            for message in self.queue.drain():
                self.receive(message)
            if died:
                self._on_death()
                return
            self._check_hang()

    def _on_death(self) -> None:
        if self.closing:
            return
        self.process.join(1)
        self.state = WorkerState.FAILED
        code = self.process.exitcode
        n = len(self.pending)
        log.error("model worker %s died (%s) with %d requests in flight", self.process.pid, describe_exit(code), n)
        self.fail_pending(
            WorkerCrashedError(f"model worker {self.process.pid} died ({describe_exit(code)}) mid-request", code)
        )

    def _where(self) -> str:
        return f"model worker {self.process.pid}"

    def _cancel_hung(self, request_ids: list[str]) -> None:
        self.queue.send_request(m.Cancel(request_ids))

    def _after_hang(self) -> None:
        self.on_hang()

    # ---- shutdown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Shutdown message -> join -> SIGTERM -> SIGKILL; then fail what is left and remove the sockets."""
        with self.lock:
            if self.closing:
                return
            self.closing = True  # from here on submit() refuses, so the fail_pending below is the last word
        grace = self.settings.shutdown_timeout_s
        if self.process.pid is not None:
            if self.process.is_alive():
                self.queue.send_control(m.Shutdown())
                self.process.join(grace)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(grace)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(grace)  # it sees `closing` within POLL_S, unless starved of CPU
        if not self.thread.is_alive() or self.thread is threading.current_thread():  # sockets are not thread-safe
            self._keep_final_metrics()
        self.fail_pending(WorkerNotRunningError("the model worker was shut down while this request was in flight"))
        with self.lock:
            if self.state is not WorkerState.FAILED:
                self.state = WorkerState.STOPPED
            self.queue.close()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    def _keep_final_metrics(self) -> None:
        """Log the Metrics the worker flushed on Shutdown: the I/O thread stopped reading when closing began."""
        for _ in range(20):  # bounded: a worker that was killed sends nothing more
            self.queue.poll(FINAL_METRICS_WAIT_S)  # at once when frames wait; else they may still be in flight
            received = False
            for message in self.queue.drain():
                received = True
                if isinstance(message, m.Metrics):
                    self.metrics.add(message)
            if not received:
                return


def _beat_inside_a_step(message: object) -> bool:
    """A heartbeat from the worker's heartbeat thread, sent while one step runs: proof of life, not of progress."""
    return isinstance(message, m.Metrics) and message.step_running_s > 0


def host_health(ready: m.Ready | None) -> dict[str, Any]:
    """What the worker found on its host and chose from it (None before the first Ready)."""
    return {
        "cpu_capability": ready.cpu_capability if ready else None,
        "native_bf16": ready.native_bf16 if ready else None,
        "num_threads": ready.num_threads if ready else None,
        "max_batch_tokens": ready.max_batch_tokens if ready else None,
        "auto_knobs": dict(ready.auto_knobs) if ready else {},
    }


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


_H = TypeVar("_H", bound="ShutsDownOnExit")


class ShutsDownOnExit:
    """`with` and `async with` for a worker handle (a worker, a pool, an in-process engine): leaving shuts it down."""

    def shutdown(self) -> None:
        raise NotImplementedError

    def __enter__(self: _H) -> _H:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    async def __aenter__(self: _H) -> _H:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.shutdown)


class ModelWorker(ShutsDownOnExit):
    """A model running in a spawned process. Use `start_model_worker(settings)` to get a started one."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.metrics = MetricsLog(self.settings.metrics_capacity)
        self.restarts = 0
        self.log_dir = self.settings.log_dir or tempfile.mkdtemp(prefix="toolkit-logs-")
        if self.settings.log_dir is None:  # ours: gone with the handle, even if the worker never started
            weakref.finalize(self, shutil.rmtree, self.log_dir, True)
        self._conn: _Connection | None = None
        self._finalizer: weakref.finalize | None = None
        self._restart_lock = threading.Lock()

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> ModelWorker:
        """Spawn the process and wait for Ready; raises WorkerStartupError with the child's traceback."""
        if self._conn is not None and self._conn.state is WorkerState.READY:
            return self
        check_main_guard()
        weak_self = weakref.ref(self)
        conn = _Connection(self.settings, self.log_dir, self.metrics, lambda: _restart_later(weak_self))
        conn.start()
        self._conn = conn
        self._finalizer = weakref.finalize(self, conn.close)
        return self

    def shutdown(self) -> None:
        """Stop the worker: message, join, SIGTERM, SIGKILL. Safe to call twice."""
        if self._conn is not None:
            self._conn.close()

    def restart(self) -> ModelWorker:
        """Stop whatever is running (dead, hung or fine) and start a fresh worker with the same settings."""
        with self._restart_lock:
            self.shutdown()
            if self._finalizer is not None:
                self._finalizer.detach()  # the old connection is closed; let it be collected
            self.start()  # until it returns, the old (closed) connection answers callers with a clear error
            self.restarts += 1
        return self

    # ---- looking at it ------------------------------------------------------------------------

    @property
    def state(self) -> WorkerState:
        return self._conn.state if self._conn else WorkerState.STOPPED

    @property
    def pid(self) -> int | None:
        return self._conn.process.pid if self._conn else None

    @property
    def ipc_dir(self) -> str | None:
        """The private (0700) directory of this worker's ipc sockets."""
        return self._conn.ipc_dir if self._conn else None

    @property
    def info(self) -> m.Ready:
        """What the worker said when it became ready: model, device, dtype, KV blocks, max model length."""
        if self._conn is None or self._conn.ready is None:
            raise WorkerNotRunningError("model worker is not started")
        return self._conn.ready

    def is_alive(self) -> bool:
        return self._conn is not None and self._conn.state is WorkerState.READY and self._conn.process.is_alive()

    def health(self) -> dict[str, Any]:
        conn = self._conn
        beat = conn.last_metrics if conn else None
        return {
            "state": self.state.value,
            "alive": self.is_alive(),
            "pid": self.pid,
            "heartbeat_age_s": time.monotonic() - conn.last_heard if conn else None,
            "in_flight": len(conn.pending) if conn else 0,
            "hung": bool(conn and conn.hung),
            "busy": beat.busy if beat else None,
            "kv_blocks_used": beat.kv_blocks_used if beat else None,  # as of the last heartbeat
            "restarts": self.restarts,
            "warnings": list(conn.ready.warnings) if conn and conn.ready else [],  # e.g. a dtype slow on this CPU
            **host_health(conn.ready if conn else None),
        }

    def logs(self, tail: int | None = None) -> str:
        """The worker's log file (all starts of this handle), or its last `tail` lines."""
        path = Path(self.log_dir, "worker.log")
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-tail:]) if tail else text

    def __repr__(self) -> str:
        return f"ModelWorker(model={self.settings.model!r}, state={self.state.value}, pid={self.pid})"

    # ---- used by the pipelines ----------------------------------------------------------------

    def submit(self, request: m.GenerateRequest | m.EmbedRequest, sink: Sink) -> None:
        if self._conn is None:
            raise WorkerNotRunningError("model worker is not started")
        self._conn.submit(request, sink)

    def cancel(self, request_ids: list[str]) -> None:
        if self._conn is not None:
            self._conn.cancel(request_ids)

    # ---- control ------------------------------------------------------------------------------

    def reset_prefix_cache(self, timeout_s: float = 30.0) -> int:
        """Forget every cached prompt block in the worker (e.g. for a cold benchmark); returns how many it dropped.

        Raises PrefixCacheBusyError while requests are waiting or running (as vLLM refuses), InvalidRequestError
        on an embedding worker, and WorkerNotRunningError / WorkerCrashedError / WorkerHungError as requests do.
        """
        if self._conn is None:
            raise WorkerNotRunningError("model worker is not started")
        return self._conn.reset_prefix_cache(timeout_s)


def _restart_later(weak_worker: weakref.ref[ModelWorker]) -> None:
    """restart_on_hang: restart from a fresh thread, never from the I/O thread that is about to be replaced."""

    def restart() -> None:
        worker = weak_worker()
        if worker is not None:
            worker.restart()

    threading.Thread(target=restart, name="toolkit-worker-restart", daemon=True).start()


def start_model_worker(settings: Settings | None = None, **overrides: Any) -> ModelWorker:
    """Spawn a model worker and return once it is Ready. Works as a context manager (sync or async)."""
    settings = settings or Settings()
    if overrides:
        settings = settings.replace(**overrides)
    return ModelWorker(settings).start()


__all__ = ["ModelWorker", "Sink", "WorkerState", "start_model_worker"]
