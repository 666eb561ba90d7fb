"""The host probe, the dtypes "auto" may pick, and the knobs a worker chooses from the host when Settings leave them."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from tests.conftest import tiny_settings
from toolkit import models, start_model_worker
from toolkit.engine import hardware
from toolkit.engine.hardware import (
    BUDGET_BOUNDS,
    auto_max_batch_tokens,
    cgroup_cpu_limit,
    choose_num_threads,
    native_dtype,
    physical_cores,
    probe_host,
)


@pytest.mark.timeout(60)
def test_probe_host_reports_every_field_in_sane_ranges() -> None:
    host = probe_host(min_s=0.05)
    assert host.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert host.cpu_model and host.torch_version == torch.__version__
    assert host.torch_threads == torch.get_num_threads()
    assert 1 <= host.physical_cores <= host.usable_cpus <= (os.cpu_count() or 1)
    assert set(host.cpu_flags) <= set(hardware.NOTABLE_FLAGS)
    assert host.native_bf16 == bool(set(host.cpu_flags) & {"avx512_bf16", "amx_bf16", "bf16"})
    assert set(host.gemm_gflops) == {"float32", "bfloat16"}
    # a float32 GEMM between a loaded laptop core and a large server; an emulated bfloat16 may crawl (1.2 on AVX2)
    assert 0.5 < host.gemm_gflops["float32"] < 100_000 and 0.01 < host.gemm_gflops["bfloat16"] < 100_000
    assert 0.05 < host.mem_bandwidth_gbs < 10_000  # GB/s of a 64 MiB copy
    assert 0 < host.probe_s < 30  # ~1 s on a quiet host; the bound leaves room for a loaded 2-core one
    record = json.loads(json.dumps(host.as_dict()))
    assert record["cpu_capability"] == host.cpu_capability and record["gemm_gflops"]["float32"] > 0
    title = host.title()
    assert host.cpu_model in title and host.cpu_capability in title and "GFLOP/s" in title and "GB/s" in title


def test_physical_cores_count_smt_siblings_once(tmp_path) -> None:
    for cpu, (package, core) in enumerate([(0, 0), (0, 0), (0, 1), (1, 0)]):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    assert physical_cores([0, 1, 2, 3], sysfs=str(tmp_path)) == 3  # cpu0 and cpu1 share a core
    assert physical_cores([0, 1], sysfs=str(tmp_path)) == 1
    assert physical_cores([0, 1, 7], sysfs=str(tmp_path)) == 3  # no topology for cpu7: count CPUs


@pytest.mark.parametrize(("text", "expected"), [("200000 100000\n", 2.0), ("150000 100000", 1.5),
                                                 ("max 100000\n", None), ("garbage", None)])
def test_cgroup_quota_is_read_from_cpu_max(tmp_path, text: str, expected: float | None) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(text)
    assert cgroup_cpu_limit(str(path)) == expected
    assert cgroup_cpu_limit(str(tmp_path / "missing")) is None


def test_default_threads_are_physical_cores_within_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "usable_cpus", lambda: list(range(8)))
    monkeypatch.setattr(hardware, "physical_cores", lambda cpus=None: 4)
    monkeypatch.setattr(hardware, "cgroup_cpu_limit", lambda: None)
    assert choose_num_threads()[0] == 4
    monkeypatch.setattr(hardware, "cgroup_cpu_limit", lambda: 1.5)
    threads, why = choose_num_threads()
    assert threads == 2 and "quota" in why


def test_auto_budget_follows_the_measured_gemm_speed() -> None:
    per_token = 2 * (134_515_008 - 28_311_552)  # SmolLM2-135M without its lm_head: 0.21 GFLOP a token
    avx512 = auto_max_batch_tokens(per_token, 500.0, max_batch_size=32)
    avx2 = auto_max_batch_tokens(per_token, 130.0, max_batch_size=32)
    assert avx512 == 576 and avx2 == BUDGET_BOUNDS[0]  # 0.25 s x 500e9 / 0.212e9 = 588 -> 576; AVX2 at the floor
    assert auto_max_batch_tokens(per_token, 1e6, 32) == BUDGET_BOUNDS[1]  # a GPU: the ceiling
    assert auto_max_batch_tokens(per_token, math.nan, 32) == BUDGET_BOUNDS[0]  # nothing measured: the floor
    assert auto_max_batch_tokens(per_token, 130.0, max_batch_size=300) == 300  # every running sequence decodes
    assert avx512 % 64 == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_dtype_on_cpu_follows_the_flags(dtype: torch.dtype) -> None:
    assert native_dtype(torch.float32, "cpu", frozenset()) is True
    assert native_dtype(dtype, "cpu", frozenset({"avx2", "fma"})) is False  # the AVX2 EPYC of issue 14
    assert native_dtype(dtype, "cpu", frozenset()) is False  # nothing known: not assumed native
    native = {torch.bfloat16: "avx512_bf16", torch.float16: "avx512_fp16"}[dtype]
    assert native_dtype(dtype, "cpu", frozenset({"avx512f", native})) is True


def test_auto_dtype_never_picks_a_type_the_probe_says_is_emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    native: set[torch.dtype] = set()
    monkeypatch.setattr(hardware, "native_dtype", lambda dtype, device="cpu", flags=None: dtype in native)
    assert models.resolve_dtype("auto", "cuda") == torch.float32  # neither half type native: float32
    native.add(torch.float16)
    assert models.resolve_dtype("auto", "cuda") == torch.float16  # a pre-Ampere GPU: fp16, not emulated bf16
    native.add(torch.bfloat16)
    assert models.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert models.resolve_dtype("auto", "cpu") == torch.float32  # CPU: the exact reference even where bf16 is native
    native.clear()
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # an explicit choice is the user's


def test_settings_accept_auto_for_the_host_chosen_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    from toolkit import Settings

    assert Settings(max_batch_tokens="auto", num_threads="auto").max_batch_tokens is None
    monkeypatch.setenv("TOOLKIT_NUM_THREADS", "auto")
    assert Settings().num_threads is None
    assert Settings(max_batch_tokens=512).max_batch_tokens == 512


def test_engine_chooses_the_budget_from_the_host_only_when_not_given() -> None:
    from toolkit.engine.core import Engine

    model, tokenizer = models.load("tiny-random-llama", "cpu", "float32")
    engine = Engine(tiny_settings(num_kv_blocks=32), model=model, tokenizer=tokenizer)
    assert BUDGET_BOUNDS[0] <= engine.max_batch_tokens <= BUDGET_BOUNDS[1]
    assert engine.scheduler.max_batch_tokens == engine.max_batch_tokens and engine.gemm_gflops > 0
    assert engine.auto_knobs["max_batch_tokens"].startswith(f"{engine.max_batch_tokens}: ")
    given = Engine(tiny_settings(num_kv_blocks=32, max_batch_tokens=96), model=model, tokenizer=tokenizer)
    assert given.scheduler.max_batch_tokens == 96 and given.auto_knobs == {} and given.gemm_gflops == 0.0
    info = given.ready_info()
    assert info["max_batch_tokens"] == 96 and info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


@pytest.mark.timeout(180)
def test_ready_and_health_carry_the_capability_and_the_chosen_knobs() -> None:
    with start_model_worker(tiny_settings(num_threads=None)) as worker:
        info, health = worker.info, worker.health()
        threads, why = choose_num_threads()
        assert info.num_threads == threads and info.auto_knobs["num_threads"] == why
        assert BUDGET_BOUNDS[0] <= info.max_batch_tokens <= BUDGET_BOUNDS[1] and info.gemm_gflops > 0
        assert info.auto_knobs["max_batch_tokens"].startswith(f"{info.max_batch_tokens}: ")
        assert info.cpu_capability == torch.backends.cpu.get_cpu_capability()
        assert info.native_bf16 == native_dtype(torch.bfloat16, "cpu") and info.cpu_model == hardware.cpu_model()
        assert health["cpu_capability"] == info.cpu_capability and health["native_bf16"] == info.native_bf16
        assert (health["num_threads"], health["max_batch_tokens"]) == (threads, info.max_batch_tokens)
        assert health["auto_knobs"] == dict(info.auto_knobs)
    with start_model_worker(tiny_settings(num_threads=1, max_batch_tokens=64)) as worker:
        assert (worker.info.num_threads, worker.info.max_batch_tokens) == (1, 64)
        assert worker.info.auto_knobs == {} and worker.health()["auto_knobs"] == {}
