"""cpu_linear computes F.linear (to rounding) on every path, and its swap of F.linear never outlives our forwards."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from toolkit.layers.linear import cpu_linear, cpu_linear_kernels


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 64, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_linear_is_linear(rows: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 48, generator=gen).to(dtype)
    weight, bias = torch.randn(80, 48, generator=gen).to(dtype), torch.randn(80, generator=gen).to(dtype)
    for b in (None, bias):
        got = cpu_linear(x, weight, b)
        assert got.shape == (1, rows, 80) and got.is_contiguous()
        torch.testing.assert_close(got, F.linear(x, weight, b), atol=1e-4, rtol=1e-4)


def test_cpu_linear_keeps_autograd() -> None:
    weight = torch.randn(80, 48, requires_grad=True)
    cpu_linear(torch.randn(2, 10, 48), weight).sum().backward()
    assert weight.grad is not None and weight.grad.shape == weight.shape


def test_cpu_linear_kernels_are_scoped() -> None:
    original = F.linear
    with pytest.raises(RuntimeError, match="inside"), cpu_linear_kernels():
        assert F.linear is cpu_linear
        raise RuntimeError("inside")
    assert F.linear is original


def test_overlapping_forwards_in_threads_restore_f_linear() -> None:
    """Thread A enters, B enters, A leaves (B still inside: still swapped), B leaves: the original is back."""
    original = F.linear
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()
    seen_after_a: list[object] = []

    def thread_a() -> None:
        with cpu_linear_kernels():
            a_inside.set()
            b_inside.wait(5)
        a_left.set()

    def thread_b() -> None:
        a_inside.wait(5)
        with cpu_linear_kernels():
            b_inside.set()
            a_left.wait(5)
            seen_after_a.append(F.linear)

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen_after_a == [cpu_linear]
    assert F.linear is original
