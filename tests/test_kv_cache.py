"""BlockManager: block arithmetic, reference counts, prefix caching with exact block ids and eviction order (in the
spirit of vLLM's tests/v1/core/test_prefix_caching.py), the consistency check, and a stateful property test."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from toolkit.engine.block_manager import BlockManager, OutOfBlocksError, hash_block
from toolkit.engine.request import Sequence
from toolkit.worker.messages import GenerateRequest


def make_seq(rid: str, prompt_len: int) -> Sequence:
    return Sequence.from_request(GenerateRequest(rid, list(range(1, prompt_len + 1)), max_new_tokens=4))


def seq_of(rid: str, tokens: list[int], **kw: object) -> Sequence:
    return Sequence.from_request(GenerateRequest(rid, tokens, max_new_tokens=4, **kw))


def admit(bm: BlockManager, seq: Sequence, num_tokens: int | None = None) -> list[int]:
    """What the scheduler does at admission: look up, start at the hit, allocate the rest; returns the hits."""
    hits = bm.lookup(seq)
    seq.num_computed_tokens = len(hits) * bm.block_size
    n = seq.num_tokens - seq.num_computed_tokens if num_tokens is None else num_tokens
    bm.allocate(seq, n, hits)
    seq.num_computed_tokens += n
    return hits


def snapshot(bm: BlockManager) -> tuple:
    return (list(bm.free_queue), dict(bm.cached), [(b.ref_cnt, b.block_hash) for b in bm.blocks], bm.num_evictions)


# ---- plain paging (caching off) --------------------------------------------------------------------


def test_rejects_empty_cache() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_blocks_needed_rounds_up_and_counts_existing_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq("a", 10)
    assert bm.blocks_needed(seq, 1) == 1
    assert bm.blocks_needed(seq, 4) == 1
    assert bm.blocks_needed(seq, 5) == 2
    assert bm.blocks_needed(seq, 10) == 3
    bm.allocate(seq, 6)  # tokens 0..5 -> 2 blocks
    assert len(seq.block_table) == 2
    seq.num_computed_tokens = 6
    assert bm.blocks_needed(seq, 2) == 0  # slots 6, 7 are in block 1
    assert bm.blocks_needed(seq, 3) == 1
    assert bm.blocks_needed(seq, 0) == 0


def test_allocate_free_and_usage() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_caching=False)
    a, b = make_seq("a", 3), make_seq("b", 4)
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage()) == (4, 0, 0.0)
    bm.allocate(a, 3)
    bm.allocate(b, 4)
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage()) == (0, 4, 1.0)
    assert [blk.ref_cnt for blk in bm.blocks] == [1, 1, 1, 1] and not bm.cached
    bm.check([a, b])
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 2 and bm.usage() == 0.5
    bm.check([a, b])
    bm.free(b)
    bm.check([a, b])
    assert bm.num_free_blocks == 4 and list(bm.free_queue) == [1, 0, 3, 2]  # each table last block first
    assert bm.num_cached_blocks == 0


def test_allocate_refuses_more_than_free_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    seq = make_seq("a", 5)
    assert not bm.can_allocate(seq, 5)
    with pytest.raises(OutOfBlocksError, match="needs 3 blocks, only 2 of 2 free"):
        bm.allocate(seq, 5)
    assert seq.block_table == [] and bm.num_free_blocks == 2 and not bm.cached
    assert bm.can_allocate(seq, 4)


def test_freed_blocks_are_reused() -> None:
    bm = BlockManager(num_blocks=2, block_size=1, enable_caching=False)
    a, b = make_seq("a", 2), make_seq("b", 2)
    bm.allocate(a, 2)
    bm.free(a)
    bm.allocate(b, 2)
    assert b.block_table == [1, 0]
    bm.check([a, b])


def test_check_detects_corruption() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a, b = make_seq("a", 2), make_seq("b", 2)
    bm.allocate(a, 2)
    bm.allocate(b, 2)
    bm.check([a, b])
    b.block_table.append(a.block_table[0])  # a block in two tables with count 1
    with pytest.raises(AssertionError, match="has count 1 but 2 tables hold it"):
        bm.check([a, b])
    b.block_table.pop()
    bm.free_queue[a.block_table[0]] = None  # held and free at once
    with pytest.raises(AssertionError, match="has count 1 but is free"):
        bm.check()
    del bm.free_queue[a.block_table[0]]
    bm.cached[b"stale"] = 2  # the map names a block that caches nothing
    with pytest.raises(AssertionError, match="the map names block 2"):
        bm.check()


def test_free_refuses_a_block_nobody_holds() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    a, b = make_seq("a", 2), make_seq("b", 2)
    bm.allocate(a, 2)
    b.block_table.append(1)  # never allocated
    with pytest.raises(AssertionError, match="not held by anyone"):
        bm.free(b)
    assert b.block_table == [1] and bm.blocks[1].ref_cnt == 0  # nothing was freed


def test_repr_is_readable() -> None:
    bm = BlockManager(num_blocks=4, block_size=16)
    bm.allocate(make_seq("a", 20), 20)
    assert repr(bm) == "BlockManager(2/4 blocks used, 1 cached, block_size=16, usage=50%)"
    assert bm.capacity_tokens == 64


# ---- hashing --------------------------------------------------------------------------------------------


def test_block_hash_chains_parent_tokens_and_salt() -> None:
    root = hash_block(None, [1, 2, 3])
    assert root == hash_block(None, [1, 2, 3]) and len(root) == 32
    assert root != hash_block(None, [1, 2, 4])
    assert root != hash_block(None, [1, 2, 3], salt="tenant")
    assert hash_block(None, [1, 2, 3], salt="a") != hash_block(None, [1, 2, 3], salt="b")
    assert hash_block(root, [7, 7, 7]) != hash_block(hash_block(None, [9, 9, 9]), [7, 7, 7])
    assert hash_block(None, [1, 2, 3], salt="") != root  # an empty salt is still a salt


def test_sequence_hashes_grow_with_its_full_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    seq = seq_of("a", [5, 6, 7], cache_salt="s")
    assert bm.block_hash(seq, 0) == hash_block(None, [5, 6], "s") and len(seq.block_hashes) == 1
    with pytest.raises(ValueError, match="block 1 is not full"):
        bm.block_hash(seq, 1)
    seq.token_ids.append(8)
    assert bm.block_hash(seq, 1) == hash_block(seq.block_hashes[0], [7, 8])  # the salt enters the first block only


# ---- prefix caching with exact block ids ------------------------------------------------------------------

COMMON = [1] * 4 + [2] * 4 + [3] * 4  # three full blocks of 4


def test_prefill_shares_blocks_and_frees_in_eviction_order() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq_of("a", [*COMMON, 8, 8, 8])  # 15 tokens: 3 full blocks + 3 tokens
    assert admit(bm, a) == [] and a.block_table == [0, 1, 2, 3]
    assert [bm.blocks[i].block_hash is not None for i in range(4)] == [True, True, True, False]
    assert bm.cached == {a.block_hashes[i]: i for i in range(3)}

    b = seq_of("b", [*COMMON, 9, 9, 9, 9, 9])  # 17 tokens: shares 3 blocks
    assert admit(bm, b) == [0, 1, 2] and b.block_table == [0, 1, 2, 4, 5]
    assert [bm.blocks[i].ref_cnt for i in range(6)] == [2, 2, 2, 1, 1, 1]
    assert bm.blocks[4].block_hash == b.block_hashes[3] and bm.blocks[5].block_hash is None
    bm.check([a, b])

    bm.free(a)
    assert list(bm.free_queue) == [6, 7, 8, 9, 3]  # only a's private block became free
    bm.free(b)
    assert list(bm.free_queue) == [6, 7, 8, 9, 3, 5, 4, 2, 1, 0]  # b's last block first; the shared head last
    assert bm.num_cached_blocks == 4 and bm.num_used_blocks == 0
    bm.check([a, b])


def test_hits_come_back_from_the_free_queue() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq_of("a", [*COMMON, 8, 8, 8])
    admit(bm, a)
    bm.free(a)
    assert list(bm.free_queue) == [4, 5, 6, 7, 8, 9, 3, 2, 1, 0]
    c = seq_of("c", [*COMMON, 5])
    assert admit(bm, c) == [0, 1, 2] and c.block_table == [0, 1, 2, 4]
    assert list(bm.free_queue) == [5, 6, 7, 8, 9, 3] and bm.num_evictions == 0


def test_decode_fills_and_caches_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = seq_of("a", [1, 2, 3, 4, 5, 6])
    admit(bm, seq)
    assert seq.block_table == [0, 1] and list(bm.cached.values()) == [0]
    for token in (7, 8):  # decode: positions 6, 7 fill block 1
        seq.token_ids.append(token)
        bm.allocate(seq, 1)
        seq.num_computed_tokens += 1
    assert seq.block_table == [0, 1] and list(bm.cached.values()) == [0, 1]
    assert bm.blocks[1].block_hash == hash_block(hash_block(None, [1, 2, 3, 4]), [5, 6, 7, 8])
    seq.token_ids.append(9)
    bm.allocate(seq, 1)
    assert seq.block_table == [0, 1, 2] and bm.num_cached_blocks == 2
    bm.check([seq])


def test_eviction_is_least_recently_freed_first_and_drops_the_hash() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    a = seq_of("a", [1, 1, 2, 2, 3])
    b = seq_of("b", [4, 4, 5, 5, 6])
    admit(bm, a)
    admit(bm, b)
    assert (a.block_table, b.block_table) == ([0, 1, 2], [3, 4, 5])
    bm.free(a)
    bm.free(b)
    assert list(bm.free_queue) == [2, 1, 0, 5, 4, 3] and bm.num_cached_blocks == 4
    c = seq_of("c", [7, 7, 7, 7, 7])  # 3 new blocks: a's partial block, then a's tail, then a's head
    admit(bm, c)
    assert c.block_table == [2, 1, 0] and bm.num_evictions == 2
    assert a.block_hashes[0] not in bm.cached and a.block_hashes[1] not in bm.cached
    assert bm.lookup(seq_of("a2", [1, 1, 2, 2, 3])) == []  # a's prefix is gone
    assert bm.lookup(seq_of("b2", [4, 4, 5, 5, 6])) == [3, 4]  # b's was freed later and survives
    bm.check([c])


def test_blocks_in_use_are_never_evicted() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq_of("a", [1, 1, 2, 2])
    admit(bm, a)  # holds blocks 0, 1 (both cached)
    b = seq_of("b", [3, 3, 4, 4, 5])
    assert not bm.can_allocate(b, 5)
    admit(bm, b, 4)
    assert b.block_table == [2, 3] and a.block_table == [0, 1] and bm.num_evictions == 0
    assert bm.lookup(seq_of("a2", [1, 1, 2, 2, 9])) == [0, 1]


def test_prompt_of_whole_blocks_hits_all_but_the_last_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    first = seq_of("a", COMMON)
    admit(bm, first)
    assert len(bm.cached) == 3
    again = seq_of("b", COMMON)
    assert bm.lookup(again) == [0, 1]  # 12 tokens: the last block is recomputed so its last token has logits
    assert admit(bm, again) == [0, 1] and again.block_table == [0, 1, 3] and again.num_computed_tokens == 12
    assert bm.blocks[3].block_hash is None  # a duplicate of block 2: the map keeps one block per prefix
    bm.check([first, again])
    assert bm.lookup(seq_of("one", [1])) == [] and bm.lookup(seq_of("four", [1, 1, 1, 1])) == []


def test_lookup_stops_at_the_first_miss() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    admit(bm, seq_of("a", [1, 1, 2, 2, 3, 3, 4]))
    assert bm.lookup(seq_of("b", [1, 1, 9, 9, 3, 3, 4])) == [0]  # block 2 equal, but behind another parent


def test_failed_allocation_with_hits_changes_nothing() -> None:
    bm = BlockManager(num_blocks=5, block_size=2)
    a = seq_of("a", [1, 1, 2, 2, 3])
    admit(bm, a)
    bm.free(a)  # blocks 0, 1 cached and free; queue [3, 4, 2, 1, 0]
    hog = seq_of("hog", [9] * 5)
    admit(bm, hog, 4)  # takes 3, 4: queue [2, 1, 0]
    b = seq_of("b", [1, 1, 2, 2, 5, 5, 5, 5, 5])  # hits 0, 1; needs 3 more blocks, only 1 left besides the hits
    hits = bm.lookup(b)
    assert hits == [0, 1] and not bm.can_allocate(b, 5, hits)
    before = snapshot(bm)
    b.num_computed_tokens = 4
    with pytest.raises(OutOfBlocksError, match="needs 5 blocks, only 3 of 5 free"):
        bm.allocate(b, 5, hits)
    assert snapshot(bm) == before and b.block_table == [] and b.num_cached_blocks == 0
    assert bm.can_allocate(b, 1, hits)  # one token more fits: 2 revived hits + 1 new block


def test_hits_only_at_admission() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = seq_of("a", [1, 1, 2])
    admit(bm, a)
    with pytest.raises(ValueError, match="already holds blocks"):
        bm.can_allocate(a, 1, [0])
    b = seq_of("b", [1, 1, 2])
    with pytest.raises(ValueError, match="0 computed tokens but 1 hits"):
        bm.allocate(b, 1, [0])
    assert bm.blocks[0].ref_cnt == 1 and b.block_table == []


def test_duplicate_block_stays_unnamed_and_the_chain_still_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = seq_of("a", [1, 1, 2])
    admit(bm, a)  # block 0 caches [1, 1]
    b = seq_of("b", [1, 1, 2, 2, 3])
    bm.allocate(b, 5)  # computed without looking up: block 2 duplicates block 0
    assert b.block_table == [2, 3, 4] and bm.blocks[2].block_hash is None and bm.blocks[3].block_hash is not None
    bm.check([a, b])
    assert bm.lookup(seq_of("c", [1, 1, 2, 2, 3])) == [0, 3]


def test_salt_and_opt_out() -> None:
    bm = BlockManager(num_blocks=16, block_size=2)
    admit(bm, seq_of("a", [1, 1, 2, 2, 3]))
    assert bm.lookup(seq_of("s", [1, 1, 2, 2, 3], cache_salt="t")) == []
    salted = seq_of("s", [1, 1, 2, 2, 3], cache_salt="t")
    admit(bm, salted)
    assert bm.lookup(seq_of("s2", [1, 1, 2, 2, 3], cache_salt="t")) == salted.block_table[:2]
    private = seq_of("p", [1, 1, 2, 2, 3], use_prefix_cache=False)
    assert bm.lookup(private) == [] and not bm.caches(private)
    cached_before = dict(bm.cached)
    admit(bm, private)
    assert bm.cached == cached_before and private.num_cached_blocks == 0 and private.block_hashes == []


def test_caching_off_hashes_nothing() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_caching=False)
    admit(bm, seq_of("a", [1, 1, 2, 2, 3]))
    b = seq_of("b", [1, 1, 2, 2, 3])
    assert bm.lookup(b) == [] and admit(bm, b) == [] and not bm.cached and b.block_hashes == []
    bm.check()


def test_reset_cache_is_refused_while_blocks_are_in_use() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = seq_of("a", [1, 1, 2, 2, 3])
    admit(bm, a)
    before = snapshot(bm)
    assert bm.reset_cache() is False and snapshot(bm) == before
    bm.free(a)
    assert bm.reset_cache() is True
    assert not bm.cached and all(b.block_hash is None for b in bm.blocks) and bm.num_free_blocks == 8
    assert bm.lookup(seq_of("b", [1, 1, 2, 2, 3])) == []
    bm.check()


# ---- stateful property test ----------------------------------------------------------------------------


class BlockManagerMachine(RuleBasedStateMachine):
    """Random admissions (with hits), chunks, decodes, preemptions, finishes and resets on a small cache.

    `kv` plays the runner: each slot remembers the token prefix whose K/V was written there, so a hit on a
    stale, evicted or foreign block shows up as a sequence reading K/V of another prefix.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(num_blocks=8, block_size=2)
        self.live: list[Sequence] = []
        self.preempted: list[Sequence] = []
        self.kv: dict[int, tuple[int, ...]] = {}
        self.count = 0

    def _slot(self, seq: Sequence, p: int) -> int:
        bs = self.bm.block_size
        return seq.block_table[p // bs] * bs + p % bs

    def _run(self, seq: Sequence, n: int, hits: list[int]) -> None:
        """Allocate (or fail without side effects), then write and read K/V as the runner would."""
        if not self.bm.can_allocate(seq, n, hits):
            before, table = snapshot(self.bm), list(seq.block_table)
            with pytest.raises(OutOfBlocksError):
                self.bm.allocate(seq, n, hits)
            assert snapshot(self.bm) == before and seq.block_table == table
            return
        self.bm.allocate(seq, n, hits)
        start = seq.num_computed_tokens
        for p in range(start, start + n):
            self.kv[self._slot(seq, p)] = tuple(seq.token_ids[: p + 1])
        for p in range(start + n):
            assert self.kv.get(self._slot(seq, p)) == tuple(seq.token_ids[: p + 1]), f"stale K/V at {p}"
        seq.num_computed_tokens += n

    def _admit(self, seq: Sequence, chunk: int) -> None:
        hits = self.bm.lookup(seq)
        assert len(hits) * self.bm.block_size < seq.num_tokens
        before = snapshot(self.bm)
        seq.num_computed_tokens = len(hits) * self.bm.block_size
        n = min(chunk, seq.num_tokens - seq.num_computed_tokens)
        self._run(seq, n, hits)
        if seq.block_table:
            self.live.append(seq)
        else:
            seq.num_computed_tokens = 0
            assert snapshot(self.bm) == before
            self.preempted.append(seq)

    @rule(family=st.integers(0, 2), length=st.integers(1, 12), chunk=st.integers(1, 12), salted=st.booleans(),
          opt_out=st.sampled_from([False, False, False, True]))
    def add(self, family: int, length: int, chunk: int, salted: bool, opt_out: bool) -> None:
        gen = random.Random(family)
        tokens = [gen.choice([2, 3]) for _ in range(length)]
        self.count += 1
        seq = seq_of(f"r{self.count}", tokens, cache_salt="t" if salted else None, use_prefix_cache=not opt_out)
        self._admit(seq, chunk)

    @rule(data=st.data())
    def advance(self, data: st.DataObject) -> None:
        """Next chunk of a partly computed prompt, or a decode (a new token, then its slot)."""
        if not self.live:
            return
        seq = data.draw(st.sampled_from(self.live))
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(data.draw(st.sampled_from([2, 3])))
        n = data.draw(st.integers(1, seq.num_tokens - seq.num_computed_tokens))
        self._run(seq, n, [])

    @rule(data=st.data(), preempt=st.booleans())
    def release(self, data: st.DataObject, preempt: bool) -> None:
        """Finish or cancel (forget it) or preempt (keep it to come back) a live sequence."""
        if not self.live:
            return
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free(seq)
        assert not seq.block_table and seq.num_cached_blocks == 0
        if preempt:
            seq.num_computed_tokens = 0
            self.preempted.append(seq)

    @rule(data=st.data(), chunk=st.integers(1, 12))
    def resume(self, data: st.DataObject, chunk: int) -> None:
        if self.preempted:
            seq = data.draw(st.sampled_from(self.preempted))
            self.preempted.remove(seq)
            self._admit(seq, chunk)

    @rule()
    def reset(self) -> None:
        before = snapshot(self.bm)
        done = self.bm.reset_cache()
        assert done == (not self.live)
        assert (not self.bm.cached) if done else snapshot(self.bm) == before

    @invariant()
    def books_balance(self) -> None:
        self.bm.check([*self.live, *self.preempted])
        assert all(not s.block_table for s in self.preempted)


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
