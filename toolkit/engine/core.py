"""Engine: the in-process token generator that glues TokenGenerationScheduler, BlockManager and ModelRunner.

The worker loop drives it one `step()` at a time; tests and the in-process benchmark call `generate()` directly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import psutil
import torch

from toolkit import models
from toolkit.engine.block_manager import BlockManager
from toolkit.engine.request import Sequence
from toolkit.engine.runner import ModelRunner
from toolkit.engine.scheduler import SchedulerOutput, TokenGenerationScheduler
from toolkit.errors import InvalidRequestError, PrefixCacheBusyError
from toolkit.layers.kv_cache import num_blocks_for_budget
from toolkit.settings import Settings
from toolkit.worker.messages import GenerateRequest, RequestMetrics, StepMetrics, TokenDelta


class Engine:
    """Loads (or is given) a model, sizes the paged KV cache, and runs continuous-batching steps."""

    def __init__(self, settings: Settings, *, model: Any = None, tokenizer: Any = None) -> None:
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        if model is None:
            device = models.resolve_device(settings.device)
            model, tokenizer = models.load(settings.model, device, settings.dtype, settings.cache_dir)
        self.settings = settings
        self.model = model
        self.tokenizer = tokenizer
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.config = model.config.get_text_config()
        self.vocab_size = int(self.config.vocab_size)
        self.num_blocks = settings.num_kv_blocks or num_blocks_for_budget(
            self.config, settings.block_size, self.dtype, settings.kv_cache_gib
        )
        self.max_model_len = settings.max_model_len or int(self.config.max_position_embeddings)
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.blocks = BlockManager(self.num_blocks, settings.block_size, enable_caching=settings.enable_prefix_caching)
        self.scheduler = TokenGenerationScheduler(
            self.blocks, max_batch_size=settings.max_batch_size, max_batch_tokens=settings.max_batch_tokens,
            max_model_len=self.max_model_len, eos_token_ids=self.eos_token_ids,
        )
        self.runner = ModelRunner(
            model, num_blocks=self.num_blocks, block_size=settings.block_size, device=self.device, dtype=self.dtype
        )
        self.start_time = time.time()
        self.peak_batch_size = 0
        self._arrivals: dict[str, float] = {}
        self._finished: list[RequestMetrics] = []
        self._process = psutil.Process()

    # ---- what the worker reports ------------------------------------------------------------------

    def ready_info(self) -> dict[str, Any]:
        """The fields of messages.Ready that the engine knows (all but pid, load time and tokenizer dir)."""
        return {
            "model": self.settings.model, "task": "generate", "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."), "num_kv_blocks": self.num_blocks,
            "block_size": self.settings.block_size, "max_model_len": self.max_model_len,
            "vocab_size": self.vocab_size, "eos_token_ids": list(self.eos_token_ids),
        }

    def kv_cache_bytes(self) -> int:
        return self.runner.cache.nbytes()

    @property
    def kv_blocks_used(self) -> int:
        return self.blocks.num_used_blocks

    # ---- requests ---------------------------------------------------------------------------------

    def add(self, req: GenerateRequest) -> None:
        """Queue a request; InvalidRequestError for token ids outside the vocabulary or what the scheduler refuses."""
        bad = [t for t in req.prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"request {req.request_id!r}: token ids {bad[:5]} are outside the vocabulary of {self.vocab_size}"
            )
        self.scheduler.add(req)
        self._arrivals[req.request_id] = req.arrival_time if req.arrival_time > 0 else time.time()

    def cancel(self, request_ids: Iterable[str]) -> list[TokenDelta]:
        """Stop requests now; one final delta (finish_reason "cancelled") for each that was still active."""
        deltas = []
        for rid in request_ids:
            seq = self.scheduler.cancel(rid)
            if seq is not None:
                self._retire(seq)
                deltas.append(TokenDelta(rid, [], "cancelled"))
        return deltas

    def abort_all(self) -> list[str]:
        """Cancel every waiting and running request (after a failed step); returns their ids.

        The prefix cache goes too: blocks are cached when scheduled, so a failed forward may have left some
        whose K/V was never written.
        """
        ids = [seq.request_id for seq in (*self.scheduler.running, *self.scheduler.waiting)]
        self.cancel(ids)
        self.blocks.reset_cache()
        return ids

    def reset_prefix_cache(self) -> int:
        """Forget every cached prompt block (after a weight change, or for a cold benchmark); returns how many.

        PrefixCacheBusyError while any request is waiting or running, as vLLM refuses with blocks in use.
        """
        if self.has_work:
            raise PrefixCacheBusyError(
                f"cannot reset the prefix cache while {self.scheduler.num_running} requests run and "
                f"{self.scheduler.num_waiting} wait"
            )
        cleared = self.blocks.num_cached_blocks
        if not self.blocks.reset_cache():
            raise PrefixCacheBusyError(f"{self.blocks.num_used_blocks} KV blocks are still in use")
        return cleared

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- stepping ---------------------------------------------------------------------------------

    def step(self) -> tuple[list[TokenDelta], StepMetrics]:
        """Schedule, run one forward, apply the samples: one delta per request that got a token or finished."""
        started = time.perf_counter()
        out = self.scheduler.schedule()
        sampled = self.runner.execute(out)
        forward_ms = (time.perf_counter() - started) * 1000
        finished = self.scheduler.update(out, sampled)
        for seq in finished:
            self._retire(seq)
        deltas = [
            TokenDelta(s.seq.request_id, [sampled[s.seq.request_id]], s.seq.finish_reason,
                       s.seq.num_cached_tokens if s.seq.num_output_tokens == 1 else 0)
            for s in out.scheduled if s.seq.request_id in sampled
        ]
        self.peak_batch_size = max(self.peak_batch_size, len(out.scheduled))
        return deltas, self._step_metrics(out, len(sampled), forward_ms, (time.perf_counter() - started) * 1000)

    def generate(self, requests: Iterable[GenerateRequest]) -> dict[str, list[int]]:
        """Submit all requests at once and step until every one has finished; {request_id: output token ids}."""
        outputs: dict[str, list[int]] = {}
        for req in requests:
            self.add(req)
            outputs[req.request_id] = []
        pending = set(outputs)
        while pending:
            deltas, _ = self.step()
            for delta in deltas:
                outputs[delta.request_id].extend(delta.token_ids)
                if delta.finish_reason is not None:
                    pending.discard(delta.request_id)
        return outputs

    def pop_request_metrics(self) -> list[RequestMetrics]:
        """Timings of the requests finished since the last call."""
        finished, self._finished = self._finished, []
        return finished

    # ---- telemetry ----------------------------------------------------------------------------------

    def _retire(self, seq: Sequence) -> None:
        """A finished or cancelled request: free its sampler state and record its timings."""
        self.runner.release(seq.request_id)
        arrival = self._arrivals.pop(seq.request_id, time.time())
        self._finished.append(request_metrics(seq, arrival))

    def _step_metrics(self, out: SchedulerOutput, sampled: int, forward_ms: float, step_ms: float) -> StepMetrics:
        on_cuda = self.device.type == "cuda"
        return StepMetrics(
            t=time.time() - self.start_time, kind=out.kind, batch_size=len(out.scheduled),
            prefill_tokens=out.num_prefill_tokens, decode_tokens=out.num_decode_tokens, step_ms=step_ms,
            forward_ms=forward_ms, num_waiting=self.scheduler.num_waiting, num_running=self.scheduler.num_running,
            kv_blocks_used=self.kv_blocks_used, kv_blocks_total=self.num_blocks,
            preemptions=len(out.preempted), rss_bytes=self._process.memory_info().rss,
            device_mem_bytes=torch.cuda.memory_allocated(self.device) if on_cuda else 0, output_tokens=sampled,
            prefix_cache_queries=out.num_cache_queries, prefix_cache_hits=out.num_cache_hits,
            kv_blocks_cached=self.blocks.num_cached_blocks,
        )


def request_metrics(seq: Sequence, arrival: float) -> RequestMetrics:
    """queued / time-to-first-token / mean inter-token / end-to-end, all from the request's arrival; nan if never."""
    finish = seq.finish_time or time.time()

    def since(t: float | None) -> float:
        return math.nan if t is None else t - arrival

    return RequestMetrics(
        request_id=seq.request_id, prompt_tokens=seq.num_prompt_tokens, output_tokens=seq.num_output_tokens,
        queued_s=since(seq.first_scheduled_time), ttft_s=since(seq.first_token_time), itl_mean_s=seq.itl_mean,
        e2e_s=finish - arrival, finish_reason=seq.finish_reason or "cancelled", preemptions=seq.num_preemptions,
        cached_tokens=seq.num_cached_tokens,
    )


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids from the generation config and the tokenizer, sorted, without duplicates."""
    ids: set[int] = set()
    generation = getattr(model, "generation_config", None)
    for source in (getattr(generation, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return sorted(ids)
