"""The replica side of a worker pool: a Ray actor whose process is one model worker.

The actor loads the engine through the worker's own `_load`, then runs the worker's own `WorkerLoop` on a thread,
fed by in-process queues instead of ZMQ sockets. Its async methods only move messages: `submit` and `cancel`
put them in the loop's inbox, `poll` hands back whatever the loop produced (or waits a little for it). The parent
stops a replica with `ray.kill`: the engine holds nothing that must outlive its process. Messages
cross Ray as msgpack bytes of the structs in `toolkit.worker.messages`, so the parent routes them exactly as the
single worker's I/O thread does.

Ray runs an async actor's calls out of order, so a Cancel may overtake its request: the loop remembers ids it
was told to cancel before it knew them and answers the late request with a "cancelled" delta at once.

This module imports neither ray nor torch: the parent wraps the class with `ray.remote`, the engine is
imported inside `start()`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import queue
import shutil
import socket
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any

import msgspec

from toolkit.settings import Settings
from toolkit.worker import messages as m
from toolkit.worker.process import WorkerLoop

log = logging.getLogger("toolkit.pool.replica")

TOMBSTONES = 4096  # ids cancelled before they were seen; a Cancel overtakes its request by moments, not thousands
LOG_LINES = 2000  # the replica's recent log lines, readable from the parent (the replica may run on another host)

_to_worker = msgspec.msgpack.Decoder(m.ToWorker)
_encoder = msgspec.msgpack.Encoder()


class _Channel:
    """What WorkerLoop uses of an EngineQueue (poll, drain, send_response), over two in-process queues."""

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.held: list[Any] = []
        self.outbox: collections.deque[Any] = collections.deque()
        self.on_output: Any = None  # set by the actor: wakes a waiting poll() on the actor's event loop

    def poll(self, timeout: float, extra_fds: tuple[int, ...] = ()) -> bool:
        if not self.held:
            try:
                self.held.append(self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait())
            except queue.Empty:
                return False
        return True

    def drain(self) -> list[Any]:
        items, self.held = self.held, []
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                return items

    def send_response(self, message: Any) -> None:
        self.outbox.append(message)
        if self.on_output is not None:
            self.on_output()

    def take(self) -> list[Any]:
        out = []
        while self.outbox:
            out.append(self.outbox.popleft())
        return out


class _ReplicaLoop(WorkerLoop):
    """WorkerLoop plus tombstones for cancels that arrive before their request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tombstones: collections.OrderedDict[str, None] = collections.OrderedDict()

    def handle(self, message: Any) -> None:
        if isinstance(message, (m.GenerateRequest, m.EmbedRequest)) and message.request_id in self.tombstones:
            del self.tombstones[message.request_id]
            self.queue.send_response(m.StepOutput(deltas=[m.TokenDelta(message.request_id, [], "cancelled")]))
        elif isinstance(message, m.Cancel):
            deltas = self.engine.cancel(message.request_ids)
            answered = {d.request_id for d in deltas}
            for rid in message.request_ids:
                if rid not in answered:  # not seen yet, or already finished: either way harmless to remember
                    self.tombstones[rid] = None
            while len(self.tombstones) > TOMBSTONES:
                self.tombstones.popitem(last=False)
            if deltas:
                self.queue.send_response(m.StepOutput(deltas=deltas))
        else:
            super().handle(message)


class _RingHandler(logging.Handler):
    def __init__(self, lines: collections.deque[str]) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class ReplicaActor:
    """One model worker inside a Ray actor. Wrapped with `ray.remote` by the pool; never built directly."""

    def __init__(self, settings: Settings, index: int) -> None:
        self.settings = settings
        self.index = index
        self.channel = _Channel()
        self.loop: _ReplicaLoop | None = None
        self.thread: threading.Thread | None = None
        self.wakeup: asyncio.Event | None = None
        self.log_lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        handler = _RingHandler(self.log_lines)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [pid %(process)d] %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(settings.log_level)

    async def start(self) -> tuple[str, Any]:
        """Load the model and start the step loop: ("ready", details) or ("failed", StartupFailed bytes)."""
        evloop = asyncio.get_running_loop()
        self.wakeup = asyncio.Event()
        wakeup = self.wakeup
        self.channel.on_output = lambda: evloop.call_soon_threadsafe(wakeup.set)
        try:
            engine, ready, tokenizer_files = await asyncio.to_thread(self._load)
        except BaseException as exc:  # any load failure goes back to the parent with its traceback
            log.exception("replica %d: model load failed", self.index)
            return "failed", _encoder.encode(m.StartupFailed(type(exc).__name__, str(exc), traceback.format_exc()))
        log.info("replica %d ready: %s", self.index, ready)
        self.loop = _ReplicaLoop(engine, self.channel, self.settings, os.getppid())
        self.thread = threading.Thread(target=self._run, name=f"toolkit-replica-{self.index}", daemon=True)
        self.thread.start()
        details = {"ready": _encoder.encode(ready), "tokenizer_files": tokenizer_files, "node": socket.gethostname()}
        return "ready", details

    def _load(self) -> tuple[Any, m.Ready, dict[str, bytes]]:
        from toolkit.worker.process import _load

        scratch = tempfile.mkdtemp(prefix="tk-replica-")  # the tokenizer is saved here, then shipped to the parent
        try:
            engine, ready = _load(self.settings, scratch)  # it also sets torch's threads: this process is ours
            files: dict[str, bytes] = {}
            if ready.tokenizer_dir:
                root = Path(ready.tokenizer_dir)
                files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return engine, ready, files

    def _run(self) -> None:
        assert self.loop is not None
        try:
            self.loop.run()
        except BaseException:
            log.exception("replica %d: step loop crashed", self.index)
            raise
        finally:
            if self.loop.orphaned:  # the raylet that started us is gone: nobody will collect this process
                os._exit(1)

    async def submit(self, payload: bytes) -> None:
        self.channel.inbox.put(_to_worker.decode(payload))

    async def cancel(self, request_ids: list[str]) -> None:
        self.channel.inbox.put(m.Cancel(list(request_ids)))

    async def poll(self, wait_s: float) -> bytes:
        """Everything the loop produced since the last poll, waiting up to `wait_s` for something."""
        assert self.wakeup is not None, "start() first"
        if not self.channel.outbox:
            self.wakeup.clear()
            if not self.channel.outbox:
                try:
                    await asyncio.wait_for(self.wakeup.wait(), wait_s)
                except asyncio.TimeoutError:
                    pass
        if self.thread is not None and not self.thread.is_alive() and not self.channel.outbox:
            raise RuntimeError(f"replica {self.index}: the step loop has stopped")  # the parent fails its requests
        return _encoder.encode(self.channel.take())

    async def logs(self, tail: int | None = None) -> str:
        lines = list(self.log_lines)
        return "\n".join(lines[-tail:] if tail else lines)
