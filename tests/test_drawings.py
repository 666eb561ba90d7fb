"""The scheduler simulation behind notebook 03's pictures and sliders, and the pictures themselves (matplotlib Agg)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

from toolkit.errors import InvalidRequestError
from toolkit.notebook.drawings import draw_gantt, draw_kv_cache, kv_facts
from toolkit.notebook.simulation import DECODE, PREEMPTED, PREFILL, WAITING, SimRequest, simulate

NEW_TOKENS = [4, 32, 6, 28, 8, 24, 5, 30, 7, 20, 3, 26]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def mixed_lengths() -> list[SimRequest]:
    return [SimRequest(f"r{i}", 8, n) for i, n in enumerate(NEW_TOKENS)]


def test_continuous_batching_needs_fewer_fuller_steps_than_static():
    static, continuous = simulate(mixed_lengths(), static=True), simulate(mixed_lengths())
    # static: three batches of four, each as long as its longest request (1 prefill step + n - 1 decodes)
    assert static.num_steps == 32 + 30 + 26
    assert continuous.num_steps < static.num_steps
    assert sum(continuous.occupancy()) / continuous.num_steps > sum(static.occupancy()) / static.num_steps
    # the same tokens either way: every request decodes new_tokens - 1 times after its prefill step
    for trace in (static, continuous):
        assert [len(trace.steps_of(f"r{i}", DECODE)) for i in range(12)] == [n - 1 for n in NEW_TOKENS]
    # static admits r4 only once r0..r3 are all done; continuous admits it as soon as r0 finishes
    assert static.steps_of("r4", PREFILL) == [32]
    assert continuous.steps_of("r4", PREFILL) == [4]


def test_a_long_prompt_is_prefilled_in_chunks_beside_a_running_decode():
    trace = simulate([SimRequest("short", 3, 12), SimRequest("long", 70, 4, arrival_step=2)],
                     max_batch_tokens=16, num_kv_blocks=12, block_size=8)
    chunks = [trace.tokens[i]["long"] for i in trace.steps_of("long", PREFILL)]
    assert chunks == [15, 15, 15, 15, 10]  # the budget less short's one decode token, then the rest
    assert all(trace.states[i]["short"] == DECODE for i in trace.steps_of("long", PREFILL))
    assert all(sum(t.values()) <= 16 for t in trace.tokens)


def test_a_small_cache_preempts_the_newest_and_everyone_still_finishes():
    trace = simulate([SimRequest(f"p{i}", 20, 40) for i in range(3)], num_kv_blocks=12, block_size=8,
                     max_batch_tokens=32)
    assert trace.num_preemptions > 0
    assert "p0" not in {name for step in trace.preempted for name in step}, "the oldest is never the victim"
    victim_steps = [i for i, names in enumerate(trace.preempted) if names]
    assert any(trace.states[i][name] == PREEMPTED for i in victim_steps for name in trace.preempted[i])
    assert max(trace.kv_blocks_used) <= 12
    assert not trace.scheduler.has_work and trace.scheduler.blocks.num_used_blocks == 0


def test_static_batching_keeps_arrived_requests_waiting_until_the_batch_is_done():
    trace = simulate([SimRequest(f"r{i}", 4, 3) for i in range(3)], max_batch_size=2, static=True)
    assert trace.steps_of("r2", WAITING) == [0, 1, 2]
    assert trace.steps_of("r2", PREFILL) == [3]


def test_prefix_cache_hits_share_physical_blocks_and_the_picture_counts_them():
    shared = tuple(range(100, 113))
    trace = simulate([SimRequest("A", 0, 20, prompt=(*shared, 1, 2, 3)),
                      SimRequest("B", 0, 20, prompt=(*shared, 4, 5), arrival_step=1)],
                     num_kv_blocks=16, block_size=4, enable_caching=True, stop_after=3)
    assert trace.cache_hits == [0, 12, 0]  # B finds A's three full blocks of the shared 13 tokens
    blocks, running = trace.scheduler.blocks, trace.scheduler.running
    a, b = running
    assert a.block_table[:3] == b.block_table[:3] and a.block_table[3] != b.block_table[3]
    facts = kv_facts(blocks, running)
    assert facts.shared == 3 and facts.used == len(set(a.block_table + b.block_table))
    assert facts.free == 16 - facts.used and facts.free_order[0] == facts.used
    ax = draw_kv_cache(blocks, running)
    labels = [t.get_text() for t in ax.texts]
    assert labels.count("x2") == 3 and "f1" in labels
    assert "3 shared" in ax.get_title()


def test_slack_is_what_block_size_allocates_beyond_the_tokens():
    trace = simulate([SimRequest("a", 5, 2)], block_size=8, stop_after=1)
    seq = trace.scheduler.running[0]
    assert kv_facts(trace.scheduler.blocks, [seq]).slot_slack == 8 - 5


def test_the_gantt_chart_draws_every_state_and_marks_preemptions():
    trace = simulate([SimRequest(f"p{i}", 20, 40) for i in range(3)], num_kv_blocks=12, block_size=8,
                     max_batch_tokens=32)
    ax = draw_gantt(trace)
    colours = {tuple(c.get_facecolor()[0]) for c in ax.collections}
    assert len(colours) == 4  # waiting, prefill, decode, preempted all appear
    marks = [line for line in ax.lines if line.get_marker() == "x"]
    assert len(marks) == trace.num_preemptions
    assert [t.get_text() for t in ax.get_yticklabels()] == ["p0", "p1", "p2"]


def test_bad_simulation_input_is_a_typed_error():
    with pytest.raises(InvalidRequestError, match="does not fit"):
        simulate([SimRequest("big", 100, 4)], num_kv_blocks=4, block_size=4)
    with pytest.raises(InvalidRequestError, match="distinct"):
        simulate([SimRequest("a", 4, 4), SimRequest("a", 4, 4)])
    with pytest.raises(InvalidRequestError, match="new_tokens"):
        simulate([SimRequest("a", 4, 0)])
