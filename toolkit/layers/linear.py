"""Faster float32 CPU kernels for nn.Linear, switched on only while one of our forwards runs.

torch's float32 CPU GEMM is MKL, which on the AMD EPYC this was tuned on runs at half the speed of oneDNN (the
library torch already uses for bf16, and torch.compile for float32): all of SmolLM2's linear layers for 32 rows
took 79 ms with MKL and 40 ms with oneDNN, for 512 rows 733 and 339 ms. With 1-4 rows MKL is fastest with its
operands swapped (weight @ x.T, one row padded to two): 53 → 18 ms. The same sums in a different order: results
agree with F.linear to float32 rounding.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

_FEW_ROWS = 4  # float32 products up to this many rows: MKL with swapped operands beats oneDNN (18 vs 24 ms a step)
_linear = F.linear
_lock = threading.Lock()
_depth = 0  # forwards inside cpu_linear_kernels() right now, across threads


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with faster float32 CPU kernels; bfloat16, GPUs and anything unusual go to F.linear itself."""
    rows = x.numel() // max(x.shape[-1], 1)
    usual = x.dtype != torch.float32 or x.device.type != "cpu" or not weight.is_contiguous() or rows == 0
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)  # oneDNN's op has no backward
    if usual or training or (rows > _FEW_ROWS and not _onednn_linear_works()):
        return _linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1]).contiguous()
    if rows > _FEW_ROWS:
        out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    else:
        out = _swapped_mm(flat, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def _swapped_mm(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = flat.shape[0]
    if rows == 1:
        flat = flat.expand(2, -1).contiguous()  # MKL's one-row path reads the weights at a third of the speed
    out = torch.mm(weight, flat.t()).t()[:rows]
    return (out if bias is None else out + bias).contiguous()


@functools.cache
def _onednn_linear_works() -> bool:
    """oneDNN's linear op exists in this torch build and agrees with F.linear on a small product."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)  # not the global generator: probing must not shift users' random streams
    x, weight = torch.randn(8, 16, generator=gen), torch.randn(24, 16, generator=gen)
    try:
        with torch.inference_mode():
            return bool(torch.allclose(op(x, weight, None, "none", [], ""), _linear(x, weight), atol=1e-4))
    except RuntimeError:
        return False


@contextmanager
def cpu_linear_kernels() -> Iterator[None]:
    """Route every nn.Linear through `cpu_linear` while at least one of our forwards runs.

    nn.Linear looks up F.linear at call time, so this reaches every projection of any HF model without touching
    the model; outside our forwards (model.generate, parity references) F.linear is the original. A count, not a
    saved previous value, so engines stepping in several threads cannot leave the swap behind.
    """
    global _depth
    with _lock:
        _depth += 1
        F.linear = cpu_linear
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                F.linear = _linear
