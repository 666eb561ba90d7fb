"""Paged KV-cache accounting with automatic prefix caching, vLLM V1 style (pure Python, no torch).

The K/V tensors live in the runner, indexed by the block ids handed out here. A sequence's `block_table[i]` holds
the slots of its tokens `i*block_size .. (i+1)*block_size - 1`.

Prefix caching: every full block is named by a hash chained to its parent's (and, for the first block, to the
request's `cache_salt`), so equal hashes mean equal token prefixes and so equal K/V. `cached` maps hash -> block.
Blocks carry a reference count (the live block tables holding them), so requests with a common prefix share its
blocks. A block whose count drops to 0 joins the free queue with its hash kept; it is evicted (its hash dropped)
only when it is handed out again. The free queue is least recently freed first, and a request's blocks are queued
last block first, so the shared head of a prompt outlives its private tail.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Iterable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from toolkit.engine.request import Sequence

BlockHash = bytes


class OutOfBlocksError(RuntimeError):
    """`allocate` was asked for more blocks than are free: a scheduler bug, never a user error."""


def hash_block(parent: BlockHash | None, token_ids: SequenceOf[int], salt: str | None = None) -> BlockHash:
    """sha256 over the parent's hash, the salt and the tokens; each part is tagged so no two encodings coincide."""
    h = hashlib.sha256()
    h.update(b"P" + parent if parent is not None else b"R")
    if salt is not None:
        encoded = salt.encode()
        h.update(b"S" + len(encoded).to_bytes(8, "little") + encoded)
    h.update(b"T" + array("q", token_ids).tobytes())
    return h.digest()


@dataclass(slots=True)
class KVBlock:
    """One block of cache slots: how many block tables hold it, and the prefix it caches (None: nothing reusable)."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


class BlockManager:
    """Block tables, reference counts, the hash -> block map and the free (eviction) queue."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head is evicted first
        self.cached: dict[BlockHash, int] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks no table holds, cached or not: all of them can be handed out."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a reusable prefix, in use or free."""
        return len(self.cached)

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one sequence can hold if it has the whole cache to itself."""
        return self.num_blocks * self.block_size

    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 .. 1.0 (vLLM's kv_cache_usage; free cached blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def caches(self, seq: Sequence) -> bool:
        """Whether `seq` takes part in prefix caching: on for the manager and not opted out by the request."""
        return self.enable_caching and seq.request.use_prefix_cache

    # ---- hashing and lookup -------------------------------------------------------------------------

    def block_hash(self, seq: Sequence, index: int) -> BlockHash:
        """The chained hash of `seq`'s full block `index`, computing (and keeping) the ones before it as needed."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) <= index:
            i = len(hashes)
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            if len(tokens) < bs:
                raise ValueError(f"{seq.request_id}: block {i} is not full ({len(tokens)} of {bs} tokens)")
            salt = seq.request.cache_salt if i == 0 else None  # chained: the first block's salt reaches them all
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens, salt))
        return hashes[index]

    def lookup(self, seq: Sequence) -> list[int]:
        """The cached blocks of `seq`'s longest cached prefix, walking the chain to the first miss; changes nothing.

        Never the whole sequence: its last token must be computed to have logits, so a sequence of exactly
        k full blocks can hit at most k - 1 of them.
        """
        if not self.caches(seq) or seq.block_table:
            return []
        hits: list[int] = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block = self.cached.get(self.block_hash(seq, i))
            if block is None:
                break
            hits.append(block)
        return hits

    # ---- allocation ---------------------------------------------------------------------------------

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks `seq` needs so that its computed tokens plus `num_new_tokens` all have a slot."""
        total = self.blocks_for_tokens(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_table))

    def _cost(self, seq: Sequence, num_new_tokens: int, hits: SequenceOf[int]) -> int:
        """Free blocks that allocate() would take: new ones, plus cached hits that sit in the free queue."""
        if not hits:
            return self.blocks_needed(seq, num_new_tokens)
        if seq.block_table:
            raise ValueError(f"{seq.request_id} already holds blocks; cached hits only come at admission")
        new = self.blocks_for_tokens(len(hits) * self.block_size + num_new_tokens) - len(hits)
        return max(0, new) + sum(self.blocks[b].ref_cnt == 0 for b in hits)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, hits: SequenceOf[int] = ()) -> bool:
        return self._cost(seq, num_new_tokens, hits) <= len(self.free_queue)

    def allocate(self, seq: Sequence, num_new_tokens: int, hits: SequenceOf[int] = ()) -> None:
        """Give `seq` slots for `num_new_tokens` more tokens, starting its table with the cached `hits` (from lookup).

        With hits the caller has already set `seq.num_computed_tokens` to the hit length. Blocks that these tokens
        fill are cached at once: the runner writes a step's K/V before any attention reads it, so a request
        admitted later in the same step may already share them. Refused blocks raise before anything changes.
        """
        cost = self._cost(seq, num_new_tokens, hits)
        if cost > len(self.free_queue):
            raise OutOfBlocksError(
                f"{seq.request_id} needs {cost} blocks, only {len(self.free_queue)} of {self.num_blocks} free"
            )
        if hits:
            if seq.num_computed_tokens != len(hits) * self.block_size:
                raise ValueError(f"{seq.request_id}: {seq.num_computed_tokens} computed tokens but {len(hits)} hits")
            for block in hits:
                self._touch(block)
            seq.block_table.extend(hits)
            seq.num_cached_blocks = len(hits)
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._pop_free())
        self._cache_full_blocks(seq, seq.num_computed_tokens + num_new_tokens)

    def _touch(self, block: int) -> None:
        """Take a reference on a cached hit, pulling it out of the free queue if nobody held it."""
        b = self.blocks[block]
        if b.ref_cnt == 0:
            del self.free_queue[block]
        b.ref_cnt += 1

    def _pop_free(self) -> int:
        """The least recently freed block, evicted from the cache: its hash goes before anyone can reuse it."""
        block, _ = self.free_queue.popitem(last=False)
        b = self.blocks[block]
        if b.block_hash is not None:
            del self.cached[b.block_hash]
            b.block_hash = None
            self.num_evictions += 1
        b.ref_cnt = 1
        return block

    def _cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Name the blocks that the first `num_tokens` tokens fill; a block whose prefix is already cached elsewhere
        stays nameless (the map holds one block per hash)."""
        full = min(num_tokens // self.block_size, len(seq.block_table))
        if not self.caches(seq) or full <= seq.num_cached_blocks:
            return
        for i in range(seq.num_cached_blocks, full):
            block_hash = self.block_hash(seq, i)
            b = self.blocks[seq.block_table[i]]
            if b.block_hash is None and block_hash not in self.cached:
                b.block_hash = block_hash
                self.cached[block_hash] = b.block_id
        seq.num_cached_blocks = full

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references (finish, cancel or preemption) and clear its table; cached blocks keep their hash.

        Blocks reaching count 0 join the free queue's tail last block first, so a prompt's tail is evicted
        before its (more shareable) head.
        """
        for block in seq.block_table:
            if self.blocks[block].ref_cnt < 1:
                raise AssertionError(f"block {block} in {seq.request_id}'s table is not held by anyone")
        for block in reversed(seq.block_table):
            b = self.blocks[block]
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self.free_queue[block] = None
        seq.block_table.clear()
        seq.num_cached_blocks = 0

    def reset_cache(self) -> bool:
        """Forget every cached prefix (vLLM's reset_prefix_cache); False, changing nothing, while blocks are in use."""
        if self.num_used_blocks:
            return False
        for b in self.blocks:
            b.block_hash = None
        self.cached.clear()
        return True

    # ---- consistency --------------------------------------------------------------------------------

    def check(self, seqs: Iterable[Sequence] | None = None) -> None:
        """Assert the books balance: the free queue is exactly the blocks with count 0, the map and the block hashes
        agree; with `seqs` (every live sequence), each count equals the number of tables holding the block."""
        for b in self.blocks:
            assert b.ref_cnt >= 0, f"block {b.block_id} has count {b.ref_cnt}"
            assert (b.block_id in self.free_queue) == (b.ref_cnt == 0), (
                f"block {b.block_id} has count {b.ref_cnt} but is {'' if b.block_id in self.free_queue else 'not '}free"
            )
            if b.block_hash is not None:
                assert self.cached.get(b.block_hash) == b.block_id, f"block {b.block_id}'s hash maps elsewhere"
        for block_hash, block in self.cached.items():
            assert self.blocks[block].block_hash == block_hash, f"the map names block {block} for another hash"
        assert self.enable_caching or not self.cached, "a block is cached with caching off"
        if seqs is None:
            return
        held: Counter[int] = Counter()
        for seq in seqs:
            table = seq.block_table
            assert len(set(table)) == len(table), f"{seq.request_id}'s table holds a block twice: {table}"
            assert seq.num_cached_blocks <= len(table), f"{seq.request_id} cached more blocks than it holds"
            for i in range(seq.num_cached_blocks):
                assert self.blocks[table[i]].block_hash in (None, seq.block_hashes[i]), (
                    f"{seq.request_id}'s block {table[i]} caches another prefix"
                )
            held.update(table)
        for b in self.blocks:
            assert b.ref_cnt == held[b.block_id], (
                f"block {b.block_id} has count {b.ref_cnt} but {held[b.block_id]} tables hold it"
            )

    def __repr__(self) -> str:
        return (
            f"BlockManager({self.num_used_blocks}/{self.num_blocks} blocks used, {len(self.cached)} cached, "
            f"block_size={self.block_size}, usage={self.usage():.0%})"
        )
