"""The real scheduler with a fake model: who runs in each step, for pictures and sliders (pure Python, no torch).

`simulate` drives `TokenGenerationScheduler` and its `BlockManager` exactly as the engine does, but the "model"
samples a constant token, so a whole run takes milliseconds and a notebook can redo it on every slider move.
The `Trace` it returns says, for every step, what state each request was in and how many of its tokens ran.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from toolkit.engine.block_manager import BlockManager
from toolkit.engine.scheduler import TokenGenerationScheduler
from toolkit.errors import InvalidRequestError
from toolkit.validation import check_prompt_length
from toolkit.worker.messages import GenerateRequest

WAITING, PREFILL, DECODE, PREEMPTED = "waiting", "prefill", "decode", "preempted"
STATES = (WAITING, PREFILL, DECODE, PREEMPTED)  # PREEMPTED: back in the queue after losing its blocks
FAKE_TOKEN = 7
MAX_MODEL_LEN = 1 << 20  # the cache, not the model, bounds a simulated sequence


@dataclass(frozen=True, slots=True)
class SimRequest:
    """A request for the simulation: its prompt (ids, or distinct ids of `prompt_tokens`), output length, arrival."""

    name: str
    prompt_tokens: int
    new_tokens: int
    arrival_step: int = 0
    prompt: tuple[int, ...] = ()  # give equal leading ids to two requests to share a cached prefix

    def token_ids(self, index: int) -> list[int]:
        """The prompt ids: `prompt` if given, else ids no other request uses (so nothing is shared by chance)."""
        return list(self.prompt) if self.prompt else [10_000 * (index + 1) + i for i in range(self.prompt_tokens)]


@dataclass(slots=True)
class Trace:
    """One simulated run, step by step; `scheduler` is left as the run ended (or at `stop_after`)."""

    names: list[str]
    scheduler: TokenGenerationScheduler
    states: list[dict[str, str]] = field(default_factory=list)  # per step: request -> one of STATES (absent: idle)
    tokens: list[dict[str, int]] = field(default_factory=list)  # per step: request -> tokens computed
    preempted: list[list[str]] = field(default_factory=list)  # per step: requests preempted at its start
    kv_blocks_used: list[int] = field(default_factory=list)  # per step, while it runs
    cache_hits: list[int] = field(default_factory=list)  # per step: prompt tokens found in the prefix cache

    @property
    def num_steps(self) -> int:
        return len(self.states)

    @property
    def num_preemptions(self) -> int:
        return sum(len(p) for p in self.preempted)

    def batch_sizes(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def occupancy(self) -> list[float]:
        """Sequences in each step / max_batch_size, as the dashboard's occupancy panel defines it."""
        return [n / self.scheduler.max_batch_size for n in self.batch_sizes()]

    def kv_usage(self) -> list[float]:
        return [n / self.scheduler.blocks.num_blocks for n in self.kv_blocks_used]

    def steps_of(self, name: str, state: str) -> list[int]:
        """The steps in which request `name` was in `state`."""
        return [i for i, states in enumerate(self.states) if states.get(name) == state]


def simulate(
    requests: Iterable[SimRequest],
    *,
    max_batch_size: int = 4,
    max_batch_tokens: int = 64,
    num_kv_blocks: int = 64,
    block_size: int = 4,
    static: bool = False,
    enable_caching: bool = True,  # as Settings.enable_prefix_caching
    stop_after: int | None = None,
    max_steps: int = 10_000,
) -> Trace:
    """Run `requests` through the scheduler until all finish (or `stop_after` steps); returns the Trace.

    static=True is static batching: a new batch of up to `max_batch_size` arrived requests is admitted only when
    the previous batch has completely finished. InvalidRequestError for a request the cache could never hold.
    """
    reqs = list(requests)
    if len({r.name for r in reqs}) != len(reqs):
        raise InvalidRequestError("simulated requests need distinct names")
    for r in reqs:
        if r.new_tokens < 1 or r.arrival_step < 0 or (not r.prompt and r.prompt_tokens < 1):
            raise InvalidRequestError(f"{r.name}: need new_tokens >= 1, arrival_step >= 0 and a non-empty prompt")
    blocks = BlockManager(num_kv_blocks, block_size, enable_caching=enable_caching)
    scheduler = TokenGenerationScheduler(blocks, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                                         max_model_len=MAX_MODEL_LEN, eos_token_ids=[])
    pending = sorted(((r, GenerateRequest(r.name, r.token_ids(i), r.new_tokens, ignore_eos=True))
                      for i, r in enumerate(reqs)), key=lambda pair: pair[0].arrival_step)
    for _, request in pending:  # refuse up front what could never run, by the engine's own rule
        check_prompt_length(len(request.prompt_token_ids), max_model_len=MAX_MODEL_LEN,
                            kv_cache_tokens=blocks.capacity_tokens, request_id=request.request_id)
    trace = Trace([r.name for r in reqs], scheduler)
    step = 0
    while pending or scheduler.has_work:
        if step >= max_steps or (stop_after is not None and step >= stop_after):
            if stop_after is None:
                raise RuntimeError(f"simulation did not finish in {max_steps} steps")
            break
        arrived = [pair for pair in pending if pair[0].arrival_step <= step]
        if static:
            arrived = arrived[:max_batch_size] if not scheduler.has_work else []
        for pair in arrived:
            scheduler.add(pair[1])
            pending.remove(pair)
        _step(scheduler, trace, [p[0].name for p in pending if p[0].arrival_step <= step])
        step += 1
    return trace


def _step(scheduler: TokenGenerationScheduler, trace: Trace, held_back: Sequence[str]) -> None:
    """One scheduler step with the fake model, recorded in `trace`; `held_back`: arrived but not admitted (static)."""
    out = scheduler.schedule()
    states = dict.fromkeys(held_back, WAITING)
    for seq in scheduler.waiting:
        states[seq.request_id] = PREEMPTED if seq.num_preemptions else WAITING
    tokens: dict[str, int] = {}
    for s in out.scheduled:
        states[s.seq.request_id] = PREFILL if s.is_prefill else DECODE
        tokens[s.seq.request_id] = s.num_tokens
    trace.states.append(states)
    trace.tokens.append(tokens)
    trace.preempted.append(list(out.preempted))
    trace.kv_blocks_used.append(scheduler.blocks.num_used_blocks)
    trace.cache_hits.append(out.num_cache_hits)
    scheduler.update(out, {s.seq.request_id: FAKE_TOKEN for s in out.scheduled if s.samples})
