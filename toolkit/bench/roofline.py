"""The machine's matmul ceiling for a dtype, and the model FLOPs a workload needs: together, its roofline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from toolkit.layers.linear import KERNELS, candidates

PROBE_SHAPE = (512, 576, 1536)  # M x K x N: a prefill chunk through SmolLM2's MLP


def gemm_gflops(dtype: str, device: str = "cpu", shape: tuple[int, int, int] = PROBE_SHAPE, min_s: float = 0.3
                ) -> float:
    """Best-of GFLOP/s of one M x K x N product in `dtype` over about `min_s` seconds per kernel.

    The fastest of torch's matmul and, for float32 on CPU, the kernels the engine's CPU linear layer may choose
    (oneDNN: twice MKL's speed on an AVX-512 EPYC): the ceiling is what the machine can do, not what one library does.
    """
    m, k, n = shape
    torch_dtype = getattr(torch, dtype)
    a = torch.randn(m, k, device=device).to(torch_dtype)
    b = torch.randn(k, n, device=device).to(torch_dtype)
    weight = b.t().contiguous()
    with torch.inference_mode():
        best = _best_seconds(lambda: a @ b, device, min_s)
        if device == "cpu" and torch_dtype == torch.float32:
            for name in candidates(few_rows=m <= 4):
                if name != "torch":
                    kernel = KERNELS[name]
                    best = min(best, _best_seconds(lambda k=kernel: k(a, weight, None), device, min_s))
    return 2 * m * k * n / best / 1e9


def _best_seconds(product: Callable[[], torch.Tensor], device: str, min_s: float) -> float:
    for _ in range(3):
        product()
    best = float("inf")
    deadline = time.perf_counter() + min_s
    while time.perf_counter() < deadline:
        _sync(device)
        started = time.perf_counter()
        for _ in range(5):
            product()
        _sync(device)
        best = min(best, (time.perf_counter() - started) / 5)
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def param_counts(model: Any) -> tuple[int, int]:
    """(parameters a token is multiplied by, those of the output projection): prompt tokens skip the lm_head.

    The input embedding is a lookup, not a product: an untied one is left out (counting it would overstate the
    model FLOPs, and the roofline fraction, by up to 2x for small models); a tied one counts once, as the lm_head.
    """
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if embed is not None and (head is None or embed.weight is not head.weight):
        total -= embed.weight.numel()
    return total, (head.weight.numel() if head is not None else 0)


def model_flops(num_params: int, lm_head_params: int, prompt_tokens: int, output_tokens: int) -> float:
    """2 x params per generated token; a prompt token's logits are never computed, so it skips the lm_head."""
    return 2.0 * num_params * output_tokens + 2.0 * (num_params - lm_head_params) * prompt_tokens
