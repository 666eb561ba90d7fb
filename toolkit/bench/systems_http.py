"""`toolkit-http`: the `toolkit` system's workload through the OpenAI HTTP API, streamed with the async `openai`
client, so the HTTP layer's cost shows beside `toolkit`.

The worker is spawned as for `toolkit`; the API server runs on its own thread (`serve_in_background`) in the
benchmark's process, as a notebook user would run it; the client runs in a spawned process of its own, as real
clients do, so its JSON parsing does not share the server's GIL. Token counts per chunk come from vLLM's
`continuous_usage_stats` (a running usage on every chunk), so counts are exact, not guessed from text.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from .config import BenchConfig
from .drivers import _drive_async
from .memory import RssSampler
from .records import RequestRecord, SystemRun
from .systems_toolkit import settle_metrics, toolkit_settings
from .workloads import BenchRequest, warmup_requests


class HttpStreamer:
    """Streams /v1/completions with token-id prompts; yields the new tokens of each chunk."""

    def __init__(self, base_url: str, model: str) -> None:
        self.base_url, self.model = base_url, model
        self.client: Any = None

    async def stream(self, request: BenchRequest) -> AsyncIterator[int]:
        if self.client is None:  # made on the event loop that uses it
            import openai

            self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key="-", max_retries=0, timeout=3600)
        chunks = await self.client.completions.create(
            model=self.model, prompt=request.prompt_ids, max_tokens=request.output_len, temperature=0.0, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True},
        )
        seen = 0
        async for chunk in chunks:
            if chunk.choices and chunk.usage is not None:
                yield chunk.usage.completion_tokens - seen
                seen = chunk.usage.completion_tokens

    def drive(self, requests: Sequence[BenchRequest], max_concurrency: int | None, desc: str,
              progress: bool = True) -> tuple[list[RequestRecord], float]:
        """drive_async, closing the client on the loop that made it."""

        async def driven() -> tuple[list[RequestRecord], float]:
            try:
                return await _drive_async(self, requests, max_concurrency, desc, progress)
            finally:
                if self.client is not None:
                    await self.client.close()
                    self.client = None

        return asyncio.run(driven())


def _client(send: Any, base_url: str, model: str, requests: Sequence[BenchRequest], max_concurrency: int | None,
            desc: str, progress: bool) -> None:
    """The client process: drive the requests, send back (records, start time); perf_counter is system-wide."""
    try:
        result: Any = HttpStreamer(base_url, model).drive(requests, max_concurrency, desc, progress)
    except BaseException as exc:
        result = RuntimeError(f"toolkit-http client: {type(exc).__name__}: {exc}")
    send.send(result)
    send.close()


def drive_in_child(base_url: str, model: str, requests: Sequence[BenchRequest], max_concurrency: int | None,
                   desc: str, progress: bool = True) -> tuple[list[RequestRecord], float]:
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_client, args=(send, base_url, model, list(requests), max_concurrency, desc, progress),
                        name="bench-http-client")
    child.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        raise RuntimeError(f"the toolkit-http client died (exit code {child.exitcode})") from None
    finally:
        receive.close()
        child.join()
    if isinstance(result, BaseException):
        raise result
    return result


def run_toolkit_http(cfg: BenchConfig, requests: Sequence[BenchRequest]) -> SystemRun:
    from toolkit.api import serve_in_background
    from toolkit.worker.client import start_model_worker

    run = SystemRun("toolkit-http")
    loading = time.perf_counter()
    with start_model_worker(toolkit_settings(cfg)) as worker, serve_in_background(worker) as server:
        run.load_s = time.perf_counter() - loading
        url = server.url + "/v1"
        drive_in_child(url, cfg.model, warmup_requests(requests, cfg.warmup), None, run.name, progress=False)
        settle_metrics(worker)
        worker.metrics.reset()
        with RssSampler(worker.pid) as rss:
            run.records, run.started_at = drive_in_child(url, cfg.model, requests, cfg.max_concurrency, run.name)
        settle_metrics(worker)
        steps = worker.metrics.steps()
        run.batch_sizes = steps.batch_size.astype(int).tolist()
        run.peak_rss_bytes = max(rss.peak, int(steps.rss_bytes.max()) if len(steps) else 0)
    return run
