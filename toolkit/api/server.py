"""Serving the app: uvicorn on its own thread with its own event loop, never on the caller's (Jupyter's) loop.

`serve_in_background(worker, port=0)` is for notebooks and tests; `python -m toolkit serve` runs the same
BackgroundServer from the command line, with the main thread waiting for Ctrl-C or SIGTERM. A `CrashWatcher`
restarts a worker that died (the CLI's --restart-on-crash).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
import weakref
from typing import Any

import uvicorn

from toolkit.errors import InvalidRequestError

log = logging.getLogger("toolkit.api")

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to expose the model beyond this machine without a key, unless told to."""
    if not is_loopback(host) and not api_key and not insecure:
        raise InvalidRequestError(
            f"refusing to bind {host!r} without an API key: anyone who can reach it could use the model. "
            "Give --api-key (or TOOLKIT_API_KEY), bind 127.0.0.1, or pass --insecure."
        )


class _Running:
    """The uvicorn server, its thread and socket: what a finalizer needs to stop it without the handle."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, sock: socket.socket) -> None:
        self.server, self.thread, self.sock = server, thread, sock

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        if self.thread.is_alive():  # streams still open after the graceful wait
            self.server.force_exit = True
            self.thread.join(timeout_s)
        self.sock.close()


class BackgroundServer:
    """An app served by uvicorn on a thread. `.url`, `.stop()`; a context manager; stopped when dropped."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, access_log: bool = False,
                 log_level: str = "warning") -> None:
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto says TCP; without it each
        # keep-alive response waits ~40 ms for a delayed ACK (Nagle)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))  # here, so a port in use fails in the caller, and port 0 is known
        except OSError:
            sock.close()
            raise
        self.host, self.port = host, sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, access_log=access_log, log_config=None,
                                timeout_graceful_shutdown=5, lifespan="on")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"toolkit-api-{self.port}",
                                  daemon=True)
        self._running = _Running(server, thread, sock)
        self._finalizer = weakref.finalize(self, self._running.stop)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the API server did not start on {self.url}")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        host = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._running.thread.is_alive()

    def stop(self) -> None:
        """Stop serving and join the thread (open streams get STOP_TIMEOUT_S to finish). Safe to call twice."""
        self._finalizer()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"BackgroundServer({self.url}, {'running' if self.running else 'stopped'})"


_live: weakref.WeakKeyDictionary[Any, weakref.ref[BackgroundServer]] = weakref.WeakKeyDictionary()


def serve_in_background(worker: Any, port: int = 0, *, host: str = "127.0.0.1", embeddings_worker: Any = None,
                        api_key: str | None = None, insecure: bool = False, **app_options: Any) -> BackgroundServer:
    """Serve `worker` over the OpenAI API from a thread; port 0 picks a free port (see `.url`).

    One background server per worker: calling this again for the same worker (re-running a notebook cell) stops
    the previous one first, so no port or thread is left behind.
    """
    from toolkit.api.app import create_app

    check_bind(host, api_key, insecure)
    previous = _live.get(worker)
    if previous is not None and (old := previous()) is not None:
        old.stop()
    server = BackgroundServer(create_app(worker, embeddings_worker, api_key=api_key, **app_options), host, port)
    _live[worker] = weakref.ref(server)
    return server


class CrashWatcher:
    """Restart-on-crash: polls the handle and restarts a worker that died, backing off while restarts fail. Over a
    pool, only the replicas that died are restarted (`restart(i)`); the others keep serving meanwhile."""

    def __init__(self, worker: Any, interval_s: float = 0.2, max_backoff_s: float = 30.0) -> None:
        self.worker, self.interval_s, self.max_backoff_s = worker, interval_s, max_backoff_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="toolkit-crash-watcher", daemon=True)

    def start(self) -> CrashWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.wait(self.interval_s):
            for replica in self._dead():
                what = "the model worker" if replica is None else f"replica {replica} of the pool"
                log.warning("%s died; restarting it (restart-on-crash)", what)
                try:
                    if replica is None:
                        self.worker.restart()
                    else:
                        self.worker.restart(replica)
                    backoff = 1.0
                    log.warning("%s restarted: pid %s", what, self.worker.pid)
                except Exception:
                    log.exception("restart failed; next try in %.0f s", backoff)
                    self._stop.wait(backoff)
                    backoff = min(2 * backoff, self.max_backoff_s)
                    break

    def _dead(self) -> list[int | None]:
        """The pool's replicas that died, or [None] for a single worker that died."""
        health = self.worker.health()
        if "replicas" in health:
            return [r["replica"] for r in health["replicas"] if r["state"] == "failed"]
        return [None] if health.get("state") == "failed" else []
