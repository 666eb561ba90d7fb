"""Continuous batching, vLLM V1 style: who runs this step, and how many of their tokens (pure Python, no torch).

One rule covers prefill, chunked prefill, decode and recompute: every running sequence moves `num_computed_tokens`
toward `num_tokens`, within a per-step token budget and sequence cap; running sequences first (oldest first), then
waiting ones (FIFO). When KV blocks run out the newest running sequence is preempted and later recomputed from its
prompt plus outputs. The oldest running sequence can always preempt everyone else, so every request makes progress.

With prefix caching, admission first looks up the longest cached prefix (whole blocks, never the last token) and
starts `num_computed_tokens` there; a preempted request that comes back finds its own blocks unless they were evicted.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from toolkit.engine.block_manager import BlockManager
from toolkit.engine.request import Sequence, SequenceStatus
from toolkit.errors import InvalidRequestError
from toolkit.validation import check_prompt_length, max_sequence_tokens
from toolkit.worker.messages import GenerateRequest


@dataclass(slots=True)
class ScheduledSequence:
    """This step computes `seq.token_ids[start:start+num_tokens]` at positions `start .. start+num_tokens-1`."""

    seq: Sequence
    start: int
    num_tokens: int
    seq_len: int = -1  # seq.num_tokens when scheduled, so the properties below still hold after `update`

    def __post_init__(self) -> None:
        if self.seq_len < 0:
            self.seq_len = self.seq.num_tokens

    @property
    def samples(self) -> bool:
        """This step reaches the sequence's last token, so it yields a new one."""
        return self.start + self.num_tokens == self.seq_len

    @property
    def is_prefill(self) -> bool:
        """Anything but a plain decode (exactly the last token, past the prompt): prompt chunks and recomputes."""
        return not (self.num_tokens == 1 and self.samples and self.start >= self.seq.num_prompt_tokens)

    def __repr__(self) -> str:
        kind = "prefill" if self.is_prefill else "decode"
        return f"{self.seq.request_id}[{self.start}:{self.start + self.num_tokens}/{self.seq_len} {kind}]"


@dataclass(slots=True)
class SchedulerOutput:
    """One step's batch: decodes first, then prefills (the last of which may be a chunk)."""

    scheduled: list[ScheduledSequence]
    preempted: list[str]
    num_prefill_tokens: int
    num_decode_tokens: int
    num_cache_queries: int = 0  # tokens of the sequences admitted this step that looked up the prefix cache
    num_cache_hits: int = 0  # of those, tokens found there

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def kind(self) -> str:
        if self.num_prefill_tokens and self.num_decode_tokens:
            return "mixed"
        return "prefill" if self.num_prefill_tokens else "decode"

    def __repr__(self) -> str:
        preempted = f", preempted {self.preempted}" if self.preempted else ""
        return (f"SchedulerOutput({self.kind}: {len(self.scheduled)} seqs, {self.num_prefill_tokens} prefill + "
                f"{self.num_decode_tokens} decode tokens{preempted}: {self.scheduled})")


class TokenGenerationScheduler:
    """Decides each step's batch and applies its sampled tokens; owns the waiting and running queues."""

    def __init__(self, blocks: BlockManager, *, max_batch_size: int, max_batch_tokens: int, max_model_len: int,
                 eos_token_ids: Iterable[int]) -> None:
        if max_batch_size < 1 or max_batch_tokens < 1 or max_model_len < 2:
            raise ValueError("need max_batch_size >= 1, max_batch_tokens >= 1 and max_model_len >= 2")
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest admitted first; the newest is the preemption victim
        self.total_preemptions = 0
        self._active: dict[str, Sequence] = {}

    def add(self, request: GenerateRequest) -> Sequence:
        """Queue a request, refusing ones that could never run rather than letting them wait forever."""
        self._validate(request)
        seq = Sequence.from_request(request)
        self.waiting.append(seq)
        self._active[seq.request_id] = seq
        return seq

    def _validate(self, request: GenerateRequest) -> None:
        if request.request_id in self._active:
            raise InvalidRequestError(f"request {request.request_id!r}: its id is already in use")
        check_prompt_length(len(request.prompt_token_ids), max_model_len=self.max_model_len,
                            kv_cache_tokens=self.blocks.capacity_tokens, request_id=request.request_id)
        if request.max_new_tokens < 1:
            raise InvalidRequestError(
                f"request {request.request_id!r}: max_new_tokens must be >= 1, got {request.max_new_tokens}"
            )

    def cancel(self, request_id: str, reason: str = "cancelled") -> Sequence | None:
        """Drop a waiting or running request now, freeing its blocks; None if it is unknown or already done.

        `reason` is its finish_reason: "cancelled", or "error" when the step that ran it failed.
        """
        seq = self._active.get(request_id)
        if seq is None:
            return None
        (self.running if seq.status is SequenceStatus.RUNNING else self.waiting).remove(seq)
        self._finish(seq, reason)
        return seq

    def get(self, request_id: str) -> Sequence | None:
        return self._active.get(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's batch: running sequences first, then admit waiting ones if nothing was preempted."""
        scheduled: list[ScheduledSequence] = []
        preempted: list[str] = []
        budget = self._schedule_running(scheduled, preempted, self.max_batch_tokens)
        queries = hits = 0
        if not preempted:
            queries, hits = self._admit_waiting(scheduled, budget)
        decodes = [s for s in scheduled if not s.is_prefill]
        prefills = [s for s in scheduled if s.is_prefill]
        return SchedulerOutput(
            decodes + prefills, preempted, sum(s.num_tokens for s in prefills), len(decodes), queries, hits
        )

    def _schedule_running(self, scheduled: list[ScheduledSequence], preempted: list[str], budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0 and len(scheduled) < self.max_batch_size:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._make_room(seq, n, preempted):
                break  # seq was the newest and preempted itself
            scheduled.append(self._take(seq, n))
            budget -= n
            i += 1
        return budget

    def _make_room(self, seq: Sequence, num_tokens: int, preempted: list[str]) -> bool:
        """Preempt the newest running sequences until `seq` has blocks; False if `seq` itself had to go."""
        while not self.blocks.can_allocate(seq, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, scheduled: list[ScheduledSequence], budget: int) -> tuple[int, int]:
        """Admit from the head of the queue while budget, batch and blocks allow; returns (cache queries, hits)."""
        queries = hits = 0
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            cached = self.blocks.lookup(seq)  # looked up again on every try: blocks may be evicted in between
            num_cached = len(cached) * self.blocks.block_size
            n = min(seq.num_tokens - num_cached, budget)
            if not self.blocks.can_allocate(seq, n, cached):
                break  # FIFO: nobody overtakes the head of the queue; the hits stay untouched
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.time()
                seq.num_cached_tokens = num_cached
            if self.blocks.caches(seq):
                queries += seq.num_tokens
                hits += num_cached
            seq.num_computed_tokens = num_cached
            self.running.append(seq)
            scheduled.append(self._take(seq, n, cached))
            budget -= n
        return queries, hits

    def _take(self, seq: Sequence, num_tokens: int, cached: list[int] | None = None) -> ScheduledSequence:
        self.blocks.allocate(seq, num_tokens, cached or ())
        return ScheduledSequence(seq, seq.num_computed_tokens, num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        """Free the blocks and requeue at the front; outputs stay in token_ids, so recompute loses nothing."""
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.total_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Sequence]:
        """Apply a step's results: advance computed tokens, append samples, finish; returns the finished."""
        now = time.time()
        finished: list[Sequence] = []
        for s in output.scheduled:
            seq = s.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # cancelled after it was scheduled
            seq.num_computed_tokens += s.num_tokens
            if not s.samples:
                continue
            seq.append_token(sampled[seq.request_id], now)
            reason = self._finish_reason(seq)
            if reason is not None:
                self._finish(seq, reason, now)
                finished.append(seq)
        if finished:
            self.running = [seq for seq in self.running if seq.status is SequenceStatus.RUNNING]
        return finished

    def _finish_reason(self, seq: Sequence) -> str | None:
        """Why `seq` stops after its newest token, if it does; at `max_sequence_tokens` it could never grow."""
        token, req = seq.token_ids[-1], seq.request
        may_stop = seq.num_output_tokens > req.min_tokens  # min_tokens: EOS and stop tokens do not count yet
        if may_stop and ((token in self.eos_token_ids and not req.ignore_eos) or token in req.stop_token_ids):
            return "stop"
        too_long = seq.num_tokens >= max_sequence_tokens(self.max_model_len, self.blocks.capacity_tokens)
        return "length" if too_long or seq.num_output_tokens >= req.max_new_tokens else None

    def _finish(self, seq: Sequence, reason: str, now: float | None = None) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = time.time() if now is None else now
        del self._active[seq.request_id]

    def __repr__(self) -> str:
        """The queues at a glance for a notebook; only the first 10 waiting are listed."""
        lines = [f"TokenGenerationScheduler(running {len(self.running)}/{self.max_batch_size}, "
                 f"waiting {len(self.waiting)}, {self.blocks.num_used_blocks}/{self.blocks.num_blocks} blocks used, "
                 f"budget {self.max_batch_tokens} tokens/step, {self.total_preemptions} preemptions)"]
        lines += [f"  running {seq}" for seq in self.running]
        lines += [f"  waiting {seq}" for seq in itertools.islice(self.waiting, 10)]
        return "\n".join(lines)
