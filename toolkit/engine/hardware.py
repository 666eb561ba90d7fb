"""What this host can do, measured once at start-up: the CPU, its native dtypes, its GEMM and memory speed.

On an AVX2-only EPYC a bfloat16 GEMM measured 1.2 GFLOP/s against 125 for float32: without AVX512_BF16 / AMX-BF16
(or AVX512_FP16 / AMX-FP16 for float16) torch emulates the type. Native support is read from /proc/cpuinfo's flags
(and torch's own dispatch level); where neither says anything (not Linux), nothing is claimed for a warning and
nothing is assumed native. `probe_host` adds the measured float32 / bfloat16 GEMM GFLOP/s and memory bandwidth
(well under 2 s): the benchmark records it beside every result and the worker chooses its default knobs from it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# dtype -> CPU flags (x86 /proc/cpuinfo "flags", arm64 "Features") any one of which means native arithmetic
NATIVE_FLAGS: dict[torch.dtype, frozenset[str]] = {
    torch.bfloat16: frozenset({"avx512_bf16", "amx_bf16", "bf16"}),
    torch.float16: frozenset({"avx512_fp16", "amx_fp16", "fphp", "asimdhp"}),
}


def cpu_capability() -> str:
    """torch's CPU dispatch level: 'AVX512', 'AVX2', 'DEFAULT', ... ('' where torch cannot say)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return ""


def _cpuinfo_field(path: str, keys: tuple[str, ...]) -> str | None:
    """The first non-empty value of any of `keys` in /proc/cpuinfo's format; None where there is none or no file."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in keys and value.strip():
            return value.strip()
    return None


@functools.cache
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first processor's feature flags; empty where the file does not exist (macOS, Windows)."""
    return frozenset((_cpuinfo_field(path, ("flags", "features")) or "").split())


def native_features(dtype: torch.dtype) -> str:
    """The CPU features that give `dtype` native arithmetic, as a warning names them: "AMX_BF16 / AVX512_BF16"."""
    return " / ".join(sorted(f.upper() for f in NATIVE_FLAGS.get(dtype, ()) if f.startswith(("avx", "amx"))))


def dtype_warnings(device: torch.device | str, dtype: torch.dtype, flags: frozenset[str] | None = None) -> list[str]:
    """A warning when `dtype` runs on a CPU that has no native arithmetic for it; empty otherwise."""
    if torch.device(device).type != "cpu" or dtype not in NATIVE_FLAGS:
        return []
    flags = cpu_flags() if flags is None else flags
    if not flags or flags & NATIVE_FLAGS[dtype]:
        return []
    name = str(dtype).removeprefix("torch.")
    return [
        f"dtype {name} on a CPU without native {name} arithmetic ({cpu_capability() or platform.machine()}, "
        f"no {native_features(dtype)}): torch emulates it, slower than float32 and up to 100x so on AVX2 hosts; "
        "use dtype='float32' (or 'auto')"
    ]


def hardware_info(device: torch.device | str, dtype: torch.dtype) -> dict[str, object]:
    """The Ready fields about the host: CPU, capability, native bf16 / fp16, warnings (each also logged once, here)."""
    warnings = dtype_warnings(device, dtype)
    for warning in warnings:
        log.warning(warning)
    return {"cpu_model": cpu_model(), "cpu_capability": cpu_capability(), "warnings": warnings,
            "native_bf16": native_dtype(torch.bfloat16, device), "native_fp16": native_dtype(torch.float16, device)}


# ---- what the host is -----------------------------------------------------------------------------------------

# the flags a reader of a benchmark needs to place a host: vector width, dot products, bf16 / fp16 arithmetic, AMX
NOTABLE_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                 "amx_fp16", "asimd", "asimdhp", "sve", "bf16", "i8mm")


@functools.cache
def cpu_model(path: str = "/proc/cpuinfo") -> str:
    """The CPU's marketing name ("AMD EPYC 7B13"); platform's processor or machine where /proc/cpuinfo is missing."""
    return _cpuinfo_field(path, ("model name", "hardware")) or platform.processor() or platform.machine()


def native_dtype(dtype: torch.dtype, device: torch.device | str = "cpu", flags: frozenset[str] | None = None) -> bool:
    """Whether `device` does `dtype` arithmetic in hardware; float32 always, bf16 / fp16 only where a flag says so.

    CPU: one of NATIVE_FLAGS[dtype] in the CPU's flags (no flags known: False). CUDA: bf16 from compute capability
    8.0 (torch's check without emulation), fp16 on every GPU torch supports. MPS: fp16 yes, bf16 no.
    """
    kind = torch.device(device).type
    if dtype == torch.float32:
        return True
    if kind == "cuda":
        if not torch.cuda.is_available():
            return False
        if dtype == torch.bfloat16:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        return dtype == torch.float16
    if kind == "mps":
        return dtype == torch.float16
    if dtype not in NATIVE_FLAGS:
        return False
    return bool((cpu_flags() if flags is None else flags) & NATIVE_FLAGS[dtype])


def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on (its affinity mask; every CPU where the OS has no such call)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(cpus: Iterable[int] | None = None, sysfs: str = "/sys/devices/system/cpu") -> int:
    """Distinct physical cores among `cpus` (SMT siblings count once); the number of CPUs where sysfs is missing."""
    cpus = usable_cpus() if cpus is None else list(cpus)
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = Path(sysfs, f"cpu{cpu}", "topology")
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def cgroup_cpu_limit(path: str = "/sys/fs/cgroup/cpu.max") -> float | None:
    """CPUs a container's cgroup v2 quota allows ("200000 100000" = 2.0); None when unlimited or unknown."""
    try:
        parts = Path(path).read_text().split()
    except OSError:
        return None
    if len(parts) < 2 or parts[0] == "max":
        return None
    try:
        return int(parts[0]) / int(parts[1])
    except (ValueError, ZeroDivisionError):
        return None


def choose_num_threads() -> tuple[int, str]:
    """(threads, why): torch threads when the user names none, and the numbers behind them, for Ready.auto_knobs.

    Why physical cores: two threads on SMT siblings share one core's vector units, so a GEMM gains nothing and the
    threads wait on each other; why the affinity mask and the quota: a container or `taskset` that grants 2 CPUs of a
    64-CPU machine must not get 64 threads (torch's own default counts the machine's cores, not the process's).
    """
    cpus = usable_cpus()
    threads = physical_cores(cpus)
    why = f"{threads}: physical cores among the {len(cpus)} CPUs this process may use"
    limit = cgroup_cpu_limit()
    if limit is not None and math.ceil(limit) < threads:
        threads = max(1, math.ceil(limit))
        why = f"{threads}: the cgroup's CPU quota ({limit:g} CPUs) of {len(cpus)} usable CPUs"
    return threads, why


def set_num_threads(requested: int | None) -> dict[str, str]:
    """Give torch `requested` threads, or the host's choice when None; returns the auto_knobs entry saying why."""
    if requested is not None:
        torch.set_num_threads(requested)
        return {}
    threads, why = choose_num_threads()
    torch.set_num_threads(threads)
    return {"num_threads": why}


# ---- what the host measures -----------------------------------------------------------------------------------

GEMM_SHAPE = (512, 576, 1536)  # M x K x N: a prefill chunk through SmolLM2's MLP
COPY_BYTES = 64 * 2**20  # twice the largest L3 slice seen here, so the copy streams from memory


def gemm_gflops(dtype: str, device: str = "cpu", shape: tuple[int, int, int] = GEMM_SHAPE, min_s: float = 0.3
                ) -> float:
    """Best-of GFLOP/s of one M x K x N product in `dtype` over about `min_s` seconds per kernel.

    The fastest of torch's matmul and, for float32 on CPU, the kernels the engine's CPU linear layer may choose
    (oneDNN: twice MKL's speed on an AVX-512 EPYC): the ceiling is what the machine can do, not what one library does.
    A dtype so slow that one product outlasts `min_s` (bfloat16 emulated on AVX2: ~0.7 s) is timed once.
    """
    from toolkit.layers.linear import KERNELS, candidates

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


def mem_bandwidth_gbs(nbytes: int = COPY_BYTES, device: str = "cpu", min_s: float = 0.1) -> float:
    """Best-of GB/s of one tensor copy (bytes read + bytes written, as STREAM's copy counts them)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src), device, min_s) / 1e9


def _best_seconds(work: Callable[[], Any], device: str, min_s: float) -> float:
    """The fastest time of `work` over about `min_s`; a first call longer than `min_s` is the answer itself."""
    first = _timed(work, device, 1)
    if first >= min_s:
        return first
    reps = max(1, min(5, int(0.1 * min_s / max(first, 1e-9))))
    best = first
    deadline = time.perf_counter() + min_s
    while time.perf_counter() < deadline:
        best = min(best, _timed(work, device, reps))
    return best


def _timed(work: Callable[[], Any], device: str, reps: int) -> float:
    _sync(device)
    started = time.perf_counter()
    for _ in range(reps):
        work()
    _sync(device)
    return (time.perf_counter() - started) / reps


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass(frozen=True, slots=True)
class HostInfo:
    """One host as `probe_host` found it: what the benchmark stores beside every result and the worker reports."""

    cpu_model: str
    cpu_capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "DEFAULT", ...
    cpu_flags: tuple[str, ...]  # the NOTABLE_FLAGS this CPU has
    native_bf16: bool
    native_fp16: bool
    usable_cpus: int  # logical CPUs in this process's affinity mask
    physical_cores: int  # physical cores among them
    torch_threads: int  # torch.get_num_threads() when measured
    torch_version: str
    gemm_gflops: dict[str, float] = field(default_factory=dict)  # dtype -> measured GFLOP/s on the CPU
    mem_bandwidth_gbs: float = math.nan  # tensor copy, read + write
    probe_s: float = 0.0  # how long the measurements took

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def title(self) -> str:
        """One line for a table title: 'AMD EPYC, AVX512 (avx2 fma avx512f ...; native bf16), GEMM float32 ...'."""
        gemm = " / ".join(f"{dtype} {gflops:.0f}" for dtype, gflops in self.gemm_gflops.items())
        natives = [name for name, yes in (("bf16", self.native_bf16), ("fp16", self.native_fp16)) if yes]
        flags = " ".join(self.cpu_flags) or "no notable flags"
        native = " ".join(natives) or "float32 only"
        return (f"{self.cpu_model}, {self.cpu_capability or platform.machine()} ({flags}; native {native}), "
                f"GEMM {gemm or '?'} GFLOP/s, memory "
                f"{self.mem_bandwidth_gbs:.1f} GB/s, torch {self.torch_version}, {self.torch_threads} threads of "
                f"{self.physical_cores} cores")


def probe_host(gemm_dtypes: Iterable[str] = ("float32", "bfloat16"), bandwidth: bool = True,
               min_s: float = 0.15) -> HostInfo:
    """The host record: CPU model, capability, notable flags, native dtypes, cores, torch; and, measured on the CPU
    with the current torch threads, the GEMM GFLOP/s of each of `gemm_dtypes` and the memory bandwidth.

    About 0.3 s per dtype on a native host plus 0.1 s for the copy; an emulated bfloat16 costs one product (~0.7 s
    on an AVX2 EPYC). The benchmark's roofline uses its own longer GEMM measurement (gemm_gflops, min_s=1).
    """
    started = time.perf_counter()
    flags = cpu_flags()
    gemm = {dtype: gemm_gflops(dtype, "cpu", min_s=min_s) for dtype in gemm_dtypes}
    return HostInfo(
        cpu_model=cpu_model(), cpu_capability=cpu_capability(),
        cpu_flags=tuple(flag for flag in NOTABLE_FLAGS if flag in flags),
        native_bf16=native_dtype(torch.bfloat16, "cpu", flags), native_fp16=native_dtype(torch.float16, "cpu", flags),
        usable_cpus=len(usable_cpus()), physical_cores=physical_cores(), torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__, gemm_gflops=gemm,
        mem_bandwidth_gbs=mem_bandwidth_gbs() if bandwidth else math.nan, probe_s=time.perf_counter() - started,
    )


# ---- knobs from the host --------------------------------------------------------------------------------------

TARGET_STEP_S = 0.25  # the step latency the automatic token budget aims at
BUDGET_BOUNDS = (256, 2048)  # the automatic token budget's floor and ceiling
BUDGET_MULTIPLE = 64


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


def auto_max_batch_tokens(flops_per_token: float, gemm_gflops: float, max_batch_size: int,
                          target_step_s: float = TARGET_STEP_S) -> int:
    """The step token budget when the user gives none: the tokens whose matmuls take about `target_step_s` at the
    measured GEMM speed, rounded down to a multiple of 64, within BUDGET_BOUNDS and never under max_batch_size.

    flops_per_token: 2 x the parameters a prompt token is multiplied by (param_counts, lm_head excluded). Why this
    rule: a step's time is mostly its matmuls, so the budget sets how long a prefill chunk holds up every running
    sequence's next token (the inter-token latency); at 0.25 s a step, 576 tokens on a ~500 GFLOP/s AVX-512 core
    pair and 256 (the floor, where re-reading the weights each step starts to cost) on a ~130 GFLOP/s AVX2 one.
    A budget under max_batch_size would leave running sequences without their decode token in a step.
    """
    if flops_per_token <= 0 or not gemm_gflops > 0:
        tokens = BUDGET_BOUNDS[0]
    else:
        tokens = int(target_step_s * gemm_gflops * 1e9 / flops_per_token) // BUDGET_MULTIPLE * BUDGET_MULTIPLE
    return max(max_batch_size, min(BUDGET_BOUNDS[1], max(BUDGET_BOUNDS[0], tokens)))


def choose_max_batch_tokens(requested: int | None, model: Any, device: torch.device | str, dtype: torch.dtype,
                            max_batch_size: int) -> tuple[int, float, dict[str, str]]:
    """(tokens, GEMM GFLOP/s measured, auto_knobs entry): `requested` as given (nothing measured, no entry), or when
    None auto_max_batch_tokens for `model` from a GEMM timed here (~0.3 s), with the reason."""
    if requested is not None:
        return requested, 0.0, {}
    name = str(dtype).removeprefix("torch.")
    gflops = gemm_gflops(name, str(torch.device(device)), min_s=0.15)
    params, head = param_counts(model)
    per_token = 2.0 * (params - head)
    tokens = auto_max_batch_tokens(per_token, gflops, max_batch_size)
    why = (f"{tokens}: a ~{TARGET_STEP_S:g} s step at the {name} GEMM speed measured at start-up ({gflops:.0f} GFLOP/s)"
           f" and {per_token / 1e9:.3g} GFLOP a token, within {BUDGET_BOUNDS[0]}-{BUDGET_BOUNDS[1]}")
    return tokens, gflops, {"max_batch_tokens": why}
