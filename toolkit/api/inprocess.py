"""`--engine inprocess`: the Engine stepped on a thread of the server's own process, behind the worker handle's
interface. This is the design the seed warns against (the model's Python and the server's event loop share one
GIL), kept only so the responsiveness benchmark can compare it with the spawned worker.

It reuses the worker's own loop (`WorkerLoop`) over an in-memory queue, so both engines behave alike.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
import threading
import time
from typing import Any

from toolkit.errors import QueueFullError, WorkerNotRunningError
from toolkit.settings import Settings
from toolkit.telemetry.metrics import MetricsLog
from toolkit.worker import messages as m
from toolkit.worker.client import Sink, WorkerState


class _LocalQueue:
    """The three calls WorkerLoop makes on an EngineQueue, in memory; responses go straight to `deliver`."""

    def __init__(self, deliver: Any) -> None:
        self.deliver = deliver
        self.inbox: collections.deque[Any] = collections.deque()
        self.wakeup = threading.Event()

    def put(self, message: Any) -> None:
        self.inbox.append(message)
        self.wakeup.set()

    def poll(self, timeout_s: float | None, extra_fds: tuple[int, ...] = ()) -> set[int]:
        if not self.inbox:
            self.wakeup.wait(timeout_s)
        self.wakeup.clear()
        return set()

    def drain(self) -> Any:
        while self.inbox:
            yield self.inbox.popleft()

    def send_response(self, message: Any) -> bool:
        self.deliver(message)
        return True


class InProcessWorker:
    """An Engine on a thread of this process with ModelWorker's interface: submit, cancel, info, health, metrics."""

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
        self._thread: threading.Thread | None = None
        self._tokenizer_dir = tempfile.mkdtemp(prefix="toolkit-inprocess-")

    def start(self) -> InProcessWorker:
        from toolkit.engine.core import Engine
        from toolkit.worker.process import WorkerLoop

        self.state = WorkerState.STARTING
        started = time.perf_counter()
        engine = Engine(self.settings)
        engine.tokenizer.save_pretrained(self._tokenizer_dir)
        self._info = m.Ready(pid=self.pid, load_time_s=time.perf_counter() - started,
                             tokenizer_dir=self._tokenizer_dir, **engine.ready_info())
        self._loop = WorkerLoop(engine, self._queue, self.settings, os.getppid())  # type: ignore[arg-type]
        self._thread = threading.Thread(target=self._run, name="toolkit-inprocess-engine", daemon=True)
        self.state = WorkerState.READY
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._loop.run()
        finally:
            if self.state is WorkerState.READY:
                self.state = WorkerState.FAILED
            self._fail_pending(WorkerNotRunningError("the in-process engine stopped"))

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
            sink.put(item)

    def _fail_pending(self, error: Exception) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for sink in pending.values():
            sink.put(error)

    # ---- the handle interface -----------------------------------------------------------------

    @property
    def info(self) -> m.Ready:
        if self._info is None:
            raise WorkerNotRunningError("the in-process engine is not started")
        return self._info

    def is_alive(self) -> bool:
        return self.state is WorkerState.READY and self._thread is not None and self._thread.is_alive()

    def submit(self, request: m.GenerateRequest, sink: Sink) -> None:
        with self._lock:
            if not self.is_alive():
                raise WorkerNotRunningError(f"the in-process engine is {self.state.value}")
            if len(self._pending) >= self.settings.max_queue_size:
                raise QueueFullError(f"{len(self._pending)} requests outstanding (max_queue_size)")
            self._pending[request.request_id] = sink
        self._queue.put(request)

    def cancel(self, request_ids: list[str]) -> None:
        if self.is_alive():
            self._queue.put(m.Cancel(list(request_ids)))

    def health(self) -> dict[str, Any]:
        beat = getattr(self, "_last_metrics", None)
        return {"state": self.state.value, "alive": self.is_alive(), "pid": self.pid, "heartbeat_age_s": 0.0,
                "in_flight": len(self._pending), "hung": False, "busy": beat.busy if beat else None,
                "kv_blocks_used": beat.kv_blocks_used if beat else None, "restarts": self.restarts}

    def shutdown(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.state = WorkerState.STOPPED
            self._queue.put(m.Shutdown())
            self._thread.join()
        self.state = WorkerState.STOPPED
        shutil.rmtree(self._tokenizer_dir, ignore_errors=True)

    def restart(self) -> InProcessWorker:
        self.shutdown()
        self._tokenizer_dir = tempfile.mkdtemp(prefix="toolkit-inprocess-")
        self.start()
        self.restarts += 1
        return self

    def __enter__(self) -> InProcessWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
