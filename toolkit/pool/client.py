"""WorkerPool: model-worker replicas as Ray actors, behind the handle the pipelines, dashboard and API already use.

Each replica is a `ReplicaActor` (toolkit.pool.replica): its process loads the model and runs the worker's step loop.
In the parent, one reader thread per replica long-polls the actor and routes the worker's own messages to each
request's Sink, exactly as ModelWorker's I/O thread does; an actor that dies makes that poll raise, which fails
that replica's requests only. Requests go to the least busy replica, or to the one that served their prefix last
(PrefixRouter). Like ModelWorker, the live parts sit in a `_Fleet` that does not point back at the handle, so a
finalizer can stop everything when the handle is dropped or the interpreter exits.

Ray: a pool joins the Ray instance this process is already connected to, or the cluster at `ray_address` (or
RAY_ADDRESS); otherwise it starts a small private one (no dashboard, 128 MiB object store) and stops it when the
last pool using it shuts down, or, through toolkit.pool.reaper, when this process dies without shutting down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import psutil
import ray
from ray.exceptions import GetTimeoutError, RayError

from toolkit.errors import (
    InvalidRequestError,
    QueueFullError,
    WorkerCrashedError,
    WorkerHungError,
    WorkerNotRunningError,
    WorkerStartupError,
)
from toolkit.pool import reaper
from toolkit.pool.metrics import PoolMetrics
from toolkit.pool.replica import ReplicaActor
from toolkit.pool.router import PrefixRouter
from toolkit.settings import Settings
from toolkit.telemetry.metrics import MetricsLog
from toolkit.worker import messages as m
from toolkit.worker.client import ResponseRouter, ShutsDownOnExit, Sink, WorkerState, _Pending, host_health

log = logging.getLogger(__name__)

POLL_S = 0.1  # reader wake-up: bounds how late shutdown or a hang is noticed
POLL_WAIT_S = 0.5  # how long one poll call waits inside the actor for output
OBJECT_STORE_BYTES = 128 << 20  # the pool ships only small msgpack frames; Ray's default is 30 % of RAM
RESOURCE_WAIT_S = 3.0  # Ray's view of free resources lags a just-finished shutdown by a moment
NO_PRESTART = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}  # idle workers: ~100 MiB each
_ActorUnavailable: Any = getattr(ray.exceptions, "ActorUnavailableError", ())  # transient; absent from older Ray

_encoder = msgspec.msgpack.Encoder()
_from_worker = msgspec.msgpack.Decoder(list[m.FromWorker])


# ---- the Ray connection ---------------------------------------------------------------------------

_ray_lock = threading.Lock()
_ray_users = 0  # live pools on a Ray connection that a pool opened (ray.init) in this process
_ray_ours = False  # whether the current connection was opened by a pool
_reaper: subprocess.Popen[bytes] | None = None  # stops the pool-started Ray if this process dies unannounced


def _acquire_ray(address: str | None) -> bool:
    """Connect this process to Ray if it is not already; True when the pool shares a pool-opened connection."""
    global _ray_users, _ray_ours, _reaper
    with _ray_lock:
        if ray.is_initialized():
            if _ray_ours:
                _ray_users += 1
            return _ray_ours
        address = address or os.environ.get("RAY_ADDRESS") or None
        common: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        try:
            if address:
                ray.init(address=address, **common)
            else:
                ray.init(num_cpus=os.cpu_count() or 1, object_store_memory=OBJECT_STORE_BYTES,
                         include_dashboard=False, _system_config=NO_PRESTART, **common)
                _stop_reaper()  # one left from a Ray that someone else shut down under our pools
                _reaper = subprocess.Popen(  # a file path, not -m: it imports only psutil, not toolkit
                    [sys.executable, reaper.__file__, str(os.getpid())], start_new_session=True,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"join the Ray cluster at {address!r}" if address else "start a local Ray instance"
            raise WorkerStartupError(f"could not {where}: {exc}") from exc
        _ray_ours, _ray_users = True, 1
        return True


def _release_ray() -> None:
    """One pool fewer on the pool-opened connection; the last one disconnects (and stops Ray if it started it)."""
    global _ray_users, _ray_ours
    with _ray_lock:
        _ray_users -= 1
        if _ray_users <= 0 and _ray_ours:
            _ray_ours, _ray_users = False, 0
            ray.shutdown()
            _stop_reaper()


def _stop_reaper() -> None:
    global _reaper
    if _reaper is not None:
        _reaper.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            _reaper.wait(5)
        _reaper = None


def _code_paths() -> list[str]:
    """This interpreter's sys.path entries outside the Python installation: the project, the notebook's directory,
    tests. A spawned worker inherits them; a Ray actor gets them as PYTHONPATH, so it imports the same code."""
    installed = tuple({os.path.abspath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
    paths: list[str] = []
    for entry in sys.path:
        path = os.path.abspath(entry or os.getcwd())
        if path not in paths and os.path.isdir(path) and not (path + os.sep).startswith(installed):
            paths.append(path)
    return paths


_actor_cls: Any = None


def _actor_class() -> Any:
    global _actor_cls
    if _actor_cls is None:
        _actor_cls = ray.remote(ReplicaActor)
    return _actor_cls


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


# ---- one replica ----------------------------------------------------------------------------------


class _Replica(ResponseRouter):
    """One actor, its requests in flight and the reader thread that routes its output: the pool's `_Connection`."""

    def __init__(self, index: int, settings: Settings, options: dict[str, Any], metrics: MetricsLog,
                 on_hang: Any) -> None:
        super().__init__(settings, metrics)
        self.index = index
        self.on_hang = on_hang
        self.actor = _actor_class().options(**options).remote(settings, index)
        self.start_ref = self.actor.start.remote()
        self.state = WorkerState.STARTING
        self.ready: m.Ready | None = None
        self.tokenizer_files: dict[str, bytes] = {}
        self.node: str | None = None
        self.submitted = 0
        self.closing = False
        self.death: str | None = None  # why it died, for health() and errors
        self.died_at: float | None = None  # when (time.time(), the step log's clock): the dashboard marks it
        self.thread = threading.Thread(target=self._read_loop, name=f"toolkit-pool-reader-{index}", daemon=True)

    @property
    def pid(self) -> int | None:
        return self.ready.pid if self.ready else None

    def finish_start(self, deadline: float) -> None:
        """Wait for the actor's start(); WorkerStartupError with the replica's traceback if it fails."""
        where = f"replica {self.index}"
        try:
            status, details = ray.get(self.start_ref, timeout=max(deadline - time.monotonic(), 0.01))
        except GetTimeoutError:
            raise WorkerStartupError(
                f"{where} not ready after startup_timeout_s={self.settings.startup_timeout_s}"
            ) from None
        except RayError as exc:  # the process died, the class failed to import there, its runtime env failed
            self.state = WorkerState.FAILED
            raise WorkerStartupError(f"{where} exited before it was ready: {_first_line(exc)}", str(exc)) from None
        if status == "failed":
            failed = msgspec.msgpack.decode(details, type=m.StartupFailed)
            self.state = WorkerState.FAILED
            raise WorkerStartupError(
                f"{where} failed to start: {failed.error_type}: {failed.message}", failed.traceback, failed.error_type
            )
        self.ready = msgspec.msgpack.decode(details["ready"], type=m.Ready)
        self.tokenizer_files = details["tokenizer_files"]
        self.node = details["node"]
        self.last_heard = time.monotonic()
        self.state = WorkerState.READY
        self.thread.start()

    # ---- requests -----------------------------------------------------------------------------

    def serving(self) -> bool:
        return self.state is WorkerState.READY and not self.closing and not self.hung

    def submit(self, request: m.GenerateRequest | m.EmbedRequest, sink: Sink, payload: bytes) -> None:
        with self.lock:  # held with fail_pending(): a request is either refused or sure to get an answer
            self._check_serving()
            self.pending[request.request_id] = _Pending(request, sink)
            self.submitted += 1
            self.actor.submit.remote(payload)

    def cancel(self, request_ids: list[str]) -> None:
        with self.lock:
            if self.state is WorkerState.READY and not self.closing:
                self.actor.cancel.remote(request_ids)

    def _send_control(self, message: m.ResetPrefixCache) -> None:
        self.actor.submit.remote(_encoder.encode(message))  # the actor's inbox: behind this caller's requests

    def _check_serving(self) -> None:
        where = f"replica {self.index} (pid {self.pid} on {self.node})"
        if self.state is WorkerState.FAILED:
            raise WorkerCrashedError(f"{where} is dead ({self.death}); call restart({self.index})")
        if self.closing or self.state is not WorkerState.READY:
            state = "shutting down" if self.closing else self.state.value
            raise WorkerNotRunningError(f"replica {self.index} is {state}")
        if self.hung:
            raise WorkerHungError(
                f"{where} is not responding (hang_timeout_s / step_timeout_s); call restart({self.index})"
            )

    # ---- the reader thread --------------------------------------------------------------------

    def _read_loop(self) -> None:
        ref = None
        while not self.closing:
            try:
                if ref is None:
                    ref = self.actor.poll.remote(POLL_WAIT_S)
                done, _ = ray.wait([ref], timeout=POLL_S)
                if done:
                    ref = None
                    payload = ray.get(done[0])
                    for message in _from_worker.decode(payload):
                        self.receive(message)
            except _ActorUnavailable:  # transient (network, node under pressure): ask again
                time.sleep(POLL_S)
                continue
            except RayError as exc:  # the actor died (RayActorError), or its step loop stopped (RayTaskError)
                self._on_death(exc)
                return
            except Exception as exc:
                if self.closing or not ray.is_initialized():  # Ray went away under us at interpreter exit
                    return
                self._on_death(exc)
                return
            self._check_hang()

    def _on_death(self, exc: BaseException) -> None:
        with self.lock:  # under the lock: no request slips in between the failing and the refusing
            if self.closing:
                return
            self.state = WorkerState.FAILED
            self.death = _first_line(exc)
            self.died_at = time.time()
        n = len(self.pending)
        log.error("replica %d (pid %s on %s) died with %d requests in flight: %s",
                  self.index, self.pid, self.node, n, self.death)
        self.fail_pending(WorkerCrashedError(
            f"replica {self.index} (pid {self.pid} on {self.node}) died mid-request: {self.death}; "
            f"call restart({self.index})"
        ))

    def _where(self) -> str:
        return f"replica {self.index} (pid {self.pid})"

    def _cancel_hung(self, request_ids: list[str]) -> None:
        with contextlib.suppress(Exception):
            self.actor.cancel.remote(request_ids)

    def _after_hang(self) -> None:
        self.on_hang(self.index)

    # ---- looking at it, stopping it -----------------------------------------------------------

    def health(self) -> dict[str, Any]:
        beat = self.last_metrics
        alive = self.state is WorkerState.READY and not self.closing
        return {
            "state": self.state.value,
            "alive": alive,
            "pid": self.pid,
            "node": self.node,
            "heartbeat_age_s": time.monotonic() - self.last_heard if self.ready else None,
            "in_flight": len(self.pending),
            "submitted": self.submitted,
            "hung": self.hung,
            "busy": beat.busy if beat else None,
            "kv_blocks_used": beat.kv_blocks_used if beat else None,  # as of the last heartbeat
            "died": self.death,
            "died_at": self.died_at,
            "warnings": list(self.ready.warnings) if self.ready else [],  # e.g. a dtype slow on this CPU
            **host_health(self.ready),
        }

    def kill(self) -> None:
        """Stop taking requests and kill the actor (its engine holds nothing that outlives the process)."""
        with self.lock:
            if self.closing:
                return
            self.closing = True
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                ray.kill(self.actor, no_restart=True)

    def reap(self, grace: float) -> None:
        """After kill(): wait for the reader and (on this host) the process; fail whatever was still in flight."""
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(grace)
        if self.pid is not None and self.node == socket.gethostname():
            with contextlib.suppress(psutil.Error):
                psutil.wait_procs([psutil.Process(self.pid)], timeout=grace)
        self.fail_pending(WorkerNotRunningError(f"replica {self.index} was shut down while this request was in flight"))
        with self.lock:
            if self.state is not WorkerState.FAILED:
                self.state = WorkerState.STOPPED


# ---- the pool's live parts ------------------------------------------------------------------------


class _Fleet:
    """The replicas, the router, the Ray connection and the tokenizer copy; no reference to the WorkerPool handle."""

    def __init__(self, settings: Settings, logs: list[MetricsLog], on_hang: Any) -> None:
        self.settings = settings
        self.replica_settings = settings
        self.options: dict[str, Any] = {}
        self.logs = logs
        self.on_hang = on_hang
        self.lock = threading.RLock()
        self.replicas: list[_Replica] = []
        self.router: PrefixRouter | None = None
        self.info: m.Ready | None = None
        self.tokenizer_dir: str | None = None
        self.holds_ray = False
        self.closed = False
        self.timings: dict[str, float] = {}  # start-up seconds: ray_connect_s, replicas_ready_s
        self.submits = 0
        self.route_s = 0.0  # hashing the prefix and choosing: the router's own cost
        self.submit_s = 0.0  # all of submit(), the Ray call included

    def start(self, ray_address: str | None, placement: Callable[[], tuple[Settings, dict[str, Any]]]) -> None:
        """Connect to Ray, place and start every replica, wait for all; on any failure, undo everything."""
        started = time.perf_counter()
        self.holds_ray = _acquire_ray(ray_address)
        self.timings["ray_connect_s"] = time.perf_counter() - started
        try:
            self.replica_settings, self.options = placement()
            self._check_resources()
            self.replicas = [self._new(i) for i in range(len(self.logs))]
            deadline = time.monotonic() + self.settings.startup_timeout_s
            for replica in self.replicas:  # all load at once; errors reported in replica order
                replica.finish_start(deadline)
            self.timings["replicas_ready_s"] = time.perf_counter() - started - self.timings["ray_connect_s"]
            first = self.replicas[0]
            assert first.ready is not None
            tokenizer_dir = ""
            if first.tokenizer_files:
                self.tokenizer_dir = tempfile.mkdtemp(prefix="tk-pool-tokenizer-")
                for name, data in first.tokenizer_files.items():
                    path = Path(self.tokenizer_dir, name)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
                tokenizer_dir = self.tokenizer_dir
            self.info = msgspec.structs.replace(first.ready, tokenizer_dir=tokenizer_dir)
            self.router = PrefixRouter(first.ready.block_size)
        except BaseException:
            self.close()
            raise

    def _new(self, index: int) -> _Replica:
        return _Replica(index, self.replica_settings, self.options, self.logs[index], self.on_hang)

    def _check_resources(self) -> None:
        """Fail now, not after startup_timeout_s, when the cluster has no room for the replicas."""
        need = {"CPU": self.options["num_cpus"] * len(self.logs), "GPU": self.options["num_gpus"] * len(self.logs)}
        deadline = time.monotonic() + RESOURCE_WAIT_S
        while True:
            free, total = ray.available_resources(), ray.cluster_resources()
            short = {k: v for k, v in need.items() if v > free.get(k, 0.0) + 1e-9}
            if not short or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if short:
            what = ", ".join(f"{v:g} {k} ({free.get(k, 0.0):g} free of {total.get(k, 0.0):g})"
                             for k, v in short.items())
            raise WorkerStartupError(
                f"{len(self.logs)} replicas need {what} in the Ray cluster; stop another pool, lower "
                "num_cpus_per_replica, or add nodes"
            )

    # ---- requests -----------------------------------------------------------------------------

    def submit(self, request: m.GenerateRequest | m.EmbedRequest, sink: Sink) -> None:
        started = time.perf_counter()
        try:
            self._submit(request, sink)
        finally:
            self.submit_s += time.perf_counter() - started
            self.submits += 1

    def _submit(self, request: m.GenerateRequest | m.EmbedRequest, sink: Sink) -> None:
        payload = _encoder.encode(request)
        router = self.router
        assert router is not None
        started = time.perf_counter()
        hashes = router.prefix_hashes(request.prompt_token_ids) if isinstance(request, m.GenerateRequest) else []
        with self.lock:
            if self.closed:
                raise WorkerNotRunningError("the worker pool is shut down")
            refused: set[int] = set()
            while True:
                outstanding = [len(r.pending) if i not in refused and r.serving() else None
                               for i, r in enumerate(self.replicas)]
                live = [n for n in outstanding if n is not None]
                if not live:
                    raise self.unavailable()
                if sum(live) >= self.settings.max_queue_size:
                    raise QueueFullError(f"{sum(live)} requests outstanding in the pool (max_queue_size)")
                index = router.choose(hashes, outstanding)
                router.record(hashes, index)
                routed = time.perf_counter()
                try:
                    self.replicas[index].submit(request, sink, payload)
                except (WorkerCrashedError, WorkerNotRunningError, WorkerHungError):
                    refused.add(index)  # it died between the look and the submit: try another
                    continue
                finally:
                    self.route_s += routed - started
                    started = time.perf_counter()
                return

    def unavailable(self) -> Exception:
        dead = [r for r in self.replicas if r.state is WorkerState.FAILED]
        if dead:
            why = "; ".join(f"replica {r.index}: {r.death}" for r in dead)
            return WorkerCrashedError(f"no replica of the pool is serving ({why}); call restart()")
        if any(r.hung for r in self.replicas):
            return WorkerHungError("every serving replica of the pool is hung; call restart()")
        return WorkerNotRunningError("no replica of the pool is serving")

    def cancel(self, request_ids: list[str]) -> None:
        for replica in list(self.replicas):
            mine = [rid for rid in request_ids if rid in replica.pending]
            if mine:
                replica.cancel(mine)

    def restart(self, index: int) -> None:
        """Kill replica `index` (dead or not) and start a fresh one in its place; the others keep serving."""
        old = self.replicas[index]
        old.kill()
        old.reap(self.settings.shutdown_timeout_s)
        new = self._new(index)
        with self.lock:
            self.replicas[index] = new  # STARTING: the router passes it by until it is ready
            if self.router is not None:
                self.router.forget(index)
        try:
            new.finish_start(time.monotonic() + self.settings.startup_timeout_s)
        except BaseException as exc:
            new.death, new.died_at = _first_line(exc), time.time()
            new.kill()
            new.reap(self.settings.shutdown_timeout_s)
            new.state = WorkerState.FAILED
            raise

    def close(self) -> None:
        """Kill every actor, fail what was in flight, and let go of Ray (stopping it if a pool started it)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for replica in self.replicas:
            replica.kill()
        for replica in self.replicas:
            replica.reap(self.settings.shutdown_timeout_s)
        if self.holds_ray:
            self.holds_ray = False
            _release_ray()
        if self.tokenizer_dir:
            shutil.rmtree(self.tokenizer_dir, ignore_errors=True)


# ---- the handle -----------------------------------------------------------------------------------


class WorkerPool(ShutsDownOnExit):
    """`replicas` model workers on Ray behind one handle. Use `start_worker_pool(...)` to get a started one.

    Same interface as ModelWorker (`info`, `settings`, `submit`, `cancel`, `metrics`, `health()`, `restart()`,
    `reset_prefix_cache()`, `shutdown()`, `is_alive()`, context managers), so TokenGeneratorPipeline,
    EmbeddingsPipeline and the Dashboard take either.
    """

    def __init__(self, settings: Settings | None = None, replicas: int = 2, *, ray_address: str | None = None,
                 num_cpus_per_replica: int | None = None, num_gpus_per_replica: float | None = None) -> None:
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
            raise InvalidRequestError(f"replicas must be an int >= 1, not {replicas!r}")
        if num_cpus_per_replica is not None and (not isinstance(num_cpus_per_replica, int) or num_cpus_per_replica < 1):
            raise InvalidRequestError(f"num_cpus_per_replica must be None or an int >= 1, not {num_cpus_per_replica!r}")
        if num_gpus_per_replica is not None and not 0 <= num_gpus_per_replica <= 1:
            raise InvalidRequestError(f"num_gpus_per_replica must be None or in [0, 1], not {num_gpus_per_replica!r}")
        self.settings = settings or Settings()
        self.num_replicas = replicas
        self.ray_address = ray_address
        self.num_cpus_per_replica = num_cpus_per_replica
        self.num_gpus_per_replica = num_gpus_per_replica
        self.metrics = PoolMetrics([MetricsLog(self.settings.metrics_capacity) for _ in range(replicas)])
        self.restarts = [0] * replicas
        self._fleet: _Fleet | None = None
        self._finalizer: weakref.finalize | None = None
        self._restart_lock = threading.Lock()

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> WorkerPool:
        """Start (or join) Ray, start every replica and wait for all; WorkerStartupError if any fails to load."""
        if self._fleet is not None and not self._fleet.closed:
            return self
        weak_self = weakref.ref(self)
        fleet = _Fleet(self.settings, self.metrics.logs, lambda i: _restart_later(weak_self, i))
        fleet.start(self.ray_address, self._placement)
        self._fleet = fleet
        self._finalizer = weakref.finalize(self, fleet.close)
        return self

    def _placement(self) -> tuple[Settings, dict[str, Any]]:
        """Threads and devices of each replica, and the Ray options that reserve them."""
        total = ray.cluster_resources()
        cpus = self.num_cpus_per_replica or self.settings.num_threads or max(
            1, int(total.get("CPU", 1)) // self.num_replicas
        )
        device = self.settings.device
        gpus = self.num_gpus_per_replica
        if gpus is None:
            gpus = 1 if device.startswith("cuda") or (device == "auto" and total.get("GPU", 0) >= 1) else 0
        if gpus and device.startswith("cuda"):
            device = "cuda"  # Ray gives the actor its GPU as CUDA_VISIBLE_DEVICES: it is cuda:0 in there
        env = {"PYTHONPATH": os.pathsep.join(_code_paths()), "OMP_NUM_THREADS": str(cpus),
               "TOKENIZERS_PARALLELISM": "false"}
        options = {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": 0, "max_task_retries": 0,
                   "runtime_env": {"env_vars": env}}
        return self.settings.replace(num_threads=cpus, device=device), options

    def shutdown(self) -> None:
        """Kill every replica, fail what is in flight, stop Ray if the pool started it. Safe to call twice."""
        if self._fleet is not None:
            self._fleet.close()

    def restart(self, replica: int | None = None) -> WorkerPool:
        """Start replica `replica` afresh (dead, hung or fine), or every replica in turn when None, so the others
        keep serving meanwhile. After shutdown(), starts the whole pool again."""
        if replica is not None and not (isinstance(replica, int) and 0 <= replica < self.num_replicas):
            raise InvalidRequestError(f"replica must be None or an int in [0, {self.num_replicas}), not {replica!r}")
        with self._restart_lock:
            fleet = self._fleet
            if fleet is None or fleet.closed:
                self.start()
                return self
            for index in range(self.num_replicas) if replica is None else [replica]:
                fleet.restart(index)
                self.restarts[index] += 1
        return self

    # ---- looking at it ------------------------------------------------------------------------

    @property
    def state(self) -> WorkerState:
        """READY while any replica serves; FAILED when none does and one died; else STARTING or STOPPED."""
        fleet = self._fleet
        if fleet is None or fleet.closed:
            return WorkerState.STOPPED
        states = [r.state for r in fleet.replicas]
        if any(r.serving() for r in fleet.replicas):
            return WorkerState.READY
        if WorkerState.FAILED in states:
            return WorkerState.FAILED
        return WorkerState.STARTING if WorkerState.STARTING in states else WorkerState.STOPPED

    @property
    def info(self) -> m.Ready:
        """Replica 0's Ready (they all load the same model), with the tokenizer copied to this machine."""
        if self._fleet is None or self._fleet.info is None:
            raise WorkerNotRunningError("worker pool is not started")
        return self._fleet.info

    @property
    def pids(self) -> list[int | None]:
        """Each replica's process id (on its own node: see health()['replicas'][i]['node'])."""
        return [r.pid for r in self._fleet.replicas] if self._fleet else [None] * self.num_replicas

    @property
    def pid(self) -> int | None:
        """The first serving replica's process id (ModelWorker.pid's counterpart)."""
        if self._fleet is None:
            return None
        serving = [r.pid for r in self._fleet.replicas if r.serving()]
        return serving[0] if serving else self.pids[0]

    @property
    def timings(self) -> dict[str, float]:
        """Start-up seconds (ray_connect_s, replicas_ready_s) and the mean cost of one submit, in µs: route_us (hash
        the prefix, pick a replica) and submit_us (all of it, the Ray call that hands the request over included)."""
        fleet = self._fleet
        if fleet is None:
            return {}
        n = max(fleet.submits, 1)
        return {**fleet.timings, "submits": float(fleet.submits), "route_us": fleet.route_s / n * 1e6,
                "submit_us": fleet.submit_s / n * 1e6}

    @property
    def router(self) -> PrefixRouter | None:
        return self._fleet.router if self._fleet else None

    def actor(self, replica: int) -> Any:
        """Replica `replica`'s Ray actor handle (for `ray.kill` in fault drills)."""
        if self._fleet is None:
            raise WorkerNotRunningError("worker pool is not started")
        return self._fleet.replicas[replica].actor

    def replica_of(self, request_id: str) -> int | None:
        """The replica serving an in-flight request (None once it has finished, or if unknown)."""
        for replica in self._fleet.replicas if self._fleet else []:
            if request_id in replica.pending:
                return replica.index
        return None

    def is_alive(self) -> bool:
        """True while at least one replica serves."""
        return self.state is WorkerState.READY

    def health(self) -> dict[str, Any]:
        """The pool's state plus one entry per replica (`replicas`); "degraded" while some replica is down."""
        fleet = self._fleet
        replicas = [dict(r.health(), replica=r.index, restarts=self.restarts[r.index])
                    for r in (fleet.replicas if fleet else [])]
        serving = sum(1 for r in (fleet.replicas if fleet else []) if r.serving())
        state = self.state.value
        if state == "ready" and serving < self.num_replicas:
            state = "degraded"
        used = [r["kv_blocks_used"] for r in replicas if r["alive"] and r["kv_blocks_used"] is not None]
        ages = [r["heartbeat_age_s"] for r in replicas if r["alive"] and r["heartbeat_age_s"] is not None]
        return {
            "state": state,
            "alive": serving > 0,
            "replicas_serving": serving,
            "pid": self.pid,
            "heartbeat_age_s": max(ages) if ages else None,
            "in_flight": sum(r["in_flight"] for r in replicas),
            "hung": any(r["hung"] for r in replicas),
            "busy": any(bool(r["busy"]) for r in replicas),
            "kv_blocks_used": sum(used) if used else None,
            "restarts": sum(self.restarts),
            "router": fleet.router.stats() if fleet and fleet.router else {},
            "replicas": replicas,
        }

    def reset_prefix_cache(self, timeout_s: float = 30.0) -> int:
        """Forget every cached prompt block on every serving replica (e.g. for a cold benchmark); returns how many
        blocks they dropped in all. Raises as ModelWorker.reset_prefix_cache does: PrefixCacheBusyError while a
        replica runs requests (the replicas before it are already reset), the pool's error when none serves. A dead
        replica is skipped: restart() brings it back with an empty cache."""
        fleet = self._fleet
        if fleet is None or fleet.closed:
            raise WorkerNotRunningError("worker pool is not started")
        serving = [r for r in fleet.replicas if r.serving()]
        if not serving:
            raise fleet.unavailable()
        return sum(r.reset_prefix_cache(timeout_s) for r in serving)

    def logs(self, replica: int = 0, tail: int | None = None, timeout_s: float = 10.0) -> str:
        """Replica `replica`'s recent log lines (kept in the actor, which may be on another host)."""
        if self._fleet is None:
            raise WorkerNotRunningError("worker pool is not started")
        target = self._fleet.replicas[replica]
        if not target.serving():
            raise WorkerNotRunningError(f"replica {replica} is {target.state.value}: its logs went with it")
        return ray.get(target.actor.logs.remote(tail), timeout=timeout_s)

    def __repr__(self) -> str:
        serving = sum(1 for r in self._fleet.replicas if r.serving()) if self._fleet else 0
        return (f"WorkerPool(model={self.settings.model!r}, replicas={serving}/{self.num_replicas} serving, "
                f"state={self.state.value})")

    # ---- used by the pipelines ----------------------------------------------------------------

    def submit(self, request: m.GenerateRequest | m.EmbedRequest, sink: Sink) -> None:
        if self._fleet is None:
            raise WorkerNotRunningError("worker pool is not started")
        self._fleet.submit(request, sink)

    def cancel(self, request_ids: list[str]) -> None:
        if self._fleet is not None:
            self._fleet.cancel(request_ids)


def _restart_later(weak_pool: weakref.ref[WorkerPool], index: int) -> None:
    """restart_on_hang: restart from a fresh thread, never from the reader thread that is about to be replaced."""

    def restart() -> None:
        pool = weak_pool()
        if pool is not None:
            pool.restart(index)

    threading.Thread(target=restart, name="toolkit-pool-restart", daemon=True).start()


def start_worker_pool(settings: Settings | None = None, replicas: int = 2, *, ray_address: str | None = None,
                      num_cpus_per_replica: int | None = None, num_gpus_per_replica: float | None = None,
                      **overrides: Any) -> WorkerPool:
    """Start `replicas` model workers as Ray actors and return once all are Ready. Works as a context manager.

    ray_address: None joins the Ray this process is connected to, or RAY_ADDRESS, or else starts a private local
    instance (stopped at shutdown); "auto" or "host:port" joins that cluster and leaves it running.
    num_cpus_per_replica: CPUs each actor reserves and torch threads it runs (default: settings.num_threads, or the
    cluster's CPUs split evenly). num_gpus_per_replica: default 1 when settings.device asks for CUDA (or is "auto"
    and the cluster has GPUs), else 0.
    """
    settings = settings or Settings()
    if overrides:
        settings = settings.replace(**overrides)
    return WorkerPool(settings, replicas, ray_address=ray_address, num_cpus_per_replica=num_cpus_per_replica,
                      num_gpus_per_replica=num_gpus_per_replica).start()


__all__ = ["WorkerPool", "start_worker_pool"]
