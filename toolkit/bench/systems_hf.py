"""The transformers baselines, on the very weights the worker serves (toolkit.models.load).

hf-sequential: `model.generate` one request at a time. hf-static: `generate` on left-padded batches in arrival
order. hf-cb: transformers' ContinuousBatchingManager, given the same step limits and KV memory as the toolkit.
EOS is ignored everywhere: `min_new_tokens = max_new_tokens` for generate, `eos_token_id=-1` for CB.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch

from .config import BenchConfig
from .drivers import drive_async, drive_steps
from .memory import RssSampler
from .records import RequestRecord, SystemRun
from .workloads import BenchRequest, warmup_requests


def load_model(cfg: BenchConfig, run: SystemRun) -> tuple[Any, Any]:
    from transformers.utils import logging as hf_logging

    from toolkit import models

    hf_logging.set_verbosity_error()  # generation-config warnings would drown the progress bars
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loading = time.perf_counter()
    model, tokenizer = models.load(cfg.model, cfg.device, cfg.dtype)
    run.load_s = time.perf_counter() - loading
    return model, tokenizer


def pad_token_id(model: Any, tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, model.generation_config.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


class StepTimes:
    """A generate() streamer that only notes when each decoding step's tokens exist (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


class GenerateStepper:
    """Each step takes up to `batch_size` waiting requests and runs one left-padded `generate` over them."""

    def __init__(self, model: Any, pad_id: int, batch_size: int) -> None:
        self.model = model
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.queue: deque[tuple[BenchRequest, RequestRecord]] = deque()
        self.batch_sizes: list[int] = []

    def add(self, request: BenchRequest, record: RequestRecord) -> None:
        self.queue.append((request, record))

    @property
    def has_work(self) -> bool:
        return bool(self.queue)

    def step(self) -> None:
        batch = [self.queue.popleft() for _ in range(min(self.batch_size, len(self.queue)))]
        width = max(len(r.prompt_ids) for r, _ in batch)
        steps = max(r.output_len for r, _ in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (request, _) in enumerate(batch):
            input_ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            mask[row, width - len(request.prompt_ids):] = 1
        timer = StepTimes()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=self.pad_id, streamer=timer,
            )
        produced = out.shape[1] - width
        for request, record in batch:
            for when in timer.times[: min(produced, request.output_len)]:
                record.add_chunk(1, when)
            record.done = True
        self.batch_sizes.extend([len(batch)] * len(timer.times))


def run_generate(name: str, batch_size: int, cfg: BenchConfig, requests: Sequence[BenchRequest]) -> SystemRun:
    run = SystemRun(name)
    model, tokenizer = load_model(cfg, run)
    pad_id = pad_token_id(model, tokenizer)
    drive_steps(GenerateStepper(model, pad_id, batch_size), warmup_requests(requests, cfg.warmup), None, name, False)
    stepper = GenerateStepper(model, pad_id, batch_size)
    with RssSampler() as rss:
        run.records, run.started_at = drive_steps(stepper, requests, cfg.max_concurrency, name)
    run.batch_sizes = stepper.batch_sizes
    run.peak_rss_bytes = rss.peak
    return run


def run_hf_sequential(cfg: BenchConfig, requests: Sequence[BenchRequest]) -> SystemRun:
    return run_generate("hf-sequential", 1, cfg, requests)


def run_hf_static(cfg: BenchConfig, requests: Sequence[BenchRequest]) -> SystemRun:
    return run_generate("hf-static", cfg.static_batch_size, cfg, requests)


# ---- transformers' continuous batching --------------------------------------------------------------------------


def start_cb(model: Any, cfg: BenchConfig, pad_id: int) -> Any:
    """A started ContinuousBatchingManager, greedy, EOS off, with per-step batch sizes recorded on `.bench_sizes`."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from toolkit.layers.kv_cache import num_blocks_for_budget

    generation = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=-1, pad_token_id=pad_id)
    num_blocks = num_blocks_for_budget(model.config, cfg.cb_page_size, model.dtype, cfg.kv_cache_gib)  # same memory
    cb_config = ContinuousBatchingConfig(
        page_size=cfg.cb_page_size, num_blocks=num_blocks,
        max_batch_tokens=cfg.max_batch_tokens, max_requests_per_batch=cfg.max_batch_size,
    )
    manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=cb_config)
    manager.bench_sizes = []
    generation_step = manager._generation_step

    def counted_step() -> None:  # runs on the manager's thread: note how many requests each forward carried
        generation_step()
        io = getattr(manager.batch_processor, "inputs_and_outputs", None)
        manager.bench_sizes.append(getattr(io, "num_request_in_batch", 0))

    manager._generation_step = counted_step
    with torch.inference_mode():  # the manager's thread inherits the caller's inference mode: give it the fast one
        manager.start()
    return manager


class CBStreamer:
    """Streams one request through the manager: a result handler on our loop, a fresh id per request."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    async def stream(self, request: BenchRequest) -> AsyncIterator[int]:
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        rid = f"bench-{request.index}"
        self.manager.register_result_handler(rid, outputs.put_nowait)
        self.manager.add_request(request.prompt_ids, request_id=rid, max_new_tokens=request.output_len,
                                 streaming=True, eos_token_id=-1)
        seen = 0
        while True:
            out = await asyncio.wait_for(outputs.get(), timeout=600)
            if out.error is not None:
                raise RuntimeError(f"hf-cb request {rid} failed: {out.error}")
            if len(out.generated_tokens) > seen:
                yield len(out.generated_tokens) - seen
                seen = len(out.generated_tokens)
            if out.is_finished():
                return


def run_hf_cb(cfg: BenchConfig, requests: Sequence[BenchRequest]) -> SystemRun:
    run = SystemRun("hf-cb")
    model, tokenizer = load_model(cfg, run)
    manager = start_cb(model, cfg, pad_token_id(model, tokenizer))
    try:
        streamer = CBStreamer(manager)
        drive_async(streamer, warmup_requests(requests, cfg.warmup), None, "hf-cb", progress=False)
        manager.bench_sizes.clear()
        with RssSampler() as rss:
            run.records, run.started_at = drive_async(streamer, requests, cfg.max_concurrency, "hf-cb")
        run.batch_sizes = list(manager.bench_sizes)
        run.peak_rss_bytes = rss.peak
    finally:
        manager.stop(block=True, timeout=30)
        manager.destroy()
    return run
