"""EngineQueue: the ZMQ sockets between the parent and the worker, one class for both ends.

Three one-way PUSH/PULL channels on ipc:// paths inside a private (0700) directory: requests and control
(parent -> worker) and responses (worker -> parent). The parent binds, the worker connects. Every frame is one
msgpack-encoded msgspec Struct from `toolkit.messages`; a frame that does not decode is logged and dropped.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import zmq

from .messages import FromWorker, ToWorker

log = logging.getLogger(__name__)

CHANNELS = ("requests", "control", "responses")


def endpoint(ipc_dir: str | os.PathLike[str], channel: str) -> str:
    """The ipc:// address of one channel; paths stay short (Unix sockets allow ~100 bytes)."""
    return f"ipc://{Path(ipc_dir) / channel}"


class EngineQueue:
    """One end of the boundary. `EngineQueue.parent(dir)` binds; `EngineQueue.worker(dir)` connects."""

    def __init__(self, ipc_dir: str, *, is_parent: bool) -> None:
        self.ipc_dir = ipc_dir
        self.is_parent = is_parent
        self._ctx = zmq.Context()
        self._send_lock = threading.Lock()  # zmq sockets are not thread-safe; user threads send concurrently
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
        if bind:
            sock.bind(endpoint(self.ipc_dir, channel))
        else:
            sock.connect(endpoint(self.ipc_dir, channel))
        return sock

    def _inbound(self) -> tuple[zmq.Socket, ...]:
        return (self.responses,) if self.is_parent else (self.control, self.requests)

    # ---- sending ------------------------------------------------------------------------------

    def send(self, sock: zmq.Socket, message: msgspec.Struct) -> None:
        data = self._encoder.encode(message)
        with self._send_lock:
            sock.send(data, copy=False)

    def send_request(self, message: msgspec.Struct) -> None:
        self.send(self.requests, message)

    def send_control(self, message: msgspec.Struct) -> None:
        self.send(self.control, message)

    def send_response(self, message: msgspec.Struct) -> None:
        self.send(self.responses, message)

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

    def close(self) -> None:
        for sock in (self.requests, self.control, self.responses):
            sock.close()
        self._ctx.term()
        if self.is_parent:
            for channel in CHANNELS:
                Path(self.ipc_dir, channel).unlink(missing_ok=True)
