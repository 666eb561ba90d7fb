"""`--engine inprocess`: the Engine stepped ON the server's own asyncio event loop, behind the worker handle's
interface. This is the design the seed warns against, kept only so the responsiveness benchmark can compare it with
the spawned worker: every engine step runs synchronously on the loop that also answers /health, so a request that
arrives mid-step waits for the step to end (a thread would not show this: torch releases the GIL in its kernels).

The app enters `on_event_loop()` from its lifespan, on the loop uvicorn runs. That starts one asyncio task that
drains the in-memory inbox, runs one step, yields with `await asyncio.sleep(0)`, and awaits an asyncio.Event while
idle. It reuses the worker's own `WorkerLoop` (message handling, step, metrics), so both engines behave alike.
Without a server's loop there is nothing to step the engine: submit() refuses with WorkerNotRunningError.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from toolkit.errors import QueueFullError, WorkerNotRunningError
from toolkit.settings import Settings
from toolkit.telemetry.metrics import MetricsLog
from toolkit.worker import messages as m
from toolkit.worker.client import ShutsDownOnExit, Sink, WorkerState, host_health
from toolkit.worker.process import IDLE_POLL_S

log = logging.getLogger("toolkit.api")


class _LocalQueue:
    """What WorkerLoop (and its StepHeartbeat thread) call on an EngineQueue, in memory: the parent puts requests in
    the inbox, responses go straight to `deliver`."""

    def __init__(self, deliver: Any) -> None:
        self.deliver = deliver
        self.inbox: collections.deque[Any] = collections.deque()

    def drain(self) -> Iterator[Any]:
        while self.inbox:
            yield self.inbox.popleft()

    def send_response(self, message: Any) -> bool:
        self.deliver(message)
        return True


class InProcessWorker(ShutsDownOnExit):
    """An Engine stepped on the serving event loop, with ModelWorker's interface: submit, cancel, info, health,
    metrics, restart, shutdown."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.metrics = MetricsLog(self.settings.metrics_capacity)
        self.restarts = 0
        self.pid = os.getpid()
        self.state = WorkerState.STOPPED
        self._pending: dict[str, Sink] = {}
        self._lock = threading.Lock()
        self._info: m.Ready | None = None
        self._queue = _LocalQueue(self._dispatch)
        self._worker_loop: Any = None  # toolkit.worker.process.WorkerLoop over the engine, while started
        self._last_metrics: m.Metrics | None = None
        self._tokenizer_dir = ""
        # the serving loop, set while on_event_loop() is entered
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop_thread: int | None = None
        self._flushed = threading.Event()  # set by the step task once it has let go of a stopping WorkerLoop

    def start(self) -> InProcessWorker:
        """Load the model here; the engine steps once a server's loop has entered on_event_loop()."""
        from toolkit.engine.core import Engine
        from toolkit.worker.process import WorkerLoop

        self.state = WorkerState.STARTING
        started = time.perf_counter()
        engine = Engine(self.settings)
        self._tokenizer_dir = tempfile.mkdtemp(prefix="toolkit-inprocess-")
        engine.tokenizer.save_pretrained(self._tokenizer_dir)
        self._info = m.Ready(pid=self.pid, load_time_s=time.perf_counter() - started,
                             tokenizer_dir=self._tokenizer_dir, **engine.ready_info())
        self._queue.inbox.clear()
        self._worker_loop = WorkerLoop(engine, self._queue, self.settings, os.getppid())  # type: ignore[arg-type]
        self.state = WorkerState.READY
        self._wake()
        return self

    # ---- stepping on the event loop -----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def on_event_loop(self) -> AsyncIterator[None]:
        """Step the engine on the running loop until the block exits (the app's lifespan holds it)."""
        if self._task is not None and not self._task.done():
            raise RuntimeError("this in-process engine is already stepped by another server's event loop")
        self._aloop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._steps(), name="toolkit-inprocess-engine")
        try:
            yield
        finally:
            task, self._task, self._aloop = self._task, None, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _steps(self) -> None:
        assert self._wakeup is not None
        try:
            while True:
                loop = self._worker_loop
                if loop is not None:
                    for message in self._queue.drain():
                        loop.handle(message)
                    if loop.stopping:
                        self._let_go(loop)
                        continue
                    if loop.engine.has_work:
                        loop.step()  # synchronously, on the event loop: the point of this engine
                    loop.maybe_send_metrics()
                    if loop.engine.has_work:
                        await asyncio.sleep(0)  # let the loop run what is ready (I/O, routes) between steps
                        continue
                with contextlib.suppress(TimeoutError):  # idle: wake for a request, or to send a heartbeat
                    await asyncio.wait_for(self._wakeup.wait(), IDLE_POLL_S)
                self._wakeup.clear()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # WorkerLoop catches step errors; anything else is a bug: fail, don't hang
            log.exception("the in-process engine's step task failed")
            self.state = WorkerState.FAILED
            self._fail_pending(WorkerNotRunningError(f"the in-process engine failed: {exc}"))

    def _let_go(self, loop: Any) -> None:
        """On the step task: send the last rows, stop the heartbeat thread, drop the engine."""
        loop.maybe_send_metrics(force=True)
        loop.heartbeat.close()
        if self._worker_loop is loop:
            self._worker_loop = None
        self._flushed.set()

    def _wake(self) -> None:
        """Wake the idle step task; from the loop itself or from any other thread."""
        aloop, event = self._aloop, self._wakeup
        if aloop is None or event is None:
            return
        try:
            on_loop = asyncio.get_running_loop() is aloop
        except RuntimeError:
            on_loop = False
        if on_loop:
            event.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop just closed
                aloop.call_soon_threadsafe(event.set)

    # ---- responses ----------------------------------------------------------------------------

    def _dispatch(self, message: Any) -> None:
        if isinstance(message, m.StepOutput):
            for delta in message.deltas:
                self._route(delta.request_id, delta, delta.finish_reason is not None)
            for failure in message.failures:
                self._route(failure.request_id, failure, True)
        elif isinstance(message, m.Metrics):
            self.metrics.add(message)
            self._last_metrics = message

    def _route(self, request_id: str, item: object, final: bool) -> None:
        with self._lock:
            sink = self._pending.pop(request_id, None) if final else self._pending.get(request_id)
        if sink is not None:
            sink.deliver(item, final=final)

    def _fail_pending(self, error: Exception) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for sink in pending.values():
            sink.deliver(error, final=True)

    # ---- the handle interface -----------------------------------------------------------------

    @property
    def info(self) -> m.Ready:
        if self._info is None:
            raise WorkerNotRunningError("the in-process engine is not started")
        return self._info

    def is_alive(self) -> bool:
        """Started, and a server's event loop is stepping it."""
        return (self.state is WorkerState.READY and self._worker_loop is not None and self._task is not None
                and not self._task.done())

    def submit(self, request: m.GenerateRequest, sink: Sink) -> None:
        with self._lock:
            if not self.is_alive():
                why = self.state.value if self.state is not WorkerState.READY else "not on a server's event loop"
                raise WorkerNotRunningError(f"the in-process engine is {why}")
            if len(self._pending) >= self.settings.max_queue_size:
                raise QueueFullError(f"{len(self._pending)} requests outstanding (max_queue_size)")
            self._pending[request.request_id] = sink
            self._queue.inbox.append(request)
        self._wake()

    def cancel(self, request_ids: list[str]) -> None:
        if self._worker_loop is not None:
            self._queue.inbox.append(m.Cancel(list(request_ids)))
            self._wake()

    def health(self) -> dict[str, Any]:
        beat = self._last_metrics
        return {"state": self.state.value, "alive": self.is_alive(), "pid": self.pid, "heartbeat_age_s": 0.0,
                "in_flight": len(self._pending), "hung": False, "busy": beat.busy if beat else None,
                "kv_blocks_used": beat.kv_blocks_used if beat else None, "restarts": self.restarts,
                **host_health(self._info)}

    def shutdown(self) -> None:
        """Stop the engine (the step task sends its last metrics first when a loop is stepping it); fail what is in
        flight. Safe to call twice."""
        loop = self._worker_loop
        if loop is not None:
            self.state = WorkerState.STOPPED
            self._flushed.clear()
            self._queue.inbox.append(m.Shutdown())
            self._wake()
            aloop = self._aloop
            on_loop_thread = self._loop_thread == threading.get_ident()
            if aloop is None or on_loop_thread or not aloop.is_running() or not self._flushed.wait(
                    self.settings.shutdown_timeout_s):
                self._worker_loop = None  # no step task will get to it: let go here
                loop.heartbeat.close()
        self.state = WorkerState.STOPPED
        self._fail_pending(WorkerNotRunningError("the in-process engine was shut down"))
        if self._tokenizer_dir:
            shutil.rmtree(self._tokenizer_dir, ignore_errors=True)
            self._tokenizer_dir = ""

    def restart(self) -> InProcessWorker:
        """A fresh engine; a server's loop already stepping this handle steps the new one."""
        self.shutdown()
        self.start()
        self.restarts += 1
        return self

