"""What this CPU can do natively, so a dtype that would run at a hundredth of float32's speed is said out loud.

On an AVX2-only EPYC a bfloat16 GEMM measured 1.2 GFLOP/s against 125 for float32: without AVX512_BF16 / AMX-BF16
(or AVX512_FP16 / AMX-FP16 for float16) torch emulates the type. Read from torch's own dispatch level and from
/proc/cpuinfo's flags; where neither says anything (not Linux), nothing is claimed.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path

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


@functools.cache
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first processor's feature flags; empty where the file does not exist (macOS, Windows)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def dtype_warnings(device: torch.device | str, dtype: torch.dtype, flags: frozenset[str] | None = None) -> list[str]:
    """A warning when `dtype` runs on a CPU that has no native arithmetic for it; empty otherwise."""
    if torch.device(device).type != "cpu" or dtype not in NATIVE_FLAGS:
        return []
    flags = cpu_flags() if flags is None else flags
    if not flags or flags & NATIVE_FLAGS[dtype]:
        return []
    name = str(dtype).removeprefix("torch.")
    needs = " / ".join(sorted(f.upper() for f in NATIVE_FLAGS[dtype] if f.startswith(("avx", "amx"))))
    return [
        f"dtype {name} on a CPU without native {name} arithmetic ({cpu_capability() or platform.machine()}, "
        f"no {needs}): torch emulates it, slower than float32 and up to 100x so on AVX2 hosts; "
        "use dtype='float32' (or 'auto')"
    ]


def hardware_info(device: torch.device | str, dtype: torch.dtype) -> dict[str, object]:
    """The Ready fields about the host: cpu_capability and warnings (each also logged once, here)."""
    warnings = dtype_warnings(device, dtype)
    for warning in warnings:
        log.warning(warning)
    return {"cpu_capability": cpu_capability(), "warnings": warnings}
