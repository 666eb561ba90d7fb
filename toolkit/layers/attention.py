"""Paged K/V tensors and the attention function HF models call through transformers' AttentionInterface.

The runner passes one `PagedBatch` per forward as the `toolkit_batch` keyword; transformers forwards unknown keywords
from `model(...)` down to the attention function, so Llama / Qwen / Mistral modeling code runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from toolkit.layers.kv_cache import PagedKVCache

ATTN_IMPLEMENTATION = "toolkit_paged"


@dataclass(slots=True)
class PrefillSpan:
    """A multi-token sequence of the step: its query rows, and its blocks when it has a cached prefix."""

    q_start: int
    q_end: int
    blocks: torch.Tensor | None = None  # blocks covering cached prefix + new tokens; None: no prefix, use new K/V
    mask: torch.Tensor | None = None  # [n, len(blocks) * block_size] in the cache's dtype, 0 where a query may attend


@dataclass(slots=True)
class DecodeGroup:
    """Single-token sequences of similar context length, attended together over their padded block tables."""

    q_start: int
    q_end: int
    blocks: torch.Tensor  # [B * nb] block ids, each table padded to nb blocks
    mask: torch.Tensor  # [B, 1, 1, nb * block_size] in the cache's dtype, 0 where visible, -inf on padding


@dataclass(slots=True)
class PagedBatch:
    """Where this step's tokens go and what each one attends to; built once per step, shared by every layer.

    Token order: the decode groups' single-token sequences first, then the prefill spans.
    """

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    decodes: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillSpan] = field(default_factory=list)
    max_context: int = 0


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    toolkit_batch: PagedBatch | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """The registered attention: query [1, H, T, D], key/value [1, KV, T, D] → output [1, T, H, D].

    The runner switches a model to it only for its own forward; a call without `toolkit_batch` (the model left set
    to this implementation and called directly) falls back to plain SDPA.
    """
    if toolkit_batch is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    _check_supported(kwargs, toolkit_batch.max_context)
    batch = toolkit_batch
    layer = module.layer_idx
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    batch.cache.write(layer, key[0], value[0], batch.slot_mapping)
    out = query.new_empty((1, query.shape[2], query.shape[1], query.shape[3]))
    for group in batch.decodes:
        out[0, group.q_start : group.q_end] = _decode_attention(query, group, batch.cache, layer, scale)
    for span in batch.prefills:
        out[0, span.q_start : span.q_end] = _prefill_attention(query, key, value, span, batch, layer, scale)
    return out, None


def _check_supported(kwargs: dict[str, object], max_context: int) -> None:
    """Refuse what this attention does not implement rather than silently computing something else.

    Sliding-window layers are exact as long as no context is longer than the window.
    """
    window = kwargs.get("sliding_window")
    if isinstance(window, int) and window > 0 and max_context > window:
        raise NotImplementedError(f"context of {max_context} tokens exceeds the sliding window of {window}")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"toolkit_paged attention does not support {name!r} (logit softcapping / sinks)")


def _decode_attention(
    query: torch.Tensor, group: DecodeGroup, cache: PagedKVCache, layer: int, scale: float
) -> torch.Tensor:
    """q_len-1 sequences at once: one SDPA over their gathered, padded blocks → [B, H, D].

    SDPA's fused CPU kernel (scale, mask, softmax and both matmuls in one pass, float32 accumulation) replaced
    grouped matmuls with a separate scale, mask add and softmax: one op instead of five, which matters most when
    the host is busy (4x faster per layer with 2 threads on a loaded 2-core host, 5-10 % when it was quiet, where
    the block gather is most of the time). It reads the gathered [KV, B, L, D] blocks as a strided [B, KV, L, D] view.
    """
    b = group.q_end - group.q_start
    kv_heads, head_dim = cache.num_kv_heads, cache.head_dim
    q = query[0, :, group.q_start : group.q_end].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
    k, v = cache.gather(layer, group.blocks)
    k = k.view(kv_heads, b, -1, head_dim).transpose(0, 1)  # [B, KV, L, D]
    v = v.view(kv_heads, b, -1, head_dim).transpose(0, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, scale=scale, enable_gqa=True)
    return out[:, :, 0]


def _prefill_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, span: PrefillSpan, batch: PagedBatch,
    layer: int, scale: float,
) -> torch.Tensor:
    """One multi-token sequence with SDPA: causal over its own new tokens, or masked over cached + new → [n, H, D]."""
    q = query[:, :, span.q_start : span.q_end]
    if span.blocks is None:
        k = key[:, :, span.q_start : span.q_end]
        v = value[:, :, span.q_start : span.q_end]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        k, v = batch.cache.gather(layer, span.blocks)
        out = F.scaled_dot_product_attention(
            q, k.unsqueeze(0), v.unsqueeze(0), attn_mask=span.mask, scale=scale, enable_gqa=True
        )
    return out[0].transpose(0, 1)


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
