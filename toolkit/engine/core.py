"""Engine: the in-process token generator that glues TokenGenerationScheduler, BlockManager and ModelRunner.

The worker loop drives it one `step()` at a time; tests and the in-process benchmark call `generate()` directly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import torch

from toolkit import models
from toolkit.engine.block_manager import BlockManager
from toolkit.engine.hardware import choose_max_batch_tokens, hardware_info, set_num_threads
from toolkit.engine.request import Sequence
from toolkit.engine.runner import ModelRunner
from toolkit.engine.scheduler import ScheduledSequence, SchedulerOutput, TokenGenerationScheduler
from toolkit.engine.step_metrics import StepProbe
from toolkit.errors import PrefixCacheBusyError
from toolkit.layers.fused import fuse_projections
from toolkit.layers.kv_cache import num_blocks_for_budget
from toolkit.layers.linear import choose_linear_kernels
from toolkit.settings import Settings
from toolkit.validation import check_token_ids
from toolkit.worker.messages import GenerateRequest, RequestMetrics, StepMetrics, TokenDelta, TokenLogprob

log = logging.getLogger(__name__)


class Engine:
    """Loads (or is given) a model, sizes the paged KV cache, and runs continuous-batching steps.

    The model becomes the engine's: its attention is switched to the paged one, and on CPU in float32 its nn.Linear
    modules may be given faster kernels (`choose_linear_kernels`). torch's thread count is the caller's unless
    `set_threads=True` (the worker process's engine) applies `settings.num_threads` before loading, or
    when that is None the host's choice (`choose_num_threads`); a None `max_batch_tokens` is chosen from a GEMM timed
    here (`choose_max_batch_tokens`). Each knob the host chose is in `auto_knobs` with the reason.
    """

    def __init__(
        self, settings: Settings, *, model: Any = None, tokenizer: Any = None, set_threads: bool = False
    ) -> None:
        # the worker's process is the engine's to configure; an in-process engine leaves threads alone unless asked
        self.auto_knobs: dict[str, str] = set_num_threads(settings.num_threads) if set_threads else {}
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
        self.notes: list[str] = []  # what the engine changed at load, for Ready.notes and the log
        self.max_model_len = self._max_model_len(settings)
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.max_batch_tokens, self.gemm_gflops, knobs = choose_max_batch_tokens(
            settings.max_batch_tokens, model, self.device, self.dtype, settings.max_batch_size)
        self.auto_knobs |= knobs
        self.blocks = BlockManager(self.num_blocks, settings.block_size, enable_caching=settings.enable_prefix_caching)
        self.scheduler = TokenGenerationScheduler(
            self.blocks, max_batch_size=settings.max_batch_size, max_batch_tokens=self.max_batch_tokens,
            max_model_len=self.max_model_len, eos_token_ids=self.eos_token_ids,
        )
        self.runner = ModelRunner(
            model, num_blocks=self.num_blocks, block_size=settings.block_size, device=self.device, dtype=self.dtype,
            eos_token_ids=self.eos_token_ids,
        )
        self.linear_plan = choose_linear_kernels(model)
        self.fused_projections = fuse_projections(model, self.linear_plan)
        self.hardware = hardware_info(self.device, self.dtype)
        self.peak_batch_size = 0
        self._stepping: SchedulerOutput | None = None  # the batch of the step in progress, for fail_scheduled
        self._failures: list[tuple[str, Exception]] = []
        self._arrivals: dict[str, float] = {}
        self._finished: list[RequestMetrics] = []
        self._probe = StepProbe(self.device)

    # ---- what the worker reports ------------------------------------------------------------------

    def ready_info(self) -> dict[str, Any]:
        """The fields of messages.Ready that the engine knows (all but pid, load time and tokenizer dir)."""
        return {
            "model": self.settings.model, "task": "generate", "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."), "num_kv_blocks": self.num_blocks,
            "block_size": self.settings.block_size, "max_model_len": self.max_model_len,
            "vocab_size": self.vocab_size, "eos_token_ids": list(self.eos_token_ids), "notes": list(self.notes),
            "linear_kernel": self.linear_plan.describe(), "num_threads": torch.get_num_threads(), **self.hardware,
            "max_batch_tokens": self.max_batch_tokens, "gemm_gflops": self.gemm_gflops,
            "auto_knobs": dict(self.auto_knobs),
        }

    def _max_model_len(self, settings: Settings) -> int:
        """The model's (or the settings') limit, clamped to a sliding window: our attention is exact only within it."""
        limit = settings.max_model_len or int(self.config.max_position_embeddings)
        window = sliding_window(self.config)
        if window is not None and limit > window:
            note = (f"max_model_len clamped from {limit} to {window}: the model attends over a sliding window of "
                    f"{window} tokens, which the paged attention does not implement past the window")
            log.warning("%s", note)
            self.notes.append(note)
            limit = window
        return limit

    def kv_cache_bytes(self) -> int:
        return self.runner.cache.nbytes()

    @property
    def kv_blocks_used(self) -> int:
        return self.blocks.num_used_blocks

    # ---- requests ---------------------------------------------------------------------------------

    def add(self, req: GenerateRequest) -> None:
        """Queue a request; InvalidRequestError for token ids outside the vocabulary or what the scheduler refuses."""
        check_token_ids(req.prompt_token_ids, self.vocab_size, req.request_id)
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

    def fail_scheduled(self) -> list[str]:
        """After `step()` raised: end the requests of that step (finish_reason "error"); the others go on.

        A step that raised before it chose its batch leaves the queues in doubt, so then every request ends.
        Returns the ids ended, for the caller to report with the exception.
        """
        out, self._stepping = self._stepping, None
        seqs = [s.seq for s in out.scheduled] if out is not None else [*self.scheduler.running, *self.scheduler.waiting]
        return [seq.request_id for seq in seqs if self._end(seq.request_id, "error")]

    def pop_failures(self) -> list[tuple[str, Exception]]:
        """(request_id, exception) of each request that failed in a step since the last call (its delta: "error")."""
        failures, self._failures = self._failures, []
        return failures

    def _end(self, request_id: str, reason: str) -> bool:
        seq = self.scheduler.cancel(request_id, reason)
        if seq is not None:
            self._retire(seq)
        return seq is not None

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
        """Schedule, run one forward, apply the samples: one delta per request that got a token or finished.

        A request whose forward raises ends with finish_reason "error" (details from `pop_failures`); the others
        in its batch go on (see `_execute`).
        """
        probe = self._probe
        probe.start()
        out = self._stepping = self.scheduler.schedule()
        schedule_ms = probe.lap()
        sampled, failed = self._execute(out)
        probe.lap()
        for rid, exc in failed.items():
            self._end(rid, "error")
            self._failures.append((rid, exc))
        finished = self.scheduler.update(out, sampled)
        for seq in finished:
            self._retire(seq)
        update_ms = probe.lap()
        logprobs = self.runner.last_logprobs
        deltas = [
            TokenDelta(rid, [sampled[rid]], s.seq.finish_reason, [logprobs[rid]] if rid in logprobs else None,
                       s.seq.num_cached_tokens if s.seq.num_output_tokens == 1 else 0)
            for s in out.scheduled if (rid := s.seq.request_id) in sampled
        ]
        deltas += [TokenDelta(rid, [], "error") for rid in failed]
        self.peak_batch_size = max(self.peak_batch_size, len(out.scheduled))
        self._stepping = None
        phases = self.runner.timings
        return deltas, probe.finish(
            kind=out.kind, batch_size=len(out.scheduled), prefill_tokens=out.num_prefill_tokens,
            decode_tokens=out.num_decode_tokens, num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running, kv_blocks_used=self.kv_blocks_used, kv_blocks_total=self.num_blocks,
            preemptions=len(out.preempted), output_tokens=len(sampled), schedule_ms=schedule_ms,
            prepare_ms=phases.prepare_ms, forward_ms=phases.forward_ms, sample_ms=phases.sample_ms, update_ms=update_ms,
            prefix_cache_queries=out.num_cache_queries, prefix_cache_hits=out.num_cache_hits,
            kv_blocks_cached=self.blocks.num_cached_blocks,
        )

    def _execute(self, out: SchedulerOutput) -> tuple[dict[str, int], dict[str, Exception]]:
        """The step's forward; if it raises, each sequence again alone, so one bad request fails only itself.

        Rerunning is safe: a sequence's step writes the K/V of the same positions into the same slots again (only a
        seeded request sampled before a failure inside sampling draws anew). Returns the sampled tokens and the
        exception of each failed request.
        """
        try:
            return self.runner.execute(out), {}
        except Exception as exc:
            if len(out.scheduled) == 1:
                log.exception("step failed: %s", out)
                return {}, {out.scheduled[0].seq.request_id: exc}
            log.warning("a step of %d sequences failed (%s: %s); running each alone", len(out.scheduled),
                        type(exc).__name__, exc)
        sampled: dict[str, int] = {}
        failed: dict[str, Exception] = {}
        logprobs: dict[str, TokenLogprob] = {}
        for s in out.scheduled:
            try:
                sampled.update(self.runner.execute(_alone(s)))
                logprobs.update(self.runner.last_logprobs)
            except Exception as exc:
                log.exception("step of %s alone failed", s)
                failed[s.seq.request_id] = exc
        self.runner.last_logprobs = logprobs  # the whole step's, as one execute() would have left them
        return sampled, failed

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
            for _, exc in self.pop_failures():
                self.cancel(pending)
                raise exc
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
        self._finished.append(request_metrics(seq, arrival, self._probe.pid))


def request_metrics(seq: Sequence, arrival: float, pid: int = 0) -> RequestMetrics:
    """queued / time-to-first-token / mean inter-token / end-to-end, all from the request's arrival; nan if never."""
    finish = seq.finish_time or time.time()

    def since(t: float | None) -> float:
        return math.nan if t is None else t - arrival

    return RequestMetrics(
        request_id=seq.request_id, prompt_tokens=seq.num_prompt_tokens, output_tokens=seq.num_output_tokens,
        queued_s=since(seq.first_scheduled_time), ttft_s=since(seq.first_token_time), itl_mean_s=seq.itl_mean,
        e2e_s=finish - arrival, finish_reason=seq.finish_reason or "cancelled", preemptions=seq.num_preemptions,
        pid=pid,
        cached_tokens=seq.num_cached_tokens,
    )


def _alone(s: ScheduledSequence) -> SchedulerOutput:
    """A batch of just `s`, as the scheduler would have built it."""
    prefill = s.is_prefill
    return SchedulerOutput([s], [], s.num_tokens if prefill else 0, 0 if prefill else 1)


def sliding_window(config: Any) -> int | None:
    """The attention window of a model whose layers (some or all) attend only to the last N tokens, else None.

    Mistral sets `sliding_window`; Qwen2-style configs also list which layers slide in `layer_types`.
    """
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


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
