"""The seed's claim, measured in the kernel: how late does the kernel's event loop wake up while a model is busy?

`loop_lag` is an asyncio task that asks to be woken every 10 ms and records how late each wake-up came. It runs
beside the same load twice: an `Engine` stepped on the kernel's own loop (`step_in_loop`), and the worker driven
through `TokenGeneratorPipeline.astream` (`stream_through_worker`). `under_load` runs one load with the probe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from toolkit.worker import messages as m


async def loop_lag(stop: asyncio.Event, every_s: float = 0.010) -> np.ndarray:
    """Rows of (seconds since start, lag ms): each wake-up's delay past the `every_s` it asked to sleep."""
    rows = []
    start = time.perf_counter()
    while not stop.is_set():
        asked = time.perf_counter()
        await asyncio.sleep(every_s)
        woke = time.perf_counter()
        rows.append((woke - start, 1000 * (woke - asked - every_s)))
    return np.array(rows)


async def step_in_loop(engine: Any, requests: Sequence[m.GenerateRequest], step_ms: list[float] | None = None) -> int:
    """Design (a): the engine stepped on this event loop, yielding to it between steps; returns tokens generated.
    Each step's duration goes to `step_ms` when given."""
    for request in requests:
        engine.add(request)
    tokens = 0
    while engine.has_work:
        deltas, metrics = engine.step()
        tokens += sum(len(d.token_ids) for d in deltas)
        if step_ms is not None:
            step_ms.append(metrics.step_ms)
        await asyncio.sleep(0)  # the loop's other tasks (the probe, an HTTP handler) run only here
    return tokens


async def stream_through_worker(pipe: Any, prompts: Sequence[list[int]], max_new_tokens: int) -> int:
    """Design (b): the same prompts streamed from the worker process with `astream`; returns tokens received."""

    async def one(ids: list[int]) -> int:
        return sum([len(chunk.token_ids) async for chunk in pipe.astream(ids, max_new_tokens=max_new_tokens,
                                                                          ignore_eos=True)])

    return sum(await asyncio.gather(*(one(ids) for ids in prompts)))


async def under_load(load: Callable[[], Awaitable[int]], every_s: float = 0.010) -> dict[str, Any]:
    """Run `load()` with the lag probe beside it: the lag timeline, wall time, tokens and tokens per second."""
    stop = asyncio.Event()
    probe = asyncio.create_task(loop_lag(stop, every_s))
    await asyncio.sleep(0.1)  # a few idle samples first
    started = time.perf_counter()
    tokens = await load()
    wall_s = time.perf_counter() - started
    stop.set()
    lags = await probe
    return {"lag": lags, "wall_s": wall_s, "tokens": tokens, "tokens_per_s": tokens / wall_s}
