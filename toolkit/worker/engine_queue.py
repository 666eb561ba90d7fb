"""EngineQueue: the ZMQ sockets between the parent and the worker, one class for both ends.

Three one-way PUSH/PULL channels on ipc:// paths inside a private (0700) directory: requests and control
(parent -> worker) and responses (worker -> parent). A request's Cancel rides the requests channel, so it can never
overtake its request; control carries Shutdown, read first. The parent binds, the worker connects. Every frame is
one msgpack-encoded msgspec Struct from `toolkit.messages`; a frame that does not decode is logged and dropped.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import zmq

from toolkit.worker.messages import FromWorker, ToWorker

log = logging.getLogger(__name__)

CHANNELS = ("requests", "control", "responses")
SEND_TIMEOUT_MS = 1000  # a bound PUSH socket with no peer blocks on send: the worker has gone (or is going)


def endpoint(ipc_dir: str | os.PathLike[str], channel: str) -> str:
    """The ipc:// address of one channel; paths stay short (Unix sockets allow ~100 bytes)."""
    return f"ipc://{Path(ipc_dir) / channel}"


class EngineQueue:
    """One end of the boundary. `EngineQueue.parent(dir)` binds; `EngineQueue.worker(dir)` connects."""

    def __init__(self, ipc_dir: str, *, is_parent: bool) -> None:
        self.ipc_dir = ipc_dir
        self.is_parent = is_parent
        self._ctx = zmq.Context()
        self._send_lock = threading.RLock()  # zmq sockets are not thread-safe; RLock: a GC'd stream may cancel mid-send
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ToWorker if not is_parent else FromWorker)
        out_type, in_type = (zmq.PUSH, zmq.PULL)
        if is_parent:
            self.requests = self._socket(out_type, "requests", bind=True)
            self.control = self._socket(out_type, "control", bind=True)
            self.responses = self._socket(in_type, "responses", bind=True)
        else:
            self.requests = self._socket(in_type, "requests", bind=False)
            self.control = self._socket(in_type, "control", bind=False)
            self.responses = self._socket(out_type, "responses", bind=False)
        self._poller = zmq.Poller()
        for sock in self._inbound():
            self._poller.register(sock, zmq.POLLIN)

    @classmethod
    def parent(cls, ipc_dir: str) -> EngineQueue:
        return cls(ipc_dir, is_parent=True)

    @classmethod
    def worker(cls, ipc_dir: str) -> EngineQueue:
        return cls(ipc_dir, is_parent=False)

    def _socket(self, kind: int, channel: str, *, bind: bool) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0 if self.is_parent else 2000)
        sock.setsockopt(zmq.SNDHWM, 0)  # admission is bounded by max_queue_size, not by dropping frames
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        if bind:
            sock.bind(endpoint(self.ipc_dir, channel))
        else:
            sock.connect(endpoint(self.ipc_dir, channel))
        return sock

    def _inbound(self) -> tuple[zmq.Socket, ...]:
        return (self.responses,) if self.is_parent else (self.control, self.requests)

    # ---- sending ------------------------------------------------------------------------------

    def send(self, sock: zmq.Socket, message: msgspec.Struct) -> bool:
        """Queue one message; False if nobody has been listening for SEND_TIMEOUT_MS (the peer is gone)."""
        data = self._encoder.encode(message)
        with self._send_lock:
            try:
                sock.send(data, copy=False)
            except zmq.Again:
                log.info("dropped a %s: the other side is not connected", type(message).__name__)
                return False
        return True

    def send_request(self, message: msgspec.Struct) -> bool:
        return self.send(self.requests, message)

    def send_control(self, message: msgspec.Struct) -> bool:
        return self.send(self.control, message)

    def send_response(self, message: msgspec.Struct) -> bool:
        return self.send(self.responses, message)

    # ---- receiving ----------------------------------------------------------------------------

    def poll(self, timeout_s: float | None, extra_fds: tuple[int, ...] = ()) -> set[int]:
        """Block until a message (or one of extra_fds) is readable; returns the ready extra fds."""
        for fd in extra_fds:
            self._poller.register(fd, zmq.POLLIN)
        try:
            events = self._poller.poll(None if timeout_s is None else int(timeout_s * 1000))
        finally:
            for fd in extra_fds:
                self._poller.unregister(fd)
        return {fd for fd, _ in events if isinstance(fd, int)}

    def drain(self) -> Iterator[msgspec.Struct]:
        """Every message waiting now, control first, without blocking; undecodable frames are dropped."""
        for sock in self._inbound():
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    yield self._decoder.decode(frame.buffer)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    log.warning("dropped a corrupt or foreign message (%d bytes): %s", len(frame.buffer), exc)

    def close(self, linger_ms: int | None = None) -> None:
        """Close the sockets; `linger_ms` overrides how long unsent frames may still go out (0: drop them)."""
        for sock in (self.requests, self.control, self.responses):
            sock.close(linger=linger_ms)
        self._ctx.term()
        if self.is_parent:
            for channel in CHANNELS:
                Path(self.ipc_dir, channel).unlink(missing_ok=True)
