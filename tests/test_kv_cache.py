"""BlockManager: block arithmetic, allocation, freeing, and the consistency check catching corruption."""

from __future__ import annotations

import pytest

from toolkit.engine.block_manager import BlockManager, OutOfBlocksError
from toolkit.engine.request import Sequence
from toolkit.worker.messages import GenerateRequest


def make_seq(rid: str, prompt_len: int) -> Sequence:
    return Sequence.from_request(GenerateRequest(rid, list(range(1, prompt_len + 1)), max_new_tokens=4))


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
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make_seq("a", 3), make_seq("b", 4)
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage()) == (4, 0, 0.0)
    bm.allocate(a, 3)
    bm.allocate(b, 4)
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage()) == (0, 4, 1.0)
    assert bm.owners == {0: "a", 1: "a", 2: "b", 3: "b"}
    bm.check([a, b])
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 2 and bm.usage() == 0.5
    bm.check([a, b])
    bm.free(b)
    bm.check([a, b])
    assert bm.num_free_blocks == 4 and not bm.owners


def test_allocate_refuses_more_than_free_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    seq = make_seq("a", 5)
    assert not bm.can_allocate(seq, 5)
    with pytest.raises(OutOfBlocksError, match="needs 3 blocks, only 2 of 2 free"):
        bm.allocate(seq, 5)
    assert seq.block_table == [] and bm.num_free_blocks == 2
    assert bm.can_allocate(seq, 4)


def test_freed_blocks_are_reused() -> None:
    bm = BlockManager(num_blocks=2, block_size=1)
    a, b = make_seq("a", 2), make_seq("b", 2)
    bm.allocate(a, 2)
    bm.free(a)
    bm.allocate(b, 2)
    assert sorted(b.block_table) == [0, 1]
    bm.check([a, b])


def test_check_detects_corruption() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a, b = make_seq("a", 2), make_seq("b", 2)
    bm.allocate(a, 2)
    bm.allocate(b, 2)
    bm.check([a, b])
    b.block_table.append(a.block_table[0])  # one block in two tables
    with pytest.raises(AssertionError, match="tables of a and b"):
        bm.check([a, b])
    b.block_table.pop()
    bm.free_blocks.append(a.block_table[0])  # owned and free at once
    with pytest.raises(AssertionError, match="both free and owned"):
        bm.check()
    bm.free_blocks.pop()
    bm.free_blocks.append(bm.free_blocks[0])  # free twice
    with pytest.raises(AssertionError, match="twice"):
        bm.check()


def test_free_refuses_a_block_owned_by_someone_else() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    a, b = make_seq("a", 2), make_seq("b", 2)
    bm.allocate(a, 2)
    b.block_table.append(a.block_table[0])
    with pytest.raises(AssertionError, match="not owned"):
        bm.free(b)


def test_repr_is_readable() -> None:
    bm = BlockManager(num_blocks=4, block_size=16)
    bm.allocate(make_seq("a", 20), 20)
    assert repr(bm) == "BlockManager(2/4 blocks used, block_size=16, usage=50%)"
    assert bm.capacity_tokens == 64
