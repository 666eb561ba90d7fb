"""TokenGenerationScheduler: ordering, chunked prefill, limits, preemption, cancel, finishing, validation.

The model is faked: the token sampled for a request depends only on its id and position, so a recompute after
preemption must reproduce exactly the outputs a run without preemption would give.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from toolkit.engine.block_manager import BlockManager
from toolkit.engine.request import Sequence, SequenceStatus
from toolkit.engine.scheduler import ScheduledSequence, SchedulerOutput, TokenGenerationScheduler
from toolkit.errors import InvalidRequestError
from toolkit.worker.messages import GenerateRequest

EOS = 0
STOP = 1  # a stop token some property-test requests ask for


def fake_token(request_id: str, position: int) -> int:
    """A deterministic "model": never EOS or STOP."""
    return 2 + zlib.crc32(f"{request_id}:{position}".encode()) % 1000


def req(rid: str, prompt_len: int, max_new: int = 8, **kw: object) -> GenerateRequest:
    return GenerateRequest(rid, [fake_token("prompt", i) for i in range(prompt_len)], max_new, **kw)


def make(num_blocks: int = 64, block_size: int = 4, *, max_batch_size: int = 8, max_batch_tokens: int = 64,
         max_model_len: int = 256, caching: bool = False) -> TokenGenerationScheduler:
    """Prefix caching off unless asked for: every `req` prompt starts alike, so hits would change these shapes."""
    blocks = BlockManager(num_blocks, block_size, enable_caching=caching)
    return TokenGenerationScheduler(blocks, max_batch_size=max_batch_size,
                                    max_batch_tokens=max_batch_tokens, max_model_len=max_model_len,
                                    eos_token_ids=[EOS])


Sampler = Callable[[Sequence], int]


def fake_model(seq: Sequence) -> int:
    return fake_token(seq.request_id, seq.num_tokens)


def step(sched: TokenGenerationScheduler, sample: Sampler = fake_model) -> tuple[SchedulerOutput, list[Sequence]]:
    out = sched.schedule()
    sampled = {s.seq.request_id: sample(s.seq) for s in out.scheduled if s.samples}
    return out, sched.update(out, sampled)


def shape(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(s.seq.request_id, s.start, s.num_tokens) for s in out.scheduled]


def run_to_end(sched: TokenGenerationScheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    outs = []
    while sched.has_work:
        assert len(outs) < max_steps, "scheduler did not finish"
        outs.append(step(sched)[0])
    return outs


def expected_outputs(seq: Sequence, n: int) -> list[int]:
    return [fake_token(seq.request_id, seq.num_prompt_tokens + i) for i in range(n)]


# ---- basic flow ---------------------------------------------------------------------------------


def test_prefill_then_decodes_until_max_new_tokens() -> None:
    sched = make()
    seq = sched.add(req("a", 5, max_new=3))
    assert (sched.num_waiting, sched.num_running, seq.status) == (1, 0, SequenceStatus.WAITING)

    out, finished = step(sched)
    assert shape(out) == [("a", 0, 5)]
    assert out.kind == "prefill" and out.num_prefill_tokens == 5 and out.num_decode_tokens == 0
    assert out.scheduled[0].is_prefill and out.scheduled[0].samples  # still true after update
    assert finished == [] and seq.status is SequenceStatus.RUNNING and seq.num_computed_tokens == 5
    assert seq.block_table == [0, 1] and seq.num_output_tokens == 1

    out, _ = step(sched)
    assert shape(out) == [("a", 5, 1)] and out.kind == "decode" and not out.scheduled[0].is_prefill
    out, finished = step(sched)
    assert finished == [seq] and seq.finish_reason == "length" and seq.status is SequenceStatus.FINISHED
    assert seq.output_token_ids == expected_outputs(seq, 3)
    assert seq.block_table == [] and sched.blocks.num_free_blocks == 64
    assert not sched.has_work and sched.get("a") is None
    assert sched.schedule().is_empty


def test_timing_fields_are_filled() -> None:
    sched = make()
    seq = sched.add(req("a", 3, max_new=4))
    run_to_end(sched)
    assert seq.first_scheduled_time is not None and seq.first_token_time is not None
    assert seq.first_scheduled_time <= seq.first_token_time <= seq.last_token_time == seq.finish_time
    assert seq.itl_sum == pytest.approx(seq.last_token_time - seq.first_token_time)
    assert seq.itl_mean == pytest.approx(seq.itl_sum / 3)


def test_decodes_come_first_then_prefills() -> None:
    sched = make()
    sched.add(req("a", 4))
    sched.add(req("b", 3))
    step(sched)
    sched.add(req("c", 6))
    out, _ = step(sched)
    assert shape(out) == [("a", 4, 1), ("b", 3, 1), ("c", 0, 6)]
    assert [s.is_prefill for s in out.scheduled] == [False, False, True]
    assert out.kind == "mixed" and out.num_decode_tokens == 2 and out.num_prefill_tokens == 6
    assert "mixed" in str(out) and "c[0:6/6 prefill]" in repr(out)


def test_long_prompt_is_chunked_across_steps() -> None:
    sched = make(max_batch_tokens=4)
    a = sched.add(req("a", 10))
    sched.add(req("b", 3))
    outs = [step(sched)[0] for _ in range(4)]
    assert [shape(o) for o in outs] == [
        [("a", 0, 4)],
        [("a", 4, 4)],
        [("a", 8, 2), ("b", 0, 2)],  # a's last chunk, then b admitted with the budget left
        [("a", 10, 1), ("b", 2, 1)],  # a decodes; b's last prompt token is still prefill
    ]
    assert [s.samples for o in outs for s in o.scheduled] == [False, False, True, False, True, True]
    assert outs[3].scheduled[1].is_prefill and outs[3].kind == "mixed"
    assert a.num_output_tokens == 2 and a.output_token_ids == expected_outputs(a, 2)


def test_budget_limits_decodes_oldest_first() -> None:
    sched = make(max_batch_tokens=2)
    for rid in "abcd":
        sched.add(req(rid, 1, max_new=3))
    outs = run_to_end(sched)
    assert all(o.num_prefill_tokens + o.num_decode_tokens <= 2 for o in outs)
    assert [s.seq.request_id for s in outs[0].scheduled] == ["a", "b"]
    assert [s.seq.request_id for s in outs[1].scheduled] == ["a", "b"]  # running first: c and d wait
    assert [s.seq.request_id for s in outs[2].scheduled] == ["a", "b"]
    assert [s.seq.request_id for s in outs[3].scheduled] == ["c", "d"]


def test_batch_size_cap_limits_running() -> None:
    sched = make(max_batch_size=2, max_batch_tokens=100)
    seqs = [sched.add(req(f"r{i}", 3, max_new=2)) for i in range(5)]
    out, _ = step(sched)
    assert shape(out) == [("r0", 0, 3), ("r1", 0, 3)] and sched.num_running == 2 and sched.num_waiting == 3
    outs = [out, *run_to_end(sched)]
    assert all(len(o.scheduled) <= 2 for o in outs)
    assert all(s.finish_reason == "length" and s.num_output_tokens == 2 for s in seqs)


# ---- KV blocks: admission and preemption ----------------------------------------------------------


def test_admission_waits_for_free_blocks() -> None:
    sched = make(num_blocks=4, block_size=4)
    a = sched.add(req("a", 12, max_new=3))
    b = sched.add(req("b", 8, max_new=1))
    c = sched.add(req("c", 1, max_new=1))
    out, _ = step(sched)
    assert shape(out) == [("a", 0, 12)]  # b needs 2 blocks, 1 is free; c would fit but must not overtake b
    assert b.status is SequenceStatus.WAITING and c.status is SequenceStatus.WAITING
    out, _ = step(sched)
    assert shape(out) == [("a", 12, 1)] and sched.blocks.num_free_blocks == 0
    out, finished = step(sched)
    assert shape(out) == [("a", 13, 1)] and finished == [a]
    out, finished = step(sched)
    assert shape(out) == [("b", 0, 8), ("c", 0, 1)] and finished == [b, c]
    assert sched.total_preemptions == 0


def test_preempts_newest_and_recompute_keeps_outputs() -> None:
    sched = make(num_blocks=4, block_size=2)
    a = sched.add(req("a", 3, max_new=5))
    b = sched.add(req("b", 3, max_new=5))
    step(sched)  # both prefill: 2 blocks each, none free
    out, _ = step(sched)  # position 3 still fits each one's second block
    assert shape(out) == [("a", 3, 1), ("b", 3, 1)] and out.preempted == []
    b_outputs = b.output_token_ids
    assert len(b_outputs) == 2

    out, _ = step(sched)  # a needs a third block: b, the newest, is preempted
    assert out.preempted == ["b"] and shape(out) == [("a", 4, 1)]
    assert (b.status, b.num_computed_tokens, b.block_table, b.num_preemptions) == (SequenceStatus.WAITING, 0, [], 1)
    assert b.output_token_ids == b_outputs and sched.total_preemptions == 1
    assert sched.waiting[0] is b
    sched.blocks.check([a, b])

    while a.status is not SequenceStatus.FINISHED:
        out, _ = step(sched)
        assert b.status is SequenceStatus.WAITING  # b's 5 tokens need 3 blocks; a holds at least 3 of 4
    assert a.output_token_ids == expected_outputs(a, 5)

    out, _ = step(sched)
    assert shape(out) == [("b", 0, 5)]  # recompute covers prompt + both outputs
    assert out.scheduled[0].is_prefill and out.scheduled[0].samples
    assert b.output_token_ids[:2] == b_outputs and b.num_output_tokens == 3
    run_to_end(sched)
    assert b.output_token_ids == expected_outputs(b, 5) and b.finish_reason == "length"
    assert sched.blocks.num_free_blocks == 4


def test_newest_preempts_itself_and_stops_scheduling() -> None:
    sched = make(num_blocks=3, block_size=4)
    a = sched.add(req("a", 2))
    b = sched.add(req("b", 8))
    step(sched)  # a: 1 block, b: 2 blocks
    sched.add(req("c", 1))
    out, _ = step(sched)  # a's decode fits its block; b needs a third block and is the newest
    assert shape(out) == [("a", 2, 1)] and out.preempted == ["b"]
    assert [s.request_id for s in sched.waiting] == ["b", "c"]  # preempted goes to the front; nobody admitted
    assert a.status is SequenceStatus.RUNNING and b.num_preemptions == 1


def test_older_request_preempts_several_newer_ones() -> None:
    sched = make(num_blocks=4, block_size=2, max_batch_tokens=2)
    a = sched.add(req("a", 2, max_new=6))
    for rid in "bc":
        sched.add(req(rid, 2, max_new=6))
    step(sched)  # a prefill (2 tokens = budget)
    step(sched)  # a decode, b chunk of 1
    run_to_end(sched)
    assert a.num_preemptions == 0 and a.output_token_ids == expected_outputs(a, 6)
    assert sched.total_preemptions >= 1 and sched.blocks.num_free_blocks == 4


# ---- cancel ---------------------------------------------------------------------------------------


def test_cancel_waiting_and_running_frees_blocks_at_once() -> None:
    sched = make(num_blocks=8, block_size=4, max_batch_size=1)
    a = sched.add(req("a", 9))
    b = sched.add(req("b", 4))
    step(sched)
    assert sched.blocks.num_used_blocks == 3
    assert sched.cancel("b") is b and b.finish_reason == "cancelled" and b.status is SequenceStatus.FINISHED
    assert sched.num_waiting == 0 and sched.get("b") is None
    assert sched.cancel("a") is a and a.finish_reason == "cancelled" and a.finish_time is not None
    assert sched.blocks.num_free_blocks == 8 and a.block_table == [] and not sched.has_work
    assert sched.cancel("a") is None and sched.cancel("nope") is None


def test_cancel_between_schedule_and_update_is_ignored_by_update() -> None:
    sched = make()
    a = sched.add(req("a", 4))
    b = sched.add(req("b", 4))
    out = sched.schedule()
    sched.cancel("a")
    finished = sched.update(out, {"a": 5, "b": 6})
    assert finished == [] and a.num_tokens == 4 and a.num_computed_tokens == 0
    assert b.output_token_ids == [6] and sched.num_running == 1
    sched.blocks.check([b])


def test_request_id_can_be_reused_after_it_finished() -> None:
    sched = make()
    sched.add(req("a", 2))
    sched.cancel("a")
    assert sched.add(req("a", 2)).status is SequenceStatus.WAITING


# ---- finishing ------------------------------------------------------------------------------------


def test_eos_stops() -> None:
    sched = make()
    seq = sched.add(req("a", 3, max_new=10))
    tokens = iter([5, 6, EOS])
    _, finished = step(sched, lambda s: next(tokens))
    step(sched, lambda s: next(tokens))
    _, finished = step(sched, lambda s: next(tokens))
    assert finished == [seq] and seq.finish_reason == "stop" and seq.output_token_ids == [5, 6, EOS]


def test_ignore_eos_keeps_going_until_length() -> None:
    sched = make()
    seq = sched.add(req("a", 3, max_new=4, ignore_eos=True))
    while sched.has_work:
        step(sched, lambda s: EOS)
    assert seq.finish_reason == "length" and seq.output_token_ids == [EOS] * 4


def test_stop_token_ids_stop_even_with_ignore_eos() -> None:
    sched = make()
    seq = sched.add(req("a", 3, max_new=10, stop_token_ids=[42], ignore_eos=True))
    tokens = iter([EOS, 42])
    while sched.has_work:
        step(sched, lambda s: next(tokens))
    assert seq.finish_reason == "stop" and seq.output_token_ids == [EOS, 42]


def test_max_model_len_ends_with_length() -> None:
    sched = make(max_model_len=10)
    seq = sched.add(req("a", 7, max_new=100))
    run_to_end(sched)
    assert seq.finish_reason == "length" and seq.num_tokens == 10 and seq.num_output_tokens == 3


def test_sequence_outgrowing_the_whole_cache_ends_with_length() -> None:
    sched = make(num_blocks=2, block_size=4, max_model_len=100)  # 8 token slots
    seq = sched.add(req("a", 6, max_new=100))
    outs = run_to_end(sched, max_steps=10)
    assert seq.finish_reason == "length" and seq.num_tokens == 9  # positions 0..7 computed, all 8 slots used
    assert max(s.start + s.num_tokens for o in outs for s in o.scheduled) == 8
    assert sched.total_preemptions == 0 and sched.blocks.num_free_blocks == 2


def test_prompt_filling_the_cache_exactly_is_accepted() -> None:
    sched = make(num_blocks=2, block_size=4)
    seq = sched.add(req("a", 8, max_new=5))
    run_to_end(sched, max_steps=3)
    assert seq.finish_reason == "length" and seq.num_output_tokens == 1


def test_finished_leave_running_and_others_continue() -> None:
    sched = make()
    a = sched.add(req("a", 2, max_new=1))
    b = sched.add(req("b", 2, max_new=2))
    _, finished = step(sched)
    assert finished == [a] and sched.running == [b]
    _, finished = step(sched)
    assert finished == [b] and sched.running == []


# ---- validation and display -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (req("a", 0), "empty"),
        (req("a", 16), "max_model_len=16"),
        (req("a", 3, max_new=0), "max_new_tokens"),
    ],
)
def test_invalid_requests_are_refused(request_: GenerateRequest, match: str) -> None:
    sched = make(max_model_len=16)
    with pytest.raises(InvalidRequestError, match=match):
        sched.add(request_)
    assert not sched.has_work


def test_prompt_bigger_than_cache_is_refused() -> None:
    sched = make(num_blocks=2, block_size=4, max_model_len=100)
    with pytest.raises(InvalidRequestError, match="KV cache holds 8 tokens"):
        sched.add(req("a", 9))


def test_duplicate_request_id_is_refused() -> None:
    sched = make()
    sched.add(req("a", 2))
    with pytest.raises(InvalidRequestError, match="already in use"):
        sched.add(req("a", 2))


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        make(max_batch_tokens=0)


def test_repr_shows_queues_and_blocks() -> None:
    sched = make(max_batch_size=1)
    for i in range(13):
        sched.add(req(f"r{i}", 5))
    step(sched)
    text = str(sched)
    assert "running 1/1, waiting 12, 2/64 blocks used" in text
    assert "running r0: running, 5/6 tokens computed (5 prompt + 1 out), blocks [0, 1]" in text
    assert "waiting r1: waiting, 0/5" in text and "waiting r10:" in text and "r11" not in text
    assert repr(sched) == text
    assert repr(ScheduledSequence(sched.running[0], 5, 1)) == "r0[5:6/6 decode]"


# ---- prefix caching -------------------------------------------------------------------------------


def test_shared_prefix_is_computed_once() -> None:
    sched = make(num_blocks=16, block_size=4, caching=True)
    a = sched.add(req("a", 10, max_new=3))
    out, _ = step(sched)
    assert shape(out) == [("a", 0, 10)] and out.num_cache_queries == 10 and out.num_cache_hits == 0
    b = sched.add(req("b", 11, max_new=2))  # the same first 10 tokens: blocks 0 and 1 are full and cached
    out, _ = step(sched)
    assert shape(out) == [("a", 10, 1), ("b", 8, 3)] and (out.num_cache_queries, out.num_cache_hits) == (11, 8)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 8 and a.num_cached_tokens == 0
    assert [sched.blocks.blocks[i].ref_cnt for i in a.block_table] == [2, 2, 1]
    sched.blocks.check([a, b])
    run_to_end(sched)
    assert b.output_token_ids == expected_outputs(b, 2) and a.output_token_ids == expected_outputs(a, 3)
    sched.blocks.check([])


def test_requests_admitted_in_one_step_share_blocks_filled_in_that_step() -> None:
    sched = make(num_blocks=16, block_size=4, caching=True)
    a, b = sched.add(req("a", 9)), sched.add(req("b", 9))
    out, _ = step(sched)
    assert shape(out) == [("a", 0, 9), ("b", 8, 1)] and b.block_table[:2] == a.block_table[:2]
    assert out.num_cache_hits == 8


def test_prompt_of_whole_blocks_recomputes_its_last_block() -> None:
    sched = make(num_blocks=16, block_size=4, caching=True)
    a = sched.add(req("a", 8, max_new=1))
    run_to_end(sched)
    b = sched.add(req("b", 8, max_new=1))
    out, _ = step(sched)
    assert shape(out) == [("b", 4, 4)] and b.num_cached_tokens == 4  # never a hit of all 8: logits need token 7
    assert a.finish_reason == b.finish_reason == "length"


def test_cache_salt_and_opt_out_keep_requests_apart() -> None:
    sched = make(num_blocks=32, block_size=4, caching=True)
    sched.add(req("a", 9, max_new=1))
    run_to_end(sched)
    salted = sched.add(req("s", 9, max_new=1, cache_salt="tenant-1"))
    out, _ = step(sched)
    assert shape(out) == [("s", 0, 9)] and salted.num_cached_tokens == 0
    again = sched.add(req("s2", 9, max_new=1, cache_salt="tenant-1"))
    opted_out = sched.add(req("o", 9, max_new=1, use_prefix_cache=False))
    out, _ = step(sched)
    assert shape(out) == [("s2", 8, 1), ("o", 0, 9)] and again.num_cached_tokens == 8
    assert (out.num_cache_queries, out.num_cache_hits) == (9, 8)  # the opted-out request looked nothing up
    cached_before = set(sched.blocks.cached.values())
    assert not cached_before & set(opted_out.block_table)  # and offered nothing


def test_preempted_request_finds_its_own_blocks() -> None:
    sched = make(num_blocks=6, block_size=2, caching=True)
    a = sched.add(req("a", 5, max_new=3))
    b = sched.add(GenerateRequest("b", [900 + i for i in range(5)], 6))
    step(sched)
    step(sched)
    assert (a.block_table, b.block_table) == ([0, 1, 2], [3, 4, 5]) and sched.blocks.num_free_blocks == 0
    out, finished = step(sched)  # a's position 6 needs a 4th block: b, the newest, goes
    assert out.preempted == ["b"] and shape(out) == [("a", 6, 1)] and finished == [a]
    assert b.num_tokens == 7 and len(b.block_hashes) == 3  # its 3 blocks were full, and stay cached while free
    assert list(sched.blocks.free_queue) == [4, 3, 5, 2, 1, 0]  # b's last block went to a; then a's, last first
    out, _ = step(sched)
    assert shape(out) == [("b", 4, 3)] and b.block_table == [3, 4, 5, 2]  # its own first two blocks were left
    assert (out.num_cache_queries, out.num_cache_hits) == (7, 4) and b.num_cached_tokens == 0  # not first admission
    assert sched.blocks.num_evictions == 2  # b's third block (now a's fourth), then a's third (now b's fourth)
    run_to_end(sched)
    assert b.output_token_ids == expected_outputs(b, 6)


def test_decode_filled_blocks_are_cached_for_the_next_turn() -> None:
    sched = make(num_blocks=32, block_size=4, caching=True)
    turn1 = sched.add(req("t1", 6, max_new=7))
    run_to_end(sched)
    history = turn1.token_ids  # 13 tokens; the last sampled one was never computed
    turn2 = sched.add(GenerateRequest("t2", [*history, 77, 78, 79], 2))
    out, _ = step(sched)
    assert shape(out) == [("t2", 12, 4)] and turn2.num_cached_tokens == 12


def test_failed_admission_leaves_the_hits_alone() -> None:
    sched = make(num_blocks=4, block_size=2, caching=True)
    sched.add(req("a", 5, max_new=1))
    run_to_end(sched)  # a's blocks [0, 1, 2] freed last first: queue [3, 2, 1, 0]; 0 and 1 are full and cached
    x = sched.add(GenerateRequest("x", [500, 501, 502], 2))
    step(sched)
    assert x.block_table == [3, 2] and list(sched.blocks.free_queue) == [1, 0]
    b = sched.add(req("b", 8, max_new=2))
    assert sched.blocks.lookup(b) == [0, 1] and not sched.blocks.can_allocate(b, 4, [0, 1])  # 2 hits + 2 new > 2
    out, finished = step(sched)
    assert shape(out) == [("x", 3, 1)] and finished == [x] and out.num_cache_queries == 0
    assert b.status is SequenceStatus.WAITING and not b.block_table and b.num_computed_tokens == 0
    assert [sched.blocks.blocks[i].ref_cnt for i in (0, 1)] == [0, 0]
    assert list(sched.blocks.free_queue) == [1, 0, 2, 3]  # the hits were neither taken nor moved
    sched.blocks.check([b])
    out, _ = step(sched)  # x has finished: b comes in on its hits (and fills the whole cache: "length")
    assert shape(out) == [("b", 4, 4)] and out.num_cache_hits == 4 and b.num_cached_tokens == 4


# ---- property tests: random arrivals, cancels, shared prefixes and a small cache ---------------------


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    return {
        "block_size": draw(st.integers(1, 4)),
        "num_blocks": draw(st.integers(1, 12)),
        "max_batch_size": draw(st.integers(1, 4)),
        "max_batch_tokens": draw(st.integers(1, 12)),
        "max_model_len": draw(st.integers(2, 40)),
        "eos_rate": draw(st.sampled_from([0, 0, 4, 9])),  # 0: the fake model never says EOS
        "caching": draw(st.sampled_from([True, True, False])),
        "requests": draw(st.lists(
            st.fixed_dictionaries({
                "arrival": st.integers(0, 15),
                "prompt_len": st.integers(0, 24),
                "family": st.integers(0, 1),  # prompts of one family share their first tokens
                "salt": st.sampled_from([None, None, "t1"]),
                "opt_out": st.sampled_from([False, False, False, True]),
                "max_new": st.integers(1, 12),
                "ignore_eos": st.booleans(),
                "stop": st.booleans(),
                "cancel_at": st.none() | st.integers(0, 40),
                "cancel_mid_step": st.booleans(),
            }),
            min_size=1, max_size=10,
        )),
    }


def model_token(request_id: str, position: int, eos_rate: int) -> int:
    """fake_token, with about one token in `eos_rate` turned into EOS or STOP (0: never)."""
    token = fake_token(request_id, position)
    if eos_rate and token % eos_rate == 0:
        return EOS if token % 2 else STOP
    return token


def check_output(sched: TokenGenerationScheduler, out: SchedulerOutput, had_work: bool) -> None:
    blocks = sched.blocks
    assert out.scheduled or not had_work, "idle step while requests wait"
    assert out.num_prefill_tokens + out.num_decode_tokens == sum(s.num_tokens for s in out.scheduled)
    assert out.num_prefill_tokens + out.num_decode_tokens <= sched.max_batch_tokens
    assert len(out.scheduled) <= sched.max_batch_size and sched.num_running <= sched.max_batch_size
    assert len({id(s.seq) for s in out.scheduled}) == len(out.scheduled)
    assert 0 <= out.num_cache_hits <= out.num_cache_queries and (blocks.enable_caching or not out.num_cache_queries)
    kinds = [s.is_prefill for s in out.scheduled]
    assert kinds == sorted(kinds), "a decode after a prefill"
    for s in out.scheduled:
        assert s.seq.status is SequenceStatus.RUNNING and s.seq.request_id not in out.preempted
        assert s.start == s.seq.num_computed_tokens and 1 <= s.num_tokens <= s.seq.num_tokens - s.start
        assert len(s.seq.block_table) == blocks.blocks_for_tokens(s.start + s.num_tokens)
    for rid in out.preempted:
        assert sched.get(rid).status is SequenceStatus.WAITING


class FakeKV:
    """What the runner would leave in each cache slot: the token prefix whose K/V it holds."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.slots: dict[int, tuple[int, ...]] = {}

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def execute(self, out: SchedulerOutput) -> None:
        """Write every scheduled token, then check each sequence attends only to its own prefix's K/V."""
        for s in out.scheduled:
            for p in range(s.start, s.start + s.num_tokens):
                self.slots[self.slot(s.seq, p)] = tuple(s.seq.token_ids[: p + 1])
        for s in out.scheduled:
            for p in range(s.start + s.num_tokens):
                assert self.slots.get(self.slot(s.seq, p)) == tuple(s.seq.token_ids[: p + 1]), (
                    f"{s.seq.request_id} reads stale or foreign K/V at position {p}"
                )


def check_state(sched: TokenGenerationScheduler) -> None:
    blocks = sched.blocks
    blocks.check([*sched.running, *sched.waiting])
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING and seq.num_computed_tokens < seq.num_tokens
        assert len(seq.block_table) == blocks.blocks_for_tokens(seq.num_computed_tokens)
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING and seq.num_computed_tokens == 0 and not seq.block_table


def check_finished(seq: Sequence, spec: dict, sched: TokenGenerationScheduler, eos_rate: int) -> None:
    outputs = seq.output_token_ids
    assert seq.status is SequenceStatus.FINISHED and not seq.block_table
    assert seq.num_cached_tokens % sched.blocks.block_size == 0 and seq.num_cached_tokens < seq.num_prompt_tokens
    assert seq.num_cached_tokens == 0 or (sched.blocks.enable_caching and not spec.get("opt_out"))
    stops = {STOP} if spec["stop"] else set()
    stops |= set() if spec["ignore_eos"] else {EOS}
    assert not stops & set(outputs[:-1]), "kept going after a stop token"
    if seq.finish_reason == "cancelled":
        return
    expected = [model_token(seq.request_id, seq.num_prompt_tokens + i, eos_rate) for i in range(len(outputs))]
    assert outputs == expected, "outputs lost, repeated or changed across preemption"
    if seq.finish_reason == "stop":
        assert outputs[-1] in stops
        return
    assert seq.finish_reason == "length"
    room = min(spec["max_new"], sched.max_model_len - seq.num_prompt_tokens,
               sched.blocks.capacity_tokens + 1 - seq.num_prompt_tokens)
    assert len(outputs) == room


def scenario_request(rid: str, spec: dict) -> GenerateRequest:
    # Two-letter prompts: equal blocks behind different prefixes are common, so a hash that forgot its parent would
    # hand out foreign K/V (FakeKV catches that).
    prompt = [2 + fake_token(f"family{spec.get('family', 0)}", i) % 2 for i in range(spec["prompt_len"])]
    return GenerateRequest(rid, prompt, spec["max_new"], ignore_eos=spec["ignore_eos"],
                           stop_token_ids=[STOP] if spec["stop"] else [], cache_salt=spec.get("salt"),
                           use_prefix_cache=not spec.get("opt_out", False))


def simulate(sc: dict) -> tuple[int, int]:
    """Run the scenario to the end, checking invariants after every step; returns (steps, prefix-cache hit tokens)."""
    sched = make(sc["num_blocks"], sc["block_size"], max_batch_size=sc["max_batch_size"],
                 max_batch_tokens=sc["max_batch_tokens"], max_model_len=sc["max_model_len"],
                 caching=sc.get("caching", False))
    kv = FakeKV(sc["block_size"])
    eos_rate = sc["eos_rate"]
    specs = {f"r{i}": spec for i, spec in enumerate(sc["requests"])}
    seqs: dict[str, Sequence] = {}
    cancelled: set[str] = set()
    last_event = max(max(s["arrival"], s["cancel_at"] or 0) for s in specs.values())

    def cancels(t: int, mid_step: bool) -> None:
        for rid, spec in specs.items():
            if spec["cancel_at"] == t and spec["cancel_mid_step"] == mid_step and sched.cancel(rid) is not None:
                cancelled.add(rid)

    t = hits = 0
    while t <= last_event or sched.has_work:
        assert t < 2000, "simulation did not end"
        for rid, spec in specs.items():
            if spec["arrival"] == t:
                prompt = spec["prompt_len"]
                refused = prompt == 0 or prompt >= sc["max_model_len"] or prompt > sched.blocks.capacity_tokens
                r = scenario_request(rid, spec)
                if refused:
                    with pytest.raises(InvalidRequestError):
                        sched.add(r)
                else:
                    seqs[rid] = sched.add(r)
        cancels(t, mid_step=False)
        had_work = sched.has_work
        out = sched.schedule()
        check_output(sched, out, had_work)
        hits += out.num_cache_hits
        kv.execute(out)  # the engine runs the forward right after schedule(); cancels only come between steps
        cancels(t, mid_step=True)
        sampled = {s.seq.request_id: model_token(s.seq.request_id, s.seq.num_tokens, eos_rate)
                   for s in out.scheduled if s.samples}
        for seq in sched.update(out, sampled):
            assert seq.finish_reason in ("stop", "length")
        check_state(sched)
        t += 1

    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks
    sched.blocks.check([])
    for rid, seq in seqs.items():
        check_finished(seq, specs[rid], sched, eos_rate)
        assert (seq.finish_reason == "cancelled") == (rid in cancelled)
    return t, hits


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_workloads_keep_invariants_and_finish(sc: dict) -> None:
    _, hits = simulate(sc)
    event(f"prefix cache hits: {'some' if hits else 'none'}")


@settings(max_examples=25, deadline=None, database=None)
@given(st.integers(0, 10_000), st.booleans())
def test_heavy_load_on_a_tiny_cache_finishes(seed: int, caching: bool) -> None:
    """Many long requests at once on 6 blocks: lots of preemption, yet everything ends with full outputs."""
    import random

    rng = random.Random(seed)
    sc = {
        "block_size": 2, "num_blocks": 6, "max_batch_size": 4, "max_batch_tokens": 5, "max_model_len": 64,
        "eos_rate": 0, "caching": caching,
        "requests": [
            {"arrival": rng.randint(0, 3), "prompt_len": rng.randint(1, 8), "family": rng.randint(0, 1),
             "max_new": rng.randint(1, 8), "ignore_eos": False, "stop": False, "cancel_at": None,
             "cancel_mid_step": False}
            for _ in range(12)
        ],
    }
    steps, hits = simulate(sc)
    assert steps < 400
    event(f"prefix cache hits: {'some' if hits else 'none'}")


def test_heavy_load_with_shared_prefixes_hits_and_evicts() -> None:
    """One fixed heavy run: the property above does exercise hits, evictions and preemption together."""
    spec = {"arrival": 0, "prompt_len": 7, "family": 0, "max_new": 6, "ignore_eos": False, "stop": False,
            "cancel_at": None, "cancel_mid_step": False}
    sc = {"block_size": 2, "num_blocks": 8, "max_batch_size": 4, "max_batch_tokens": 6, "max_model_len": 64,
          "eos_rate": 0, "caching": True, "requests": [{**spec, "arrival": i // 3} for i in range(9)]}
    _, hits = simulate(sc)
    assert hits >= 6 * 8  # the 8 later requests each hit at least 3 blocks
