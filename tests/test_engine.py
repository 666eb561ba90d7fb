"""Engine: scheduler + paged runner reproduce `model.generate` token for token, with and without preemption."""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import torch

from toolkit import models
from toolkit.engine.core import Engine
from toolkit.errors import InvalidRequestError
from toolkit.settings import Settings
from toolkit.worker.messages import GenerateRequest, Ready, SamplingParams, StepMetrics

NEAR_TIE = 1e-3


def _settings(name: str, **overrides: Any) -> Settings:
    return Settings(**{"model": name, "device": "cpu", "dtype": "float32", **overrides})


def _reference(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        ids = torch.tensor([prompt], device=model.device)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def _assert_parity(model: Any, prompt: list[int], got: list[int], want: list[int]) -> str | None:
    """Equal, or the first difference is a near-tie in the reference (returns a note saying where)."""
    if got == want:
        return None
    step = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + want[:step]], device=model.device)).logits[0, -1].float()
    top2 = torch.topk(logits, 2).values
    gap = float(top2[0] - top2[1])
    assert gap < NEAR_TIE, f"differs at step {step} with top-2 gap {gap:.2e}: got {got}, want {want}"
    return f"near-tie at step {step} (gap {gap:.1e})"


# ---- fast: the tiny model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    """The reference: never given to an Engine, which makes its model its own (paged attention, CPU linear)."""
    return models.load(models.TINY_MODEL, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def engine_model() -> tuple[Any, Any]:
    return models.load(models.TINY_MODEL, device="cpu", dtype="float32")


@pytest.fixture
def tiny_engine(engine_model: tuple[Any, Any]) -> Engine:
    model, tokenizer = engine_model
    return Engine(_settings(models.TINY_MODEL, num_kv_blocks=64, block_size=8, max_batch_tokens=64),
                  model=model, tokenizer=tokenizer)


def _tiny_prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 49000, (n,), generator=gen).tolist() for n in (5, 70, 17, 33, 1, 120)]


def test_tiny_engine_matches_generate(tiny: tuple[Any, Any], tiny_engine: Engine) -> None:
    prompts = _tiny_prompts()
    reqs = [GenerateRequest(f"r{i}", p, max_new_tokens=12, ignore_eos=True) for i, p in enumerate(prompts)]
    got = tiny_engine.generate(reqs)
    for i, prompt in enumerate(prompts):
        assert _assert_parity(tiny[0], prompt, got[f"r{i}"], _reference(tiny[0], prompt, 12)) is None
    assert tiny_engine.peak_batch_size > 1
    assert tiny_engine.blocks.num_used_blocks == 0 and not tiny_engine.has_work


def test_ready_info_fills_ready(tiny_engine: Engine) -> None:
    info = tiny_engine.ready_info()
    ready = Ready(pid=1, load_time_s=0.0, **info)
    assert msgspec.convert(json.loads(msgspec.json.encode(ready)), Ready) == ready
    assert info["num_kv_blocks"] == 64 and info["block_size"] == 8 and info["vocab_size"] == 49152
    assert info["max_model_len"] == 2048 and info["eos_token_ids"] == [2] and info["dtype"] == "float32"


def test_kv_cache_sized_from_gib(engine_model: tuple[Any, Any]) -> None:
    engine = Engine(_settings(models.TINY_MODEL, kv_cache_gib=1 / 1024, block_size=16), model=engine_model[0],
                    tokenizer=engine_model[1])
    assert engine.num_blocks == 128  # 2 layers * K,V * 2 heads * 16 dims * 16 tokens * 4 bytes = 8 KiB a block
    assert engine.kv_cache_bytes() == 2**20 == engine.runner.cache.nbytes()


def test_add_rejects_out_of_vocab_and_scheduler_refusals(tiny_engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        tiny_engine.add(GenerateRequest("bad", [1, 49152], max_new_tokens=4))
    with pytest.raises(InvalidRequestError):
        tiny_engine.add(GenerateRequest("empty", [], max_new_tokens=4))
    assert not tiny_engine.has_work


def test_step_deltas_and_metrics(tiny_engine: Engine) -> None:
    tiny_engine.add(GenerateRequest("a", list(range(10, 90)), max_new_tokens=3, ignore_eos=True))
    tiny_engine.add(GenerateRequest("b", list(range(10, 20)), max_new_tokens=3, ignore_eos=True))
    deltas, metrics = tiny_engine.step()  # 64-token budget: a's first chunk only
    assert deltas == [] and metrics.kind == "prefill" and metrics.prefill_tokens == 64
    assert isinstance(metrics, StepMetrics) and metrics.batch_size == 1 and metrics.num_waiting == 1
    assert metrics.kv_blocks_used == 8 and metrics.kv_blocks_total == 64 and metrics.rss_bytes > 0
    deltas, metrics = tiny_engine.step()
    assert [d.request_id for d in deltas] == ["a", "b"] and metrics.kind == "prefill" and metrics.batch_size == 2
    deltas, metrics = tiny_engine.step()
    assert metrics.kind == "decode" and metrics.decode_tokens == 2 and all(len(d.token_ids) == 1 for d in deltas)
    assert metrics.step_ms >= metrics.forward_ms > 0 and metrics.t > 0
    deltas, _ = tiny_engine.step()
    assert {d.request_id: d.finish_reason for d in deltas} == {"a": "length", "b": "length"}
    finished = {m.request_id: m for m in tiny_engine.pop_request_metrics()}
    assert set(finished) == {"a", "b"} and tiny_engine.pop_request_metrics() == []
    a = finished["a"]
    assert (a.prompt_tokens, a.output_tokens, a.finish_reason) == (80, 3, "length")
    assert 0 <= a.queued_s <= a.ttft_s <= a.e2e_s and a.itl_mean_s > 0


def test_cancel_and_abort_free_everything(tiny_engine: Engine) -> None:
    for rid in ("a", "b", "c"):
        tiny_engine.add(GenerateRequest(rid, list(range(5, 45)), max_new_tokens=50,
                                        sampling=SamplingParams(temperature=1.0, seed=1)))
    tiny_engine.step()
    tiny_engine.step()
    deltas = tiny_engine.cancel(["a", "nope"])
    assert [(d.request_id, d.token_ids, d.finish_reason) for d in deltas] == [("a", [], "cancelled")]
    assert "a" not in tiny_engine.runner.sampler.generators
    assert sorted(tiny_engine.abort_all()) == ["b", "c"]
    assert not tiny_engine.has_work and tiny_engine.blocks.num_used_blocks == 0
    assert tiny_engine.runner.sampler.generators == {}
    metrics = {m.request_id: m for m in tiny_engine.pop_request_metrics()}
    assert {m.finish_reason for m in metrics.values()} == {"cancelled"} and len(metrics) == 3


def test_cancel_before_scheduling_reports_nan_timings(tiny_engine: Engine) -> None:
    tiny_engine.add(GenerateRequest("w", [5, 6, 7], max_new_tokens=2))
    assert tiny_engine.cancel(["w"])[0].finish_reason == "cancelled"
    (metrics,) = tiny_engine.pop_request_metrics()
    assert math.isnan(metrics.ttft_s) and math.isnan(metrics.queued_s) and metrics.e2e_s >= 0


def test_engine_signature_accepts_a_loaded_model() -> None:
    params = inspect.signature(Engine).parameters
    assert params["model"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["tokenizer"].kind is inspect.Parameter.KEYWORD_ONLY


# ---- slow: the embedded SmolLM2-135M ---------------------------------------------------------------

MAX_NEW = 16
LENGTHS = [10, 400, 36, 240, 62, 150, 88, 330, 114, 18, 200, 48, 270, 130, 75, 365]


@pytest.fixture(scope="module")
def smol() -> Iterator[tuple[Any, Any]]:
    """One torch thread: on a shared 2-core machine a busy neighbour stalls every 2-thread op at its barrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield models.load(models.DEFAULT_MODEL, device="cpu", dtype="float32")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(smol: tuple[Any, Any]) -> list[int]:
    import collections
    import json as json_module

    text = "\n\n".join(
        inspect.getdoc(obj) or "" for obj in (json_module, collections, collections.OrderedDict, inspect, str, dict)
    )
    return smol[1](text).input_ids


@pytest.fixture(scope="module")
def prompts(corpus: list[int]) -> list[list[int]]:
    assert len(corpus) > 1000
    return [corpus[(97 * i) % (len(corpus) - n) :][:n] for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def references(smol: tuple[Any, Any], prompts: list[list[int]]) -> list[list[int]]:
    return [_reference(smol[0], p, MAX_NEW) for p in prompts]


def _check_all(smol: tuple[Any, Any], prompts: list[list[int]], got: dict[str, list[int]],
               references: list[list[int]]) -> None:
    for i, (prompt, want) in enumerate(zip(prompts, references, strict=True)):
        note = _assert_parity(smol[0], prompt, got[f"r{i}"], want)
        if note:
            print(f"prompt {i} ({len(prompt)} tokens): {note}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_parity_16_mixed_prompts(smol: tuple[Any, Any], prompts: list[list[int]],
                                         references: list[list[int]]) -> None:
    engine = Engine(_settings(models.DEFAULT_MODEL, num_kv_blocks=400, max_batch_tokens=512), model=smol[0],
                    tokenizer=smol[1])
    got = engine.generate([GenerateRequest(f"r{i}", p, max_new_tokens=MAX_NEW) for i, p in enumerate(prompts)])
    _check_all(smol, prompts, got, references)
    assert engine.peak_batch_size == 16


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_parity_under_preemption(smol: tuple[Any, Any], prompts: list[list[int]],
                                         references: list[list[int]]) -> None:
    """Every other prompt (the 400-token one included) in a cache just above the largest single request."""
    chosen = range(1, len(prompts), 2)
    largest = max(len(prompts[i]) for i in chosen) + MAX_NEW
    engine = Engine(_settings(models.DEFAULT_MODEL, num_kv_blocks=-(-largest // 16) + 2, max_batch_tokens=256),
                    model=smol[0], tokenizer=smol[1])
    got = engine.generate([GenerateRequest(f"r{i}", prompts[i], max_new_tokens=MAX_NEW) for i in chosen])
    for i in chosen:
        note = _assert_parity(smol[0], prompts[i], got[f"r{i}"], references[i])
        if note:
            print(f"prompt {i} ({len(prompts[i])} tokens): {note}")
    assert engine.scheduler.total_preemptions > 0
    print(f"preemptions: {engine.scheduler.total_preemptions}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_same_seed_alone_and_crowded(smol: tuple[Any, Any], prompts: list[list[int]]) -> None:
    mine = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=1234)

    def run(crowd: int, params: SamplingParams = mine) -> list[int]:
        engine = Engine(_settings(models.DEFAULT_MODEL, num_kv_blocks=300), model=smol[0], tokenizer=smol[1])
        others = [GenerateRequest(f"o{i}", prompts[i], max_new_tokens=16,
                                  sampling=SamplingParams(temperature=1.0, seed=i) if i % 2 else SamplingParams())
                  for i in range(1, crowd + 1)]
        req = GenerateRequest("mine", prompts[2], max_new_tokens=20, ignore_eos=True, sampling=params)
        return engine.generate([*others[: crowd // 2], req, *others[crowd // 2 :]])["mine"]

    alone = run(0)
    assert run(11) == alone
    assert run(0, SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=4321)) != alone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_engine_on_cuda(dtype: str) -> None:
    model = models.build_tiny_llama().eval().to("cuda", getattr(torch, dtype))
    engine = Engine(_settings(models.TINY_MODEL, device="cuda", dtype=dtype, num_kv_blocks=64, block_size=8,
                              max_batch_tokens=64), model=model, tokenizer=None)
    assert engine.ready_info()["device"].startswith("cuda") and engine.runner.cache.key[0].is_cuda
    prompts = _tiny_prompts()
    sampled = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    reqs = [GenerateRequest(f"r{i}", p, max_new_tokens=12, ignore_eos=True) for i, p in enumerate(prompts)]
    got = engine.generate([*reqs, GenerateRequest("s", prompts[1], max_new_tokens=12, sampling=sampled)])
    if dtype == "float32":
        for i, prompt in enumerate(prompts):
            want = _reference(model, prompt, 12)
            assert _assert_parity(model, prompt, got[f"r{i}"], want) is None
    assert len(got["s"]) == 12
    engine.add(GenerateRequest("m", prompts[0], max_new_tokens=2))
    _, metrics = engine.step()
    assert metrics.device_mem_bytes > 0


def test_an_in_process_engine_leaves_torch_threads_alone(engine_model: tuple[Any, Any]) -> None:
    """The notebook kernel's thread count is the caller's; only set_threads=True (or the worker) applies it."""
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    settings = _settings(models.TINY_MODEL, num_kv_blocks=8, num_threads=wanted)
    engine = Engine(settings, model=engine_model[0], tokenizer=engine_model[1])
    assert torch.get_num_threads() == before and engine.ready_info()["num_threads"] == before
    try:
        Engine(settings, model=engine_model[0], tokenizer=engine_model[1], set_threads=True)
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)
