"""Which replica gets a request: least outstanding, with prefix affinity so a replica's prefix cache keeps hitting.

Pure Python (no Ray, no torch): the pool calls it under its own lock.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

MAX_PREFIX_BLOCKS = 256  # hash at most this many leading blocks (4096 tokens at block_size 16)
CAPACITY = 65_536  # prefix hashes remembered, least recently routed dropped first


class PrefixRouter:
    """Least outstanding requests, ties taken in turn; a request whose leading full KV blocks were routed before goes
    back to that replica unless it has more than `imbalance_factor` × the least busy one's load + `imbalance_slack`.

    Blocks hash in a chain (each hash covers every token before it), the way the engine's prefix cache keys them, so
    the longest remembered prefix decides.
    """

    def __init__(self, block_size: int, *, imbalance_factor: float = 2.0, imbalance_slack: int = 4,
                 capacity: int = CAPACITY) -> None:
        self.block_size = block_size
        self.imbalance_factor = imbalance_factor
        self.imbalance_slack = imbalance_slack
        self.capacity = capacity
        self.owner: collections.OrderedDict[int, int] = collections.OrderedDict()  # prefix hash -> replica
        self.turn = 0
        self.routed = 0
        self.affinity_hits = 0  # routed by prefix
        self.affinity_overridden = 0  # had a prefix owner, but it was too busy

    def prefix_hashes(self, token_ids: Sequence[int]) -> list[int]:
        """Chained hashes of the full blocks at the start of the prompt (none if it is shorter than one block)."""
        bs = self.block_size
        full = min(len(token_ids) // bs, MAX_PREFIX_BLOCKS)
        hashes, h = [], 0
        for i in range(full):
            h = hash((h, tuple(token_ids[i * bs:(i + 1) * bs])))
            hashes.append(h)
        return hashes

    def choose(self, hashes: Sequence[int], outstanding: Sequence[int | None]) -> int:
        """The replica for a request; `outstanding[i]` is None for a replica that cannot take requests now."""
        live = [i for i, n in enumerate(outstanding) if n is not None]
        if not live:
            raise ValueError("no replica can take requests")
        self.routed += 1
        least = min(outstanding[i] for i in live)  # type: ignore[type-var]
        for h in reversed(hashes):  # the longest remembered prefix
            owner = self.owner.get(h)
            if owner is None or owner >= len(outstanding) or outstanding[owner] is None:
                continue
            if outstanding[owner] <= self.imbalance_factor * least + self.imbalance_slack:  # type: ignore[operator]
                self.affinity_hits += 1
                return owner
            self.affinity_overridden += 1
            break
        n = len(outstanding)
        for k in range(n):  # least outstanding; among equals, the next in turn, so idle replicas take turns
            i = (self.turn + k) % n
            if outstanding[i] == least:
                self.turn = i + 1
                return i
        raise AssertionError("unreachable")

    def record(self, hashes: Sequence[int], replica: int) -> None:
        """`replica` now holds these prefixes in its cache."""
        for h in hashes:
            self.owner[h] = replica
            self.owner.move_to_end(h)
        while len(self.owner) > self.capacity:
            self.owner.popitem(last=False)

    def forget(self, replica: int) -> None:
        """The replica restarted with an empty cache: its prefixes are nobody's now."""
        for h in [h for h, r in self.owner.items() if r == replica]:
            del self.owner[h]

    def stats(self) -> dict[str, int]:
        return {"routed": self.routed, "affinity_hits": self.affinity_hits,
                "affinity_overridden": self.affinity_overridden, "prefixes": len(self.owner)}
