"""Paged KV-cache accounting: which fixed-size block of cache slots belongs to which request.

Pure Python, no torch: the K/V tensors live in the runner, indexed by the block ids handed out here.
A sequence's `block_table[i]` holds the slots of its tokens `i*block_size .. (i+1)*block_size - 1`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from toolkit.engine.request import Sequence


class OutOfBlocksError(RuntimeError):
    """`allocate` was asked for more blocks than are free: a scheduler bug, never a user error."""


class BlockManager:
    """A free list of block ids plus an owner map, so leaks and double use are detectable."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.owners: dict[int, str] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one sequence can hold if it has the whole cache to itself."""
        return self.num_blocks * self.block_size

    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 .. 1.0 (vLLM's kv_cache_usage)."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks `seq` needs so that its computed tokens plus `num_new_tokens` all have a slot."""
        total = self.blocks_for_tokens(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Append enough block ids to `seq.block_table` for `num_new_tokens` more tokens."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self.free_blocks):
            raise OutOfBlocksError(
                f"{seq.request_id} needs {needed} blocks, only {len(self.free_blocks)} of {self.num_blocks} free"
            )
        for _ in range(needed):
            block = self.free_blocks.popleft()
            self.owners[block] = seq.request_id
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Give back every block of `seq` (finish, cancel or preemption) and clear its table."""
        for block in seq.block_table:
            if self.owners.pop(block, None) != seq.request_id:
                raise AssertionError(f"block {block} in {seq.request_id}'s table is not owned by it")
            self.free_blocks.append(block)
        seq.block_table.clear()

    def check(self, seqs: Iterable[Sequence] | None = None) -> None:
        """Assert the books balance: every block is either free or owned once; with `seqs`, tables match owners."""
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is on the free list twice"
        assert free.isdisjoint(self.owners), f"blocks both free and owned: {sorted(free & self.owners.keys())}"
        assert free | self.owners.keys() == set(range(self.num_blocks)), "a block is neither free nor owned"
        if seqs is None:
            return
        seen: dict[int, str] = {}
        for seq in seqs:
            for block in seq.block_table:
                assert block not in seen, f"block {block} is in the tables of {seen[block]} and {seq.request_id}"
                seen[block] = seq.request_id
        assert seen == self.owners, "block tables and the owner map disagree"

    def __repr__(self) -> str:
        return (
            f"BlockManager({self.num_used_blocks}/{self.num_blocks} blocks used, "
            f"block_size={self.block_size}, usage={self.usage():.0%})"
        )
