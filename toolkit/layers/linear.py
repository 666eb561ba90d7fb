"""The CPU linear layer: each model gets its own float32 GEMM kernels, chosen once at load by timing them here.

torch's float32 CPU GEMM is MKL. On the AVX-512 EPYC this was first tuned on, oneDNN (the library torch already
uses for bf16) ran SmolLM2's linear layers twice as fast for 32+ rows, and for 1-4 rows MKL was fastest with its
operands swapped (weight @ x.T); on an AVX2-only EPYC oneDNN gained under 10 %. Hosts differ, so nothing here is a
threshold tuned on one of them: `choose_linear_kernels` times the model's own GEMM shapes on this host (about a
second) and swaps the model's nn.Linear modules for `CpuLinear` only where a kernel beats F.linear. Nothing
process-wide changes: F.linear, other models and other threads are untouched.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

LinearKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

FEW_ROWS = 4  # rows 1..FEW_ROWS (decode of a few sequences) and FEW_ROWS+1.. (batches, prefill) choose apart
PROBE_ROWS = ((1, 4), (32, 256))  # rows timed for each of the two ranges
PROBE_SHAPES = 3  # the model's heaviest (out, in) weight shapes that are timed
PROBE_ROUNDS = 25  # at most this many timed calls of each kernel per shape and row count
MIN_GAIN = 0.05  # a kernel must beat F.linear by this fraction of its time to be used (noise on shared hosts)


def _torch_linear(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(flat, weight, bias)


def _onednn_linear(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")


def _mkl_swapped(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """weight @ x.T: MKL's few-row path reads the weights faster this way round; one row is padded to two."""
    rows = flat.shape[0]
    if rows == 1:
        flat = flat.expand(2, -1).contiguous()
    out = torch.mm(weight, flat.t()).t()[:rows]
    return (out if bias is None else out + bias).contiguous()


KERNELS: dict[str, LinearKernel] = {"torch": _torch_linear, "onednn": _onednn_linear, "mkl-swapped": _mkl_swapped}


def candidates(few_rows: bool) -> list[str]:
    """Kernels worth timing for a row range (always including the baseline "torch")."""
    names = ["torch"]
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        names.append("onednn")
    if few_rows:
        names.append("mkl-swapped")
    return names


@dataclass(frozen=True, slots=True)
class KernelChoice:
    """The kernel for rows first_row..last_row (None: no upper end), and what each candidate measured there.

    ms: one pass over the model's probed shapes, summed over the probed row counts of this range, per kernel.
    """

    first_row: int
    last_row: int | None
    kernel: str
    ms: dict[str, float] = field(default_factory=dict)

    def covers(self, rows: int) -> bool:
        return rows >= self.first_row and (self.last_row is None or rows <= self.last_row)

    def describe(self) -> str:
        span = f"rows {self.first_row}-{self.last_row}" if self.last_row is not None else f"rows {self.first_row}+"
        measured = ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(self.ms.items(), key=lambda kv: kv[1]))
        return f"{span}: {self.kernel}" + (f" ({measured})" if measured else "")


@dataclass(frozen=True, slots=True)
class LinearPlan:
    """Which kernel each row range of a model's linear layers uses, or why the model kept F.linear throughout."""

    choices: tuple[KernelChoice, ...] = ()
    reason: str = ""  # set when nothing was probed (not CPU float32, no linear layers)

    def kernel_for(self, rows: int) -> str:
        return next((c.kernel for c in self.choices if c.covers(rows)), "torch")

    @property
    def fast(self) -> bool:
        """Whether any row range uses a kernel other than F.linear (only then are modules swapped)."""
        return any(c.kernel != "torch" for c in self.choices)

    def describe(self) -> str:
        """One line for Ready.linear_kernel, e.g. 'rows 1-4: mkl-swapped (mkl-swapped 0.41 ms, ...); rows 5+: ...'."""
        if not self.choices:
            return f"torch ({self.reason})" if self.reason else "torch"
        return "; ".join(c.describe() for c in self.choices)


class CpuLinear(nn.Linear):
    """An nn.Linear of one model whose forward uses the kernel its LinearPlan chose for the number of rows.

    Shares the original module's parameters (tied embeddings stay tied). Anything the plan was not measured for
    (not float32, not CPU, autograd, a non-contiguous weight) goes to F.linear. `calls` counts the kernel that ran.
    """

    def __init__(self, linear: nn.Linear, plan: LinearPlan) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.plan = plan
        self.calls: Counter[str] = Counter()

    def kernel_for(self, x: torch.Tensor) -> str:
        weight = self.weight
        rows = x.numel() // max(x.shape[-1], 1)
        if rows == 0 or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
            return "torch"
        if weight.device.type != "cpu" or not weight.is_contiguous():
            return "torch"
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):  # oneDNN's op has no backward
            return "torch"
        return self.plan.kernel_for(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.kernel_for(x)
        self.calls[name] += 1
        if name == "torch":
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        return KERNELS[name](flat, self.weight, self.bias).view(*x.shape[:-1], self.out_features)


# ---- choosing, once per model ---------------------------------------------------------------------------------

_probed: dict[tuple[Any, ...], LinearPlan] = {}  # a second engine on the same shapes and threads is not re-timed


def choose_linear_kernels(model: nn.Module, budget_s: float = 1.0) -> LinearPlan:
    """Time the model's GEMM shapes with each kernel; swap its nn.Linear modules for CpuLinear if one is faster.

    Only for float32 models on CPU. Returns the plan, whose `describe()` Ready reports; a model that already
    went through this (a second engine on it) keeps its plan.
    """
    chosen = next((m.plan for m in model.modules() if isinstance(m, CpuLinear)), None)
    if chosen is not None:
        return chosen
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    if not linears:
        return LinearPlan(reason="no nn.Linear layers")
    weight = linears[0].weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        where = weight.device.type if weight.device.type != "cpu" else str(weight.dtype).removeprefix("torch.")
        return LinearPlan(reason=f"{where}: torch's own kernels")
    plan = probe(model, budget_s)
    if plan.fast:
        install(model, plan)
    return plan


def install(model: nn.Module, plan: LinearPlan) -> int:
    """Replace every plain nn.Linear of `model` (without hooks) by a CpuLinear sharing its parameters; returns how many.

    A module reached from two parents is replaced by one CpuLinear in both.
    """
    replaced: dict[int, CpuLinear] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or has_hooks(child):
                continue
            if id(child) not in replaced:
                replaced[id(child)] = CpuLinear(child, plan)
            setattr(parent, name, replaced[id(child)])
    return len(replaced)


def has_hooks(module: nn.Module) -> bool:
    """Hooks or an instance-level forward (accelerate's offloading) would be lost by replacing the module."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def probe(model: nn.Module, budget_s: float = 1.0) -> LinearPlan:
    """Per row range, the fastest kernel over the model's heaviest weight shapes (weighted by how often each occurs)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [m for m in model.modules() if type(m) is nn.Linear and m is not output]
    if not linears:  # only an output projection: time that
        linears = [m for m in model.modules() if type(m) is nn.Linear]
    shapes: Counter[tuple[int, int]] = Counter(tuple(m.weight.shape) for m in linears)
    heaviest = sorted(shapes, key=lambda s: shapes[s] * s[0] * s[1], reverse=True)[:PROBE_SHAPES]
    ranges = ((1, FEW_ROWS, PROBE_ROWS[0]), (FEW_ROWS + 1, None, PROBE_ROWS[1]))
    key = (tuple((s, shapes[s]) for s in heaviest), torch.get_num_threads(), torch.backends.cpu.get_cpu_capability())
    if key in _probed:
        return _probed[key]
    weights = {tuple(m.weight.shape): m.weight.detach() for m in reversed(linears)}  # the model's own tensors
    gen = torch.Generator().manual_seed(0)  # not the global generator: probing must not shift users' random streams
    slice_s = budget_s / (len(heaviest) * sum(len(rows) for *_, rows in ranges))
    choices = []
    with torch.inference_mode():
        for first, last, rows_list in ranges:
            totals = dict.fromkeys(candidates(few_rows=last is not None), 0.0)
            for shape in heaviest:
                for rows in rows_list:
                    x = torch.randn(rows, shape[1], generator=gen)
                    measured = _time_kernels(list(totals), x, weights[shape], slice_s)
                    totals = {n: t + measured[n] * shapes[shape] * 1000 for n, t in totals.items() if n in measured}
            best = min(totals, key=totals.__getitem__)
            if best != "torch" and totals[best] > (1 - MIN_GAIN) * totals.get("torch", float("inf")):
                best = "torch"
            choices.append(KernelChoice(first, last, best, {n: round(t, 3) for n, t in totals.items()}))
    plan = LinearPlan(tuple(choices))
    _probed[key] = plan
    log.info("linear kernels: %s", plan.describe())
    return plan


def _time_kernels(names: list[str], x: torch.Tensor, weight: torch.Tensor, slice_s: float) -> dict[str, float]:
    """Best seconds of one call per kernel, the kernels interleaved so a busy neighbour slows them alike.

    A kernel that raises or disagrees with F.linear is left out of the result.
    """
    deadline = time.perf_counter() + slice_s
    reference = F.linear(x, weight)
    working = []
    for name in names:
        try:
            ok = torch.allclose(KERNELS[name](x, weight, None), reference, rtol=1e-4, atol=1e-4)
        except RuntimeError:
            ok = False
        if ok:
            working.append(name)
    best = dict.fromkeys(working, float("inf"))
    for _ in range(PROBE_ROUNDS):
        for name in working:
            started = time.perf_counter()
            KERNELS[name](x, weight, None)
            best[name] = min(best[name], time.perf_counter() - started)
        if time.perf_counter() > deadline:
            break
    return best
