"""Our own engine: through the worker process and pipeline (`toolkit`), in this process, and over a Ray worker pool."""

from __future__ import annotations

import math
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import psutil

from toolkit.settings import Settings
from toolkit.worker.messages import GenerateRequest

from .config import BenchConfig
from .drivers import drive_async, drive_steps, drive_threads
from .memory import RssSampler
from .records import RequestRecord, SystemRun
from .workloads import BenchRequest, warmup_requests

if TYPE_CHECKING:
    import pandas as pd

    from toolkit.engine.core import Engine
    from toolkit.pipeline import TokenGeneratorPipeline
    from toolkit.pool import WorkerPool
    from toolkit.worker.client import ModelWorker

METRICS_SETTLE_S = 5.0  # the worker coalesces telemetry every metrics_interval_s; wait at most this for the tail


def toolkit_settings(cfg: BenchConfig, prefix_cache: bool | None = None) -> Settings:
    """The same scheduler limits and KV budget for the worker, the in-process engine and hf-cb."""
    return Settings(
        model=cfg.model, device=cfg.device, dtype=cfg.dtype, max_batch_size=cfg.max_batch_size,
        max_batch_tokens=cfg.max_batch_tokens, kv_cache_gib=cfg.kv_cache_gib, num_threads=cfg.threads,
        max_queue_size=max(1024, cfg.num_requests + cfg.warmup),
        enable_prefix_caching=cfg.prefix_cache if prefix_cache is None else prefix_cache,
    )


def hit_rate(queries: float, hits: float) -> float:
    return hits / queries if queries else math.nan


class PipelineStreamer:
    """Streams through TokenGeneratorPipeline.astream: ids in, chunks out, as a notebook user would."""

    def __init__(self, pipe: TokenGeneratorPipeline) -> None:
        self.pipe = pipe

    async def stream(self, request: BenchRequest) -> AsyncIterator[int]:
        chunks = self.pipe.astream(request.prompt_ids, max_new_tokens=request.output_len, ignore_eos=True)
        async for chunk in chunks:
            yield len(chunk.token_ids)


def run_toolkit(cfg: BenchConfig, requests: Sequence[BenchRequest], name: str = "toolkit",
                prefix_cache: bool | None = None) -> SystemRun:
    """Through the worker and the pipeline; the prefix cache is emptied after the warm-up, so every run starts cold."""
    from toolkit.worker.client import start_model_worker

    run = SystemRun(name)
    loading = time.perf_counter()
    with start_model_worker(toolkit_settings(cfg, prefix_cache)) as worker:
        run.load_s = time.perf_counter() - loading
        streamer = warm_up(worker, cfg, requests, name)
        with RssSampler(worker.pid) as rss:
            run.records, run.started_at = drive_client(cfg, streamer, requests, name)
        if cfg.client == "threads":
            run.note = f"client: {cfg.client_concurrency} threads calling pipe.generate (no streaming: TTFT = E2E)"
        steps = collect_steps(worker, run)
        run.peak_rss_bytes = max(rss.peak, int(steps.rss_bytes.max()) if len(steps) else 0)
    return run


def warm_up(worker: ModelWorker | WorkerPool, cfg: BenchConfig, requests: Sequence[BenchRequest],
            name: str) -> PipelineStreamer:
    """A pipeline on `worker`, warmed up; then its prefix cache and telemetry are emptied, so the run starts cold."""
    from toolkit.pipeline import TokenGeneratorPipeline

    streamer = PipelineStreamer(TokenGeneratorPipeline(worker))
    drive_async(streamer, warmup_requests(requests, cfg.warmup), None, name, progress=False)
    settle_metrics(worker)
    worker.reset_prefix_cache()
    worker.metrics.reset()
    return streamer


def collect_steps(worker: ModelWorker | WorkerPool, run: SystemRun) -> pd.DataFrame:
    """After the run: every step row the worker logged, its batch sizes and prefix-cache hit rate put into `run`."""
    settle_metrics(worker)
    steps = worker.metrics.steps()
    run.batch_sizes = steps.batch_size.astype(int).tolist()
    run.prefix_cache_hit_rate = hit_rate(steps.prefix_cache_queries.sum(), steps.prefix_cache_hits.sum())
    return steps


def drive_client(cfg: BenchConfig, streamer: PipelineStreamer, requests: Sequence[BenchRequest],
                 name: str) -> tuple[list[RequestRecord], float]:
    """The measured run through the pipeline with cfg.client: asyncio tasks on astream, or threads on generate."""
    pipe = streamer.pipe
    if cfg.client == "threads":

        def call(request: BenchRequest) -> int:
            out = pipe.generate(request.prompt_ids, max_new_tokens=request.output_len, ignore_eos=True)
            return len(out.token_ids)

        return drive_threads(call, requests, cfg.client_concurrency, name)
    return drive_async(streamer, requests, cfg.max_concurrency, name)


def run_toolkit_no_cache(cfg: BenchConfig, requests: Sequence[BenchRequest]) -> SystemRun:
    return run_toolkit(cfg, requests, "toolkit-no-cache", prefix_cache=False)


def run_toolkit_ray(cfg: BenchConfig, requests: Sequence[BenchRequest]) -> SystemRun:
    """The same pipeline over a WorkerPool: `cfg.replicas` replicas as Ray actors on a Ray this process starts; every
    replica's prefix cache is emptied after the warm-up, as in `run_toolkit`."""
    from toolkit.pool import start_worker_pool

    threads = cfg.threads_per_replica or max(1, (cfg.threads or os.cpu_count() or 1) // cfg.replicas)
    run = SystemRun("toolkit-ray")
    loading = time.perf_counter()
    settings = toolkit_settings(cfg).replace(num_threads=threads)
    with start_worker_pool(settings, replicas=cfg.replicas, num_cpus_per_replica=threads) as pool:
        run.load_s = time.perf_counter() - loading
        ray_rss = sum(rss_of(p) for p in ray_daemons(pool.pids))
        streamer = warm_up(pool, cfg, requests, run.name)
        pids = [p for p in pool.pids if p is not None]
        cpu = time.process_time()
        with RssSampler(pids[0], tuple(pids[1:])) as rss:
            run.records, run.started_at = drive_async(streamer, requests, cfg.max_concurrency, "toolkit-ray")
        parent_cpu_s = time.process_time() - cpu  # client + pipeline + router + Ray client: what one parent can carry
        collect_steps(pool, run)
        run.peak_rss_bytes = rss.peak
        t = pool.timings
        run.note = (f"{cfg.replicas} replicas x {threads} threads; Ray start {t['ray_connect_s']:.1f} s, replicas "
                    f"ready {t['replicas_ready_s']:.1f} s; Ray's own processes {ray_rss / 2**20:.0f} MiB RSS "
                    f"(not in peak RSS); per request: routing {t['route_us']:.0f} us, submit {t['submit_us']:.0f} us; "
                    f"requests per replica {[r['submitted'] for r in pool.health()['replicas']]}; parent CPU "
                    f"{parent_cpu_s / max(1, sum(r.num_tokens for r in run.records)) * 1e3:.2f} ms per output token")
    return run


def ray_daemons(replica_pids: Sequence[int | None]) -> list[int]:
    """Ray's own processes under this one (gcs_server, raylet, agents, monitors): what a pool adds besides replicas."""
    from toolkit.pool.reaper import is_ray

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.pid not in replica_pids and is_ray(proc):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def rss_of(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def settle_metrics(worker: ModelWorker | WorkerPool) -> None:
    """Wait for a telemetry message sent after now: the worker's socket is ordered, so it carries every step so far."""
    now = time.time()
    deadline = time.monotonic() + METRICS_SETTLE_S
    while time.monotonic() < deadline and (worker.metrics.last_heartbeat or 0.0) <= now:
        time.sleep(0.05)


class EngineStepper:
    """Drives Engine.step() from the benchmark thread, timing each token as the step that made it returns."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.records: dict[str, RequestRecord] = {}
        self.batch_sizes: list[int] = []
        self.cache_queries = self.cache_hits = 0

    def add(self, request: BenchRequest, record: RequestRecord) -> None:
        rid = f"bench-{request.index}"
        self.records[rid] = record
        self.engine.add(GenerateRequest(rid, request.prompt_ids, request.output_len, ignore_eos=True))

    def step(self) -> None:
        deltas, metrics = self.engine.step()
        now = time.perf_counter()
        self.batch_sizes.append(metrics.batch_size)
        self.cache_queries += metrics.prefix_cache_queries
        self.cache_hits += metrics.prefix_cache_hits
        for delta in deltas:
            record = self.records[delta.request_id]
            record.add_chunk(len(delta.token_ids), now)
            if delta.finish_reason is not None:
                record.done = True

    @property
    def has_work(self) -> bool:
        return self.engine.has_work


def run_toolkit_inprocess(cfg: BenchConfig, requests: Sequence[BenchRequest]) -> SystemRun:
    from toolkit.engine.core import Engine

    run = SystemRun("toolkit-inprocess")
    loading = time.perf_counter()
    engine = Engine(toolkit_settings(cfg), set_threads=True)  # this process is the benchmark's own
    run.load_s = time.perf_counter() - loading
    drive_steps(EngineStepper(engine), warmup_requests(requests, cfg.warmup), None, run.name, progress=False)
    engine.reset_prefix_cache()
    stepper = EngineStepper(engine)
    with RssSampler() as rss:
        run.records, run.started_at = drive_steps(stepper, requests, cfg.max_concurrency, "toolkit-inprocess")
    run.batch_sizes = stepper.batch_sizes
    run.peak_rss_bytes = rss.peak
    run.prefix_cache_hit_rate = hit_rate(stepper.cache_queries, stepper.cache_hits)
    if cfg.client != "asyncio":
        run.note = "stepped by the benchmark itself: --client does not apply"
    return run
