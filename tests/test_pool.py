"""Worker pools on a local Ray: routing, parity with one worker, cancellation, faults, restart, clean shutdown.

One module-scoped pool of two tiny-model replicas (1 CPU each) serves every test but the first, which starts (and
must stop) a Ray instance of its own, and the router unit tests, which need no Ray.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from tests.conftest import tiny_settings
from toolkit import TokenGeneratorPipeline, WorkerCrashedError, WorkerStartupError
from toolkit.errors import PrefixCacheBusyError, WorkerNotRunningError
from toolkit.notebook import Dashboard
from toolkit.pool import PrefixRouter
from toolkit.pool.replica import _Channel, _ReplicaLoop
from toolkit.worker import messages as m

ray = pytest.importorskip("ray")

from toolkit.pool import WorkerPool, start_worker_pool  # noqa: E402  (after the skip: needs Ray)

SETTINGS = tiny_settings(metrics_interval_s=0.1)
LONG = {"max_new_tokens": 1500, "ignore_eos": True}  # long enough to be in flight when a test acts on it


def wait_until(check: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def ray_processes() -> list[str]:
    """Ray's processes among our descendants: gcs_server, raylet, its Python daemons, ray:: workers and actors."""
    found = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            name, cmd = p.name(), " ".join(p.cmdline())
        except psutil.Error:
            continue
        if name in ("gcs_server", "raylet") or cmd.startswith("ray::") or "/site-packages/ray/" in cmd:
            found.append(f"{p.pid} {name} {cmd[:80]}")
    return found


# ---- routing (pure Python) ------------------------------------------------------------------------


def test_router_prefers_least_outstanding_and_takes_turns_among_equals() -> None:
    router = PrefixRouter(block_size=4)
    assert [router.choose([], [0, 0, 0]) for _ in range(3)] == [0, 1, 2]
    assert router.choose([], [3, 1, 2]) == 1
    assert router.choose([], [0, None, 5]) == 0  # None: that replica is down


def test_router_sends_a_known_prefix_back_unless_that_replica_is_much_busier() -> None:
    router = PrefixRouter(block_size=4)
    prompt = list(range(12))
    hashes = router.prefix_hashes(prompt)
    assert len(hashes) == 3 and router.prefix_hashes(prompt[:3]) == []  # full blocks only
    router.record(hashes, 2)
    same_start = router.prefix_hashes([*prompt[:8], 99, 98, 97, 96])  # two blocks in common
    assert router.choose(same_start, [0, 0, 4]) == 2  # 4 <= 2 * 0 + 4: affinity wins
    assert router.choose(same_start, [1, 1, 6]) == 2
    assert router.choose(same_start, [1, 1, 7]) in (0, 1)  # 7 > 2 * 1 + 4: too busy, least outstanding
    assert router.choose(same_start, [0, 0, None]) in (0, 1)  # the owner is down
    router.forget(2)
    assert router.choose(same_start, [5, 5, 0]) == 2  # forgotten: now only least outstanding picks it
    assert router.affinity_hits == 2 and router.affinity_overridden == 1


class FakeEngine:
    def __init__(self) -> None:
        self.added: list[str] = []

    def add(self, request: m.GenerateRequest) -> None:
        self.added.append(request.request_id)

    def cancel(self, request_ids: list[str]) -> list[m.TokenDelta]:
        return [m.TokenDelta(rid, [], "cancelled") for rid in request_ids if rid in self.added]


def test_a_cancel_that_overtakes_its_request_in_the_actor_still_cancels_it() -> None:
    """Ray runs an async actor's calls out of order: the replica's loop must cope with Cancel before its request."""
    channel, engine = _Channel(), FakeEngine()
    loop = _ReplicaLoop(engine, channel, tiny_settings(), os.getpid())
    loop.handle(m.Cancel(["early"]))
    loop.handle(m.GenerateRequest("early", [1, 2], 4))
    loop.handle(m.GenerateRequest("normal", [1, 2], 4))
    loop.handle(m.Cancel(["normal"]))
    assert engine.added == ["normal"]  # the overtaken request never reached the engine
    deltas = [d for out in channel.take() for d in out.deltas]
    assert [(d.request_id, d.finish_reason) for d in deltas] == [("early", "cancelled"), ("normal", "cancelled")]
    assert not loop.tombstones


# ---- a failed start -------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_factory_that_raises_gives_startup_error_and_stops_the_ray_it_started() -> None:
    assert not ray.is_initialized(), "runs first, before the module's pool exists"
    with pytest.raises(WorkerStartupError) as err:
        start_worker_pool(tiny_settings(model="tests.factories:raising"), replicas=1, num_cpus_per_replica=1)
    assert "replica 0 failed to start: RuntimeError: factory exploded on purpose" in str(err.value)
    assert "factories.py" in err.value.remote_traceback and "exploded on purpose" in err.value.remote_traceback
    assert err.value.error_type == "RuntimeError"
    assert not ray.is_initialized()
    wait_until(lambda: not ray_processes(), 30, "Ray's processes to exit")


DRIVER = """
import time
from tests.conftest import tiny_settings
from toolkit import start_worker_pool
pool = start_worker_pool(tiny_settings(), replicas=1, num_cpus_per_replica=1)
print("ready", flush=True)
time.sleep(600)
"""


def gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_ray_a_pool_started_goes_when_its_process_is_killed() -> None:
    """SIGKILL leaves no atexit, no finalizer: only the reaper stops Ray's agents, which outlive the driver."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=root, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": root})
    try:
        assert driver.stdout is not None and driver.stdout.readline().strip() == "ready"
        family = psutil.Process(driver.pid).children(recursive=True)
        names = {p.name() for p in family}
        assert {"gcs_server", "raylet"} <= names and any(" ".join(p.cmdline()).startswith("ray::") for p in family)
    finally:
        driver.kill()
        driver.wait(10)
    wait_until(lambda: all(gone(p) for p in family), 60, "every process the killed driver had started to exit")


# ---- one pool of two ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    started = time.perf_counter()
    with start_worker_pool(SETTINGS, replicas=2, num_cpus_per_replica=1) as p:
        print(f"\npool of 2 (Ray started by the pool) ready in {time.perf_counter() - started:.1f} s")
        yield p


@pytest.fixture(scope="module")
def pipe(pool: WorkerPool) -> TokenGeneratorPipeline:
    return TokenGeneratorPipeline(pool)


def submitted(pool: WorkerPool) -> list[int]:
    return [r["submitted"] for r in pool.health()["replicas"]]


def replicas_that_served(pool: WorkerPool, request_ids: list[str], timeout_s: float = 20) -> dict[str, int]:
    """request id -> replica, from the merged metrics' `replica` column (rows arrive with the next heartbeat)."""

    def rows() -> dict[str, int] | None:
        reqs = pool.metrics.requests()
        found = dict(zip(reqs.request_id, reqs.replica, strict=True))
        return {rid: int(found[rid]) for rid in request_ids} if set(request_ids) <= set(found) else None

    return wait_until(rows, timeout_s, "request metrics")  # type: ignore[return-value]


@pytest.mark.timeout(120)
def test_greedy_output_through_the_pool_equals_one_worker(pipe: TokenGeneratorPipeline, tiny_pipe) -> None:
    prompts = ["Hello", "The capital of France is", "one two three four five six seven eight nine ten " * 3]
    from_pool = pipe.generate_batch(prompts, max_new_tokens=12, progress=False)
    alone = tiny_pipe.generate_batch(prompts, max_new_tokens=12, progress=False)
    assert [c.token_ids for c in from_pool] == [c.token_ids for c in alone]
    assert all(c.token_ids for c in from_pool)


@pytest.mark.timeout(120)
def test_concurrent_requests_spread_over_both_replicas(pool: WorkerPool, pipe: TokenGeneratorPipeline) -> None:
    before = submitted(pool)
    streams = [pipe.stream(f"request {i}", max_new_tokens=8, ignore_eos=True) for i in range(24)]
    completions = [s.result() for s in streams]
    assert all(len(c.token_ids) == 8 for c in completions)
    spread = [after - b for after, b in zip(submitted(pool), before, strict=True)]
    assert sum(spread) == 24 and min(spread) >= 6, spread
    placed = replicas_that_served(pool, [s.request_id for s in streams])
    assert set(placed.values()) == {0, 1}
    assert set(pool.metrics.steps().replica) == {0, 1}


@pytest.mark.timeout(120)
def test_requests_sharing_a_prefix_land_on_one_replica(pool: WorkerPool, pipe: TokenGeneratorPipeline) -> None:
    block = pool.info.block_size
    prefix = [(7 * i) % 1000 + 100 for i in range(3 * block)]  # three full KV blocks
    hits = pool.health()["router"]["affinity_hits"]
    streams = [pipe.stream([*prefix, 2000 + i, 2001 + i], max_new_tokens=8, ignore_eos=True) for i in range(5)]
    for s in streams:
        s.result()
    placed = replicas_that_served(pool, [s.request_id for s in streams])
    assert len(set(placed.values())) == 1, placed  # without affinity, turn-taking would alternate replicas
    assert pool.health()["router"]["affinity_hits"] - hits >= 4


@pytest.mark.timeout(120)
def test_reset_prefix_cache_empties_every_replica_and_is_refused_while_one_runs(
    pool: WorkerPool, pipe: TokenGeneratorPipeline
) -> None:
    block = pool.info.block_size
    prompt = [(11 * i) % 1000 + 100 for i in range(3 * block)]
    pipe.generate([*prompt, 5], max_new_tokens=2)
    assert pipe.generate([*prompt, 6], max_new_tokens=2).cached_tokens == 3 * block  # affinity: the same replica
    stream = pipe.stream("go on forever", **LONG)
    next(stream)
    with pytest.raises(PrefixCacheBusyError, match="requests run"):
        pool.reset_prefix_cache(timeout_s=10)
    stream.close()
    wait_until(lambda: all(r["kv_blocks_used"] == 0 for r in pool.health()["replicas"]), 20, "the blocks to be freed")
    assert pool.reset_prefix_cache(timeout_s=10) > 0
    assert pool.reset_prefix_cache(timeout_s=10) == 0
    assert pipe.generate([*prompt, 7], max_new_tokens=2).cached_tokens == 0


@pytest.mark.timeout(60)
def test_dashboard_and_logs_work_on_a_pool(pool: WorkerPool) -> None:
    figure = Dashboard(pool).snapshot()
    assert figure.axes
    assert f"replica 1 ready: Ready(pid={pool.pids[1]}" in pool.logs(1)
    assert len(pool.logs(0, tail=1).splitlines()) == 1


@pytest.mark.timeout(120)
def test_a_cancelled_stream_frees_its_blocks_on_the_replica(pool: WorkerPool, pipe: TokenGeneratorPipeline) -> None:
    stream = pipe.stream("a long story", **LONG)
    replica = pool.replica_of(stream.request_id)
    assert replica is not None

    def blocks() -> int | None:
        return pool.health()["replicas"][replica]["kv_blocks_used"]

    next(stream)
    wait_until(lambda: (blocks() or 0) > 0, 20, "the heartbeat to show the request's blocks")
    stream.close()
    assert stream.finish_reason == "cancelled"
    wait_until(lambda: blocks() == 0 and pool.health()["in_flight"] == 0, 20, "the blocks to be freed")
    row = replicas_that_served(pool, [stream.request_id])
    reqs = pool.metrics.requests()
    assert row[stream.request_id] == replica
    assert reqs[reqs.request_id == stream.request_id].finish_reason.item() == "cancelled"  # the engine cancelled it


@pytest.mark.timeout(180)
def test_a_killed_replica_fails_only_its_requests(pool: WorkerPool, pipe: TokenGeneratorPipeline) -> None:
    streams = [pipe.stream(f"story {i}", **LONG) for i in range(6)]
    for s in streams:
        next(s)  # every request is running
    doomed = [s for s in streams if pool.replica_of(s.request_id) == 1]
    survivors = [s for s in streams if pool.replica_of(s.request_id) == 0]
    assert doomed and survivors and len(doomed) + len(survivors) == len(streams)
    ray.kill(pool.actor(1))
    for s in doomed:
        with pytest.raises(WorkerCrashedError, match="replica 1"):
            s.result()
    for s in survivors:
        assert len(s.result().token_ids) == LONG["max_new_tokens"]
    health = pool.health()
    assert health["state"] == "degraded" and health["alive"]
    assert [r["state"] for r in health["replicas"]] == ["ready", "failed"]
    assert health["replicas"][1]["died"]
    before = submitted(pool)
    assert pipe.generate("still serving", max_new_tokens=4).token_ids  # on replica 0
    assert submitted(pool)[0] == before[0] + 1


@pytest.mark.timeout(240)
def test_restart_brings_back_a_killed_or_crashed_replica(pool: WorkerPool, pipe: TokenGeneratorPipeline) -> None:
    if pool.health()["replicas"][1]["state"] != "failed":  # alone with -k: kill it here
        ray.kill(pool.actor(1))
        wait_until(lambda: pool.health()["replicas"][1]["state"] == "failed", 30, "replica 1 to be seen dead")
    pool.restart(1)
    assert pool.health()["state"] == "ready" and pool.restarts == [0, 1]
    os.kill(pool.pids[0], signal.SIGKILL)  # now the process itself, with nothing in flight
    wait_until(lambda: pool.health()["replicas"][0]["state"] == "failed", 30, "replica 0 to be seen dead")
    assert pipe.generate("replica 1 serves alone", max_new_tokens=4).token_ids
    pool.restart(0)
    before = submitted(pool)
    completions = pipe.generate_batch([f"again {i}" for i in range(8)], max_new_tokens=4, progress=False)
    assert all(len(c.token_ids) == 4 for c in completions)
    assert all(after > b for after, b in zip(submitted(pool), before, strict=True))
    assert pool.health()["replicas_serving"] == 2 and pool.restarts == [1, 1]


@pytest.mark.timeout(120)
def test_shutdown_leaves_no_ray_process_behind(pool: WorkerPool, pipe: TokenGeneratorPipeline) -> None:
    pids = [p for p in pool.pids if p is not None]
    stream = pipe.stream("in flight at shutdown", **LONG)
    pool.shutdown()
    with pytest.raises(WorkerNotRunningError):
        stream.result()
    assert pool.state.value == "stopped" and not pool.is_alive()
    with pytest.raises(WorkerNotRunningError):
        pipe.generate("too late", max_new_tokens=2)
    assert not ray.is_initialized()
    wait_until(lambda: not ray_processes(), 30, "Ray's processes to exit")
    assert not [p for p in pids if psutil.pid_exists(p)]
