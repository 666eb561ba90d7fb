"""The paged attention against a dense float64 reference: random ragged batches of decodes (several decode groups),
whole prompts, prefill chunks and chunks over cached prefix blocks, on shuffled (non-contiguous) block tables."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest
import torch
from torch import nn

from toolkit.engine.block_manager import BlockManager
from toolkit.engine.request import Sequence
from toolkit.engine.runner import ModelRunner
from toolkit.engine.scheduler import ScheduledSequence
from toolkit.layers.attention import paged_attention
from toolkit.models import build_tiny_llama
from toolkit.worker.messages import GenerateRequest

BLOCK = 4


def _dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """q [H, n, D] at positions start.., k/v [KV, start+n, D]: causal softmax attention in float64 → [n, H, D]."""
    groups = q.shape[0] // k.shape[0]
    k, v = k.double().repeat_interleave(groups, 0), v.double().repeat_interleave(groups, 0)
    scores = q.double() @ k.transpose(1, 2) * scale  # [H, n, L]
    positions = torch.arange(start, start + q.shape[1])[:, None]
    scores.masked_fill_(torch.arange(k.shape[1])[None, :] > positions, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_attention_matches_dense_reference(seed: int) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    runner = ModelRunner(build_tiny_llama().eval(), num_blocks=96, block_size=BLOCK)
    cache = runner.cache
    kv, dim = cache.num_kv_heads, cache.head_dim
    heads = kv * 2
    blocks = BlockManager(96, BLOCK, enable_caching=False)
    order = list(blocks.free_queue)
    rng.shuffle(order)
    blocks.free_queue = OrderedDict.fromkeys(order)
    # (start, new tokens): decodes over contexts 1..40 (the runner splits them where the context halves), a whole
    # prompt, an unaligned prefill chunk, a chunk after two whole (cached) blocks, a one-token-short last chunk
    shapes = [(rng.randrange(0, 40), 1) for _ in range(7)] + [(0, 9), (5, 6), (2 * BLOCK, 5), (13, 2)]
    scheduled, dense = [], []
    for i, (start, n) in enumerate(shapes):
        seq = Sequence.from_request(GenerateRequest(f"s{i}", [1] * (start + n), max_new_tokens=1))
        blocks.allocate(seq, start + n)
        seq.num_computed_tokens = start
        scheduled.append(ScheduledSequence(seq, start, n))
        k_all = torch.randn(kv, start + n, dim, generator=gen)
        v_all = torch.randn(kv, start + n, dim, generator=gen)
        if start:  # the cached prefix: written by earlier steps
            slots = torch.tensor(runner._slots(seq.block_table, 0, start))
            cache.write(0, k_all[:, :start], v_all[:, :start], slots)
        dense.append((k_all, v_all))
    with torch.inference_mode():
        step = runner.prepare(scheduled)
        assert len(step.batch.decodes) >= 2 and any(s.blocks is not None for s in step.batch.prefills)
        order_in_batch = sorted(scheduled, key=lambda s: (s.num_tokens != 1, -s.start if s.num_tokens == 1 else 0))
        total = sum(n for _, n in shapes)
        query = torch.randn(1, heads, total, dim, generator=gen)
        key = torch.empty(1, kv, total, dim)
        value = torch.empty(1, kv, total, dim)
        rows, row = {}, 0
        for s in order_in_batch:
            k_all, v_all = dense[scheduled.index(s)]
            key[0, :, row : row + s.num_tokens] = k_all[:, s.start :]
            value[0, :, row : row + s.num_tokens] = v_all[:, s.start :]
            rows[s.seq.request_id] = row
            row += s.num_tokens
        layer = nn.Module()
        layer.layer_idx = 0
        scale = dim**-0.5
        out, _ = paged_attention(layer, query, key, value, None, scaling=scale, toolkit_batch=step.batch)
    for i, s in enumerate(scheduled):
        r = rows[s.seq.request_id]
        k_all, v_all = dense[i]
        want = _dense_reference(query[0, :, r : r + s.num_tokens], k_all, v_all, s.start, scale)
        torch.testing.assert_close(out[0, r : r + s.num_tokens].double(), want, atol=1e-5, rtol=1e-5)
