"""Two ways to feed a workload to a system, both honouring arrival times and --max-concurrency as vLLM does.

`drive_steps` is for systems we step ourselves in this thread (the in-process engine, `model.generate`);
`drive_async` is for systems that push results from elsewhere (the worker process, transformers' CB thread);
`drive_threads` is the client a user writes first: Python threads, each calling a blocking `generate`.
A request's clock starts when it is sent (after waiting for a concurrency slot), as in vLLM's benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from tqdm.auto import tqdm

from .records import RequestRecord
from .workloads import BenchRequest


class Stepper(Protocol):
    """A system driven one step at a time from the benchmark's thread."""

    def add(self, request: BenchRequest, record: RequestRecord) -> None: ...

    def step(self) -> None: ...

    @property
    def has_work(self) -> bool: ...


class Streamer(Protocol):
    """A system that streams each request's tokens back asynchronously."""

    def stream(self, request: BenchRequest) -> AsyncIterator[int]:
        """Yields the number of new tokens in each chunk as it arrives."""
        ...


def new_records(requests: Sequence[BenchRequest]) -> list[RequestRecord]:
    return [RequestRecord(r.index, len(r.prompt_ids), r.output_len) for r in requests]


def drive_steps(
    system: Stepper, requests: Sequence[BenchRequest], max_concurrency: int | None, desc: str, progress: bool = True
) -> tuple[list[RequestRecord], float]:
    """Admit requests as they arrive (and slots free up), step while there is work, sleep until the next arrival."""
    records = new_records(requests)
    waiting = deque(sorted(zip(requests, records, strict=True), key=lambda pair: pair[0].arrival_s))
    in_flight: list[RequestRecord] = []
    finished = 0
    started = time.perf_counter()
    with tqdm(total=len(requests), desc=desc, unit="req", disable=not progress) as bar:
        while finished < len(records):
            now = time.perf_counter()
            while waiting and started + waiting[0][0].arrival_s <= now and _has_slot(in_flight, max_concurrency):
                request, record = waiting.popleft()
                record.sent_at = time.perf_counter()
                system.add(request, record)
                in_flight.append(record)
            if system.has_work:
                system.step()
            elif waiting:
                time.sleep(max(0.0, min(started + waiting[0][0].arrival_s - time.perf_counter(), 0.05)))
            else:
                raise RuntimeError(f"{desc}: no work left but {len(records) - finished} requests unfinished")
            done = [r for r in in_flight if r.done]
            in_flight = [r for r in in_flight if not r.done]
            finished += len(done)
            bar.update(len(done))
    return records, started


def _has_slot(in_flight: list[RequestRecord], max_concurrency: int | None) -> bool:
    return max_concurrency is None or len(in_flight) < max_concurrency


def drive_async(
    system: Streamer, requests: Sequence[BenchRequest], max_concurrency: int | None, desc: str, progress: bool = True
) -> tuple[list[RequestRecord], float]:
    """One task per request on a fresh event loop: sleep until arrival, take a slot, consume the stream."""
    return asyncio.run(_drive_async(system, requests, max_concurrency, desc, progress))


async def _drive_async(
    system: Streamer, requests: Sequence[BenchRequest], max_concurrency: int | None, desc: str, progress: bool
) -> tuple[list[RequestRecord], float]:
    records = new_records(requests)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    started = time.perf_counter()
    with tqdm(total=len(requests), desc=desc, unit="req", disable=not progress) as bar:

        async def one(request: BenchRequest, record: RequestRecord) -> None:
            await asyncio.sleep(max(0.0, started + request.arrival_s - time.perf_counter()))
            async with slots if slots is not None else contextlib.nullcontext():
                record.sent_at = time.perf_counter()
                async for num_tokens in system.stream(request):
                    record.add_chunk(num_tokens)
                record.done = True
                bar.update()

        await asyncio.gather(*(one(r, rec) for r, rec in zip(requests, records, strict=True)))
    return records, started


def drive_threads(
    call: Callable[[BenchRequest], int], requests: Sequence[BenchRequest], num_threads: int, desc: str,
    progress: bool = True,
) -> tuple[list[RequestRecord], float]:
    """`num_threads` Python threads, each taking the next request in arrival order and making one blocking call.

    A user's first try at concurrency: `threading` around `pipe.generate`. The call returns the number of tokens
    it got; they all count as arriving when it returns (no streaming: TTFT = E2E and there is no ITL). The number
    of threads is the concurrency limit. An exception in any thread stops the others and is raised here.
    """
    records = new_records(requests)
    waiting = deque(sorted(zip(requests, records, strict=True), key=lambda pair: pair[0].arrival_s))
    lock = threading.Lock()
    failures: list[BaseException] = []
    started = time.perf_counter()
    with tqdm(total=len(requests), desc=desc, unit="req", disable=not progress) as bar:

        def worker() -> None:
            while not failures:
                with lock:
                    if not waiting:
                        return
                    request, record = waiting.popleft()
                time.sleep(max(0.0, started + request.arrival_s - time.perf_counter()))
                record.sent_at = time.perf_counter()
                try:
                    record.add_chunk(call(request))
                except BaseException as exc:  # re-raised in the calling thread below
                    failures.append(exc)
                    return
                record.done = True
                bar.update()

        threads = [threading.Thread(target=worker, name=f"{desc}-client-{i}", daemon=True)
                   for i in range(max(1, num_threads))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if failures:
        raise failures[0]
    return records, started
