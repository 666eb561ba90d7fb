"""Settings: typed, env-overridable, picklable, and strict about bad values."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from toolkit import Settings


def test_defaults_are_the_documented_ones() -> None:
    s = Settings()
    assert (s.model, s.device, s.dtype) == ("smollm2-135m-instruct", "auto", "auto")
    assert s.max_batch_size == 32 and s.max_batch_tokens is None and s.num_threads is None  # None: the host decides


def test_every_field_reads_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLKIT_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("TOOLKIT_DEVICE", "cuda:1")
    monkeypatch.setenv("TOOLKIT_RESTART_ON_HANG", "true")
    s = Settings()
    assert (s.max_batch_size, s.device, s.restart_on_hang) == (7, "cuda:1", True)
    assert Settings(max_batch_size=3).max_batch_size == 3  # explicit beats environment


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", -1),
        ("max_batch_tokens", 0),
        ("block_size", 0),
        ("kv_cache_gib", -0.5),
        ("max_queue_size", 0),
        ("device", "tpu"),
        ("device", "cuda:x"),
        ("dtype", "int3"),
        ("hang_timeout_s", 0),
        ("step_timeout_s", -1.0),
        ("model", ""),
    ],
)
def test_invalid_values_are_rejected_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**{field: value})
    assert field in str(info.value)


def test_invalid_environment_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLKIT_BLOCK_SIZE", "-4")
    with pytest.raises(ValidationError, match="block_size"):
        Settings()


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="max_batch_sise"):
        Settings(max_batch_sise=4)


def test_pickles_and_replaces() -> None:
    s = Settings(model="tiny-random-llama")
    assert pickle.loads(pickle.dumps(s)) == s
    t = s.replace(max_batch_size=2)
    assert (t.max_batch_size, t.model, s.max_batch_size) == (2, "tiny-random-llama", 32)
    with pytest.raises(ValidationError):
        s.replace(max_batch_size=0)


def test_ipc_dir_is_not_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sockets' dir is the worker entry point's argument, not public configuration."""
    monkeypatch.setenv("TOOLKIT_IPC_DIR", "/tmp/somewhere")
    assert "ipc_dir" not in Settings().model_dump()
    with pytest.raises(ValidationError, match="ipc_dir"):
        Settings(ipc_dir="/tmp/somewhere")


def test_auto_dtype_is_float32_on_cpu() -> None:
    import torch

    from toolkit.models import resolve_dtype

    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16  # asked for explicitly: kept, with a warning


@pytest.mark.parametrize(
    ("dtype", "flags", "warns"),
    [
        ("bfloat16", {"avx2", "fma"}, True),  # the AVX2-only EPYC: bf16 GEMM at 1.2 GFLOP/s
        ("bfloat16", {"avx512f", "avx512_bf16"}, False),
        ("bfloat16", {"avx512f", "amx_bf16"}, False),
        ("float16", {"avx512f", "avx512_bf16"}, True),
        ("float16", {"avx512f", "avx512_fp16"}, False),
        ("float16", {"amx_fp16"}, False),
        ("float32", {"avx2"}, False),
        ("bfloat16", set(), False),  # no /proc/cpuinfo (macOS): nothing is claimed
    ],
)
def test_dtype_warning_follows_the_cpu_flags(dtype: str, flags: set[str], warns: bool) -> None:
    import torch

    from toolkit.engine.hardware import cpu_capability, dtype_warnings

    got = dtype_warnings("cpu", getattr(torch, dtype), frozenset(flags))
    assert bool(got) == warns
    if warns:
        assert dtype in got[0] and cpu_capability() in got[0] and "float32" in got[0]
    assert dtype_warnings("cuda", getattr(torch, dtype), frozenset(flags)) == []


def test_cpu_flags_are_read_from_cpuinfo(tmp_path) -> None:
    from toolkit.engine.hardware import cpu_flags

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimdhp bf16\n")
    assert cpu_flags(str(x86)) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(str(arm)) == {"fp", "asimd", "asimdhp", "bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()
