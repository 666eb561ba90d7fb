"""The machine's matmul ceiling for a dtype, and the model FLOPs a workload needs: together, its roofline."""

from __future__ import annotations

import time
from typing import Any

import torch

PROBE_SHAPE = (512, 576, 1536)  # M x K x N: a prefill chunk through SmolLM2's MLP


def gemm_gflops(dtype: str, device: str = "cpu", shape: tuple[int, int, int] = PROBE_SHAPE, min_s: float = 0.3
                ) -> float:
    """Best-of GFLOP/s of one M x K x N matmul in `dtype`, after a warm-up, over about `min_s` seconds."""
    m, k, n = shape
    torch_dtype = getattr(torch, dtype)
    a = torch.randn(m, k, device=device).to(torch_dtype)
    b = torch.randn(k, n, device=device).to(torch_dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    deadline = time.perf_counter() + min_s
    while time.perf_counter() < deadline:
        _sync(device)
        started = time.perf_counter()
        for _ in range(5):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - started) / 5)
    return 2 * m * k * n / best / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def param_counts(model: Any) -> tuple[int, int]:
    """(unique parameters, parameters of the output projection): prompt tokens skip the lm_head."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    head = model.get_output_embeddings()
    return total, (head.weight.numel() if head is not None else 0)


def model_flops(num_params: int, lm_head_params: int, prompt_tokens: int, output_tokens: int) -> float:
    """2 x params per generated token; a prompt token's logits are never computed, so it skips the lm_head."""
    return 2.0 * num_params * output_tokens + 2.0 * (num_params - lm_head_params) * prompt_tokens
