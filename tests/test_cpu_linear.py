"""The CPU linear layer: every kernel computes F.linear, each module records the kernel that ran, the choice is
made per model by timing on this host, and nothing process-wide changes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from toolkit.layers import linear
from toolkit.layers.linear import KERNELS, CpuLinear, KernelChoice, LinearPlan, choose_linear_kernels, install
from toolkit.models import build_tiny_llama

FAST_PLAN = LinearPlan((KernelChoice(1, 4, "mkl-swapped"), KernelChoice(5, None, "onednn")))
HAS_ONEDNN = "onednn" in linear.candidates(few_rows=False)
DELAY_S = 0.01  # what a slowed kernel adds: far above any tiny-model GEMM, even on a busy shared host


@pytest.fixture(autouse=True)
def fresh_probe_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear, "_probed", {})


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Probe tests slow kernels down by sleeping; with one thread no OpenMP pool has to wake after each sleep."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _module(bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Linear:
    gen = torch.Generator().manual_seed(0)
    module = nn.Linear(48, 80, bias=bias).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.randn(80, 48, generator=gen))
        if bias:
            module.bias.copy_(torch.randn(80, generator=gen))
    return module.requires_grad_(False)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 64, 300])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_every_kernel_computes_f_linear(rows: int, kernel: str) -> None:
    if kernel == "onednn" and not HAS_ONEDNN:
        pytest.skip("this torch build has no oneDNN linear")
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 48, generator=gen)
    weight, bias = torch.randn(80, 48, generator=gen), torch.randn(80, generator=gen)
    for b in (None, bias):
        got = KERNELS[kernel](x, weight, b)
        assert got.shape == (rows, 80) and got.is_contiguous()
        torch.testing.assert_close(got, F.linear(x, weight, b), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not HAS_ONEDNN, reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize(("rows", "kernel"), [(1, "mkl-swapped"), (4, "mkl-swapped"), (5, "onednn"), (300, "onednn")])
def test_cpu_linear_runs_the_planned_kernel_for_its_rows(rows: int, kernel: str) -> None:
    original = _module()
    layer = CpuLinear(original, FAST_PLAN)
    x = torch.randn(1, rows, 48)  # rows counted over every leading dimension, as a ragged [1, T, H] batch has
    with torch.inference_mode():
        got = layer(x)
    assert layer.calls == {kernel: 1}
    assert got.shape == (1, rows, 80)
    torch.testing.assert_close(got, F.linear(x, original.weight, original.bias), atol=1e-4, rtol=1e-4)


def test_what_the_plan_was_not_measured_for_goes_to_f_linear() -> None:
    """bfloat16, autograd and a plan that chose torch: F.linear itself, and the module says so."""
    bf16 = CpuLinear(_module(dtype=torch.bfloat16), FAST_PLAN)
    x = torch.randn(3, 48).to(torch.bfloat16)
    assert torch.equal(bf16(x), F.linear(x, bf16.weight, bf16.bias)) and bf16.calls == {"torch": 1}

    trained = _module().requires_grad_(True)
    layer = CpuLinear(trained, FAST_PLAN)
    layer(torch.randn(2, 10, 48)).sum().backward()
    assert layer.calls == {"torch": 1} and trained.weight.grad is not None

    plain = CpuLinear(_module(), LinearPlan((KernelChoice(1, None, "torch"),)))
    plain(torch.randn(7, 48))
    assert plain.calls == {"torch": 1}


def test_install_swaps_only_this_models_linears_and_keeps_weights_tied() -> None:
    model, other = build_tiny_llama().eval(), build_tiny_llama().eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.inference_mode():
        before = model(ids).logits
    f_linear = F.linear
    n = sum(type(m) is nn.Linear for m in model.modules())
    assert install(model, FAST_PLAN) == n > 0
    swapped = [m for m in model.modules() if isinstance(m, CpuLinear)]
    assert len(swapped) == n and not any(type(m) is nn.Linear for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings stay tied
    with torch.inference_mode():
        after = model(ids).logits
        other(ids)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert sum(sum(m.calls.values()) for m in swapped) == n  # each layer ran once, through CpuLinear
    assert F.linear is f_linear and not any(isinstance(m, CpuLinear) for m in other.modules())


def test_install_leaves_modules_with_hooks_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].register_forward_hook(lambda *_: None)
    assert install(model, FAST_PLAN) == 1
    assert isinstance(model[0], CpuLinear) and type(model[1]) is nn.Linear


def _slowed(kernel: linear.LinearKernel, delay_s: float) -> linear.LinearKernel:
    def slow(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        time.sleep(delay_s)
        return kernel(x, weight, bias)

    return slow


@pytest.mark.usefixtures("one_thread")
def test_the_probe_keeps_f_linear_when_it_is_fastest(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("onednn", "mkl-swapped"):
        monkeypatch.setitem(KERNELS, name, _slowed(KERNELS[name], DELAY_S))
    model = build_tiny_llama().eval()
    plan = choose_linear_kernels(model, budget_s=0.2)
    assert [c.kernel for c in plan.choices] == ["torch", "torch"] and not plan.fast
    assert not any(isinstance(m, CpuLinear) for m in model.modules())
    assert all(c.ms["torch"] < c.ms["mkl-swapped"] for c in plan.choices if "mkl-swapped" in c.ms)
    assert plan.describe().startswith("rows 1-4: torch (torch ")


@pytest.mark.usefixtures("one_thread")
def test_the_probe_takes_a_faster_kernel_and_records_its_times(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(KERNELS, "torch", _slowed(KERNELS["torch"], DELAY_S))
    model = build_tiny_llama().eval()
    started = time.monotonic()
    plan = choose_linear_kernels(model, budget_s=0.2)
    assert time.monotonic() - started < 5
    few, many = plan.choices
    assert (few.first_row, few.last_row, many.first_row, many.last_row) == (1, 4, 5, None)
    assert few.kernel != "torch" and few.ms[few.kernel] < few.ms["torch"]
    if HAS_ONEDNN:
        assert many.kernel == "onednn" and many.ms["onednn"] < many.ms["torch"]
    layers = [m for m in model.modules() if isinstance(m, CpuLinear)]
    assert layers and all(m.plan is plan for m in layers)
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7]]))  # 3 rows: the few-row kernel in every layer
    assert all(m.calls == {few.kernel: 1} for m in layers)
    assert f"rows 1-4: {few.kernel} (" in plan.describe() and "ms" in plan.describe()


@pytest.mark.usefixtures("one_thread")
def test_a_kernel_that_disagrees_with_f_linear_is_never_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(KERNELS, "torch", _slowed(KERNELS["torch"], DELAY_S))
    monkeypatch.setitem(KERNELS, "mkl-swapped", lambda x, w, b: F.linear(x, w, b) + 1)
    plan = linear.probe(build_tiny_llama().eval(), budget_s=0.2)
    assert "mkl-swapped" not in plan.choices[0].ms and plan.choices[0].kernel != "mkl-swapped"


def test_not_probed_off_cpu_float32() -> None:
    model = build_tiny_llama().eval().to(torch.bfloat16)
    plan = choose_linear_kernels(model)
    assert plan.choices == () and plan.describe() == "torch (bfloat16: torch's own kernels)"
    assert not any(isinstance(m, CpuLinear) for m in model.modules())


def test_the_engine_reports_its_choice_and_its_model_follows_it() -> None:
    """On this host, whatever the probe found: Ready's line is the plan, and the model is swapped iff it pays."""
    from toolkit.engine.core import Engine
    from toolkit.settings import Settings

    engine = Engine(Settings(model="tiny-random-llama", device="cpu", dtype="float32", num_kv_blocks=8),
                    model=build_tiny_llama().eval(), tokenizer=None)
    plan = engine.linear_plan
    assert engine.ready_info()["linear_kernel"] == plan.describe() and len(plan.choices) == 2
    assert any(isinstance(m, CpuLinear) for m in engine.model.modules()) == plan.fast
    for choice in plan.choices:
        assert choice.ms[choice.kernel] == min(choice.ms.values()) or choice.kernel == "torch"


@pytest.mark.usefixtures("one_thread")
def test_a_second_engine_on_the_same_model_keeps_its_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(KERNELS, "torch", _slowed(KERNELS["torch"], DELAY_S))
    model = build_tiny_llama().eval()
    plan = choose_linear_kernels(model, budget_s=0.2)
    assert plan.fast and choose_linear_kernels(model) is plan
