"""Fused projections: q, k and v as one GEMM, gate and up as one (vLLM's QKVParallelLinear, MergedColumnParallelLinear).

A decode step of SmolLM2 is 32 rows through 211 small GEMMs; three GEMMs over the same input cost more than one
GEMM over their stacked weights (each call re-reads the input, pays its own thread wake-up and packs a narrower
output). HF modeling code calls `q_proj(x)`, `k_proj(x)`, `v_proj(x)` one after the other, so rather than rewrite
each model's attention, every projection of a group is replaced by a `ProjectionSlice`: the first one called runs
the group's stacked GEMM and keeps the other slices' outputs until they are asked for with the same input tensor.
A slice called with a different input (cross-attention, a model calling them apart) computes its own part alone.

The weights are not copied: the stacked weight is built once and each slice's `weight` becomes a view into it, so
`state_dict()`, tied checks and `model.generate` see the same parameters as before.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.layers.linear import CpuLinear, LinearPlan, has_hooks

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # Llama, Mistral, Qwen2/3, Gemma, Phi-3 naming


class FusedProjection(nn.Module):
    """One GEMM over a stacked weight; hands each part of its output to the slice that asks for it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int], plan: LinearPlan | None):
        super().__init__()
        stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        stacked.weight = nn.Parameter(weight, requires_grad=False)
        stacked.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.linear: nn.Linear = CpuLinear(stacked, plan) if plan is not None and plan.fast else stacked
        self.sizes = sizes
        self._input: torch.Tensor | None = None  # the input whose parts are waiting; held so its id stays unique
        self._parts: list[torch.Tensor | None] = []

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Part `index` of the stacked output for x: from the waiting parts if x is their input, else a new GEMM."""
        if x is not self._input or self._parts[index] is None:
            self._parts = list(self.linear(x).split(self.sizes, dim=-1))
            self._input = x
        out, self._parts[index] = self._parts[index], None
        if all(p is None for p in self._parts):
            self._input, self._parts = None, []
        assert out is not None
        return out


class ProjectionSlice(nn.Linear):
    """Stands in for one projection of a fused group; its weight (and bias) are views into the stacked ones."""

    def __init__(self, fused: FusedProjection, index: int, start: int, end: int) -> None:
        super().__init__(fused.linear.in_features, end - start, bias=fused.linear.bias is not None, device="meta")
        self.weight = nn.Parameter(fused.linear.weight[start:end], requires_grad=False)
        self.bias = None if fused.linear.bias is None else nn.Parameter(fused.linear.bias[start:end],
                                                                         requires_grad=False)
        self.index = index
        object.__setattr__(self, "fused", fused)  # not a submodule: the group is owned by the parent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return self.fused.part(self.index, x)


def fuse_projections(model: nn.Module, plan: LinearPlan | None = None) -> int:
    """Stack each module's q/k/v and gate/up projections into one GEMM; returns how many groups are fused.

    `plan` is the model's CPU kernel plan (`choose_linear_kernels`), used for the stacked GEMMs too. A module is
    left alone unless all projections of a group are plain linear layers (nn.Linear or CpuLinear) without hooks,
    on one input width, all with or all without bias, one dtype and device. Calling it again is a no-op.
    """
    fused = 0
    for parent in list(model.modules()):
        for names in GROUPS:
            parts = [getattr(parent, n, None) for n in names]
            if all(isinstance(p, ProjectionSlice) for p in parts):
                fused += 1
            elif _fusable(parts):
                _fuse(parent, names, parts, plan)  # type: ignore[arg-type]
                fused += 1
    return fused


def _fusable(parts: list[object]) -> bool:
    if not all(type(p) in (nn.Linear, CpuLinear) for p in parts):
        return False
    linears: list[nn.Linear] = parts  # type: ignore[assignment]
    if any(has_hooks(p) for p in linears):
        return False
    first = linears[0].weight
    return all(
        p.in_features == linears[0].in_features and (p.bias is None) == (linears[0].bias is None)
        and p.weight.dtype == first.dtype and p.weight.device == first.device and not p.weight.requires_grad
        for p in linears
    )


def _fuse(parent: nn.Module, names: tuple[str, ...], parts: list[nn.Linear], plan: LinearPlan | None) -> None:
    """Stack the weights, then point every projection at its rows: the originals are freed, nothing is duplicated."""
    weight = torch.cat([p.weight.detach() for p in parts])
    bias = torch.cat([p.bias.detach() for p in parts]) if parts[0].bias is not None else None
    sizes = [p.out_features for p in parts]
    group = FusedProjection(weight, bias, sizes, plan)
    start = 0
    for index, (name, size) in enumerate(zip(names, sizes, strict=True)):
        setattr(parent, name, ProjectionSlice(group, index, start, start + size))
        start += size
    for module in parts:
        weight = module.weight  # the guard in _release_pages counts this name
        _release_pages(weight)


_MADV_DONTNEED = 4


def _release_pages(tensor: torch.Tensor) -> None:
    """Hand the whole pages of a replaced weight back to the kernel, when nothing but its module holds it.

    Weights loaded from safetensors are slices of one private memory-mapped file that stays mapped while any
    weight of it is alive, so dropping a projection's tensor would leave its pages resident beside the stacked copy
    (+50 % of SmolLM2's size in RSS). Unmodified pages of such a mapping read back from the file if ever touched;
    the guard (no other tensor or Python reference) keeps pages anyone could still read out of it.
    """
    if tensor.device.type != "cpu" or sys.platform != "linux" or sys.getrefcount(tensor) > 4:
        return  # 4: the module's parameter dict, the caller's name, this argument, getrefcount's own
    if torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) > 2:  # another tensor views it (2: it + this)
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.untyped_storage().nbytes() - tensor.storage_offset() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page  # pages wholly inside the tensor's storage
    if last <= first:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(_MADV_DONTNEED))
    except (OSError, AttributeError):
        return
