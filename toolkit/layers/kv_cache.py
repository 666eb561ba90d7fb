"""The paged K/V tensors and their sizing: how many fixed-size blocks fit a memory budget, and where each lives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from toolkit.models import resolve_dtype


def kv_geometry(model_config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config (the text config of a multimodal one)."""
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, "cpu")


def num_blocks_for_budget(model_config: Any, block_size: int, dtype: torch.dtype | str, gib: float) -> int:
    """How many KV blocks fit in `gib` GiB: each block holds K and V of block_size tokens for every layer."""
    layers, kv_heads, head_dim = kv_geometry(model_config)
    block_bytes = 2 * layers * kv_heads * head_dim * block_size * as_dtype(dtype).itemsize
    return max(1, int(gib * 2**30) // block_bytes)


@dataclass(slots=True)
class PagedKVCache:
    """Per-layer K and V, each [num_kv_heads, num_blocks * block_size, head_dim].

    Heads come first so that gathering whole blocks with one `index_select` on dim 1 yields [KV, B, L, D] directly;
    the decode SDPA reads it as a strided [B, KV, L, D] view, with no permute copy afterwards.
    """

    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    key: list[torch.Tensor] = field(default_factory=list)
    value: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def allocate(
        cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str,
    ) -> PagedKVCache:
        """Preallocate every layer once (zeros, so padded reads are finite) instead of growing per step."""
        shape = (num_kv_heads, num_blocks * block_size, head_dim)
        cache = cls(num_blocks, block_size, num_kv_heads, head_dim)
        for _ in range(num_layers):
            cache.key.append(torch.zeros(shape, dtype=dtype, device=device))
            cache.value.append(torch.zeros(shape, dtype=dtype, device=device))
        return cache

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        """Store this step's new K/V ([KV, T, D]) at their slots (block * block_size + offset)."""
        self.key[layer].index_copy_(1, slots, key)
        self.value[layer].index_copy_(1, slots, value)

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks, [KV, len(blocks) * block_size, D]: one contiguous copy per tensor."""
        shape = (self.num_kv_heads, self.num_blocks, self.block_size, self.head_dim)
        out_shape = (self.num_kv_heads, -1, self.head_dim)
        k = self.key[layer].view(shape).index_select(1, blocks).view(out_shape)
        v = self.value[layer].view(shape).index_select(1, blocks).view(out_shape)
        return k, v

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.key, *self.value))
