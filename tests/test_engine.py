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


# ---- prefix caching: the same greedy tokens with and without the cache --------------------------------------


def _tiny_engine(tiny: tuple[Any, Any], caching: bool, **overrides: Any) -> Engine:
    settings = {"num_kv_blocks": 128, "block_size": 8, "max_batch_tokens": 256, **overrides}
    return Engine(_settings(models.TINY_MODEL, enable_prefix_caching=caching, **settings), model=tiny[0],
                  tokenizer=tiny[1])


def _random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 49000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run_logged(engine: Engine, reqs: list[GenerateRequest]) -> tuple[dict[str, list[int]], list[StepMetrics]]:
    """engine.generate, keeping every step's metrics."""
    outputs: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    for r in reqs:
        engine.add(r)
    steps = []
    while engine.has_work:
        deltas, metrics = engine.step()
        steps.append(metrics)
        for d in deltas:
            outputs[d.request_id].extend(d.token_ids)
    return outputs, steps


def _with_and_without(tiny: tuple[Any, Any], reqs: list[GenerateRequest], **overrides: Any) -> tuple[
        dict[str, list[int]], list[StepMetrics], Engine]:
    """Run `reqs` on a cached and an uncached engine; assert the same tokens; return the cached run."""
    want, plain_steps = _run_logged(_tiny_engine(tiny, False, **overrides), reqs)
    engine = _tiny_engine(tiny, True, **overrides)
    got, steps = _run_logged(engine, reqs)
    for r in reqs:
        assert _assert_parity(tiny[0], r.prompt_token_ids, got[r.request_id], want[r.request_id]) is None
    assert not any(m.prefix_cache_queries for m in plain_steps)
    assert engine.blocks.num_used_blocks == 0
    engine.blocks.check([])
    return got, steps, engine


def test_prefix_cache_shared_system_prompt_16_turns_together(tiny: tuple[Any, Any]) -> None:
    system = _random_tokens(100, 1)
    reqs = [GenerateRequest(f"u{i}", system + _random_tokens(5 + i, 100 + i), 10, ignore_eos=True)
            for i in range(16)]
    _, steps, engine = _with_and_without(tiny, reqs, max_batch_tokens=512)
    cached = {m.request_id: m.cached_tokens for m in engine.pop_request_metrics()}
    assert cached["u0"] == 0 and all(cached[f"u{i}"] == 96 for i in range(1, 16))  # 12 full blocks of the 100
    prompt_tokens = sum(len(r.prompt_token_ids) for r in reqs)
    assert sum(m.prefix_cache_hits for m in steps) == 15 * 96
    assert sum(m.prefix_cache_queries for m in steps) == prompt_tokens
    # one step admits all 16: the first computes the system prompt, the others read it in that very step
    assert steps[0].batch_size == 16 and steps[0].prefill_tokens == prompt_tokens - 15 * 96


def test_prefix_cache_multi_turn_conversation_resent_turn_by_turn(tiny: tuple[Any, Any]) -> None:
    engines = {flag: _tiny_engine(tiny, flag) for flag in (False, True)}
    history = {flag: _random_tokens(30, 7) for flag in (False, True)}
    for turn in range(5):
        user = _random_tokens(6 + turn, 50 + turn)
        outs = {}
        for flag, engine in engines.items():
            prompt = history[flag] + user
            outs[flag] = engine.generate([GenerateRequest(f"t{turn}", prompt, 9, ignore_eos=True)])[f"t{turn}"]
            history[flag] = prompt + outs[flag]
        assert _assert_parity(tiny[0], history[False][: -len(outs[False])], outs[True], outs[False]) is None
        (metrics,) = engines[True].pop_request_metrics()
        previous = len(history[True]) - len(outs[True]) - len(user)  # the last turn's prompt + all but its last token
        if turn:
            assert metrics.cached_tokens == (previous - 1) // 8 * 8, "the blocks filled while decoding hit too"
        else:
            assert metrics.cached_tokens == 0


def test_prefix_cache_under_preemption_on_a_tiny_kv_cache(tiny: tuple[Any, Any]) -> None:
    system = _random_tokens(40, 3)
    reqs = [GenerateRequest(f"p{i}", system + _random_tokens(4 + 3 * i, 200 + i), 12, ignore_eos=True)
            for i in range(6)]
    _, steps, engine = _with_and_without(tiny, reqs, num_kv_blocks=14, max_batch_tokens=64)  # 112 token slots
    assert engine.scheduler.total_preemptions > 0 and sum(m.preemptions for m in steps) > 0
    assert sum(m.prefix_cache_hits for m in steps) > 0


def test_prefix_cache_chunked_prefill_of_a_long_shared_prefix(tiny: tuple[Any, Any]) -> None:
    system = _random_tokens(300, 4)
    reqs = [GenerateRequest(f"c{i}", system + _random_tokens(3 + i, 300 + i), 8, ignore_eos=True)
            for i in range(4)]
    _, steps, engine = _with_and_without(tiny, reqs, max_batch_tokens=48)
    cached = {m.request_id: m.cached_tokens for m in engine.pop_request_metrics()}
    assert cached["c0"] == 0 and [cached[f"c{i}"] for i in (1, 2, 3)] == [296, 296, 296]
    assert all(m.prefill_tokens + m.decode_tokens <= 48 for m in steps)
    computed = sum(m.prefill_tokens for m in steps) + sum(m.decode_tokens for m in steps)
    total = sum(len(r.prompt_token_ids) + 8 - 1 for r in reqs)
    assert computed == total - 3 * 296  # hit tokens + computed tokens = every token, across the chunks


def test_prefix_cache_prompt_of_whole_blocks_and_deltas(tiny: tuple[Any, Any]) -> None:
    engine = _tiny_engine(tiny, True)
    prompt = _random_tokens(32, 9)  # exactly 4 blocks: the second run hits 3 and recomputes the last
    first = engine.generate([GenerateRequest("a", prompt, 4, ignore_eos=True)])["a"]
    engine.add(GenerateRequest("b", prompt, 4, ignore_eos=True))
    deltas, metrics = engine.step()
    assert (metrics.prefix_cache_queries, metrics.prefix_cache_hits, metrics.prefill_tokens) == (32, 24, 8)
    assert metrics.kv_blocks_cached == 4 and deltas[0].num_cached_tokens == 24
    later = []
    while engine.has_work:
        step_deltas, _ = engine.step()
        later += step_deltas
    assert [d.num_cached_tokens for d in later] == [0, 0, 0]  # only the first token's delta says it
    assert deltas[0].token_ids + [t for d in later for t in d.token_ids] == first


def test_reset_prefix_cache_refused_while_busy(tiny: tuple[Any, Any]) -> None:
    from toolkit.errors import PrefixCacheBusyError

    engine = _tiny_engine(tiny, True)
    prompt = _random_tokens(40, 11)
    engine.generate([GenerateRequest("a", prompt, 2)])
    engine.add(GenerateRequest("b", prompt, 50, ignore_eos=True))
    engine.step()
    with pytest.raises(PrefixCacheBusyError, match="1 requests run"):
        engine.reset_prefix_cache()
    engine.cancel(["b"])
    engine.add(GenerateRequest("w", [5, 6], 2))  # waiting, holding no blocks: still refused
    with pytest.raises(PrefixCacheBusyError, match="1 wait"):
        engine.reset_prefix_cache()
    engine.cancel(["w"])
    assert engine.reset_prefix_cache() == 5 and engine.blocks.num_cached_blocks == 0
    engine.add(GenerateRequest("c", prompt, 2))
    _, metrics = engine.step()
    assert metrics.prefix_cache_hits == 0 and metrics.prefix_cache_queries == 40
    assert _tiny_engine(tiny, False).reset_prefix_cache() == 0


def test_abort_all_forgets_the_prefix_cache(tiny: tuple[Any, Any]) -> None:
    engine = _tiny_engine(tiny, True)
    engine.add(GenerateRequest("a", _random_tokens(40, 12), 20))
    engine.step()
    assert engine.blocks.num_cached_blocks == 5
    engine.abort_all()  # after a failed step: cached blocks may hold K/V that was never written
    assert engine.blocks.num_cached_blocks == 0 and engine.blocks.num_used_blocks == 0


def test_per_request_opt_out_and_salt(tiny: tuple[Any, Any]) -> None:
    engine = _tiny_engine(tiny, True)
    prompt = _random_tokens(40, 13)
    engine.generate([GenerateRequest("a", prompt, 2)])
    engine.generate([GenerateRequest("opt-out", prompt, 2, use_prefix_cache=False),
                     GenerateRequest("salted", prompt, 2, cache_salt="tenant")])
    engine.generate([GenerateRequest("salted-again", prompt, 2, cache_salt="tenant")])
    cached = {m.request_id: m.cached_tokens for m in engine.pop_request_metrics()}
    assert cached == {"a": 0, "opt-out": 0, "salted": 0, "salted-again": 32}


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


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_prefix_cache_matches_no_cache(smol: tuple[Any, Any], corpus: list[int]) -> None:
    """The four exactness scenarios on the embedded model in float32, with the near-tie rule of the parity tests."""

    def engine(caching: bool, **overrides: Any) -> Engine:
        settings = {"num_kv_blocks": 200, "max_batch_tokens": 512, **overrides}
        return Engine(_settings(models.DEFAULT_MODEL, enable_prefix_caching=caching, **settings), model=smol[0],
                      tokenizer=smol[1])

    def compare(reqs: list[GenerateRequest], **overrides: Any) -> Engine:
        want = engine(False, **overrides).generate(reqs)
        cached = engine(True, **overrides)
        got = cached.generate(reqs)
        for r in reqs:
            note = _assert_parity(smol[0], r.prompt_token_ids, got[r.request_id], want[r.request_id])
            if note:
                print(f"{r.request_id}: {note}")
        return cached

    def hits(e: Engine) -> int:
        return sum(m.cached_tokens for m in e.pop_request_metrics())

    system = corpus[:200]
    turns = [GenerateRequest(f"u{i}", system + corpus[300 + 37 * i :][: 10 + 2 * i], 8) for i in range(16)]
    assert hits(compare(turns)) == 15 * 192

    history: dict[bool, list[int]] = {False: corpus[900:960], True: corpus[900:960]}
    conversation = {flag: engine(flag) for flag in (False, True)}
    for turn in range(4):
        user = corpus[1000 + 40 * turn :][:20]
        outs = {}
        for flag, e in conversation.items():
            prompt = history[flag] + user
            outs[flag] = e.generate([GenerateRequest(f"t{turn}", prompt, 8)])[f"t{turn}"]
            history[flag] = prompt + outs[flag]
        note = _assert_parity(smol[0], history[False][: -len(outs[False])], outs[True], outs[False])
        if note:
            print(f"turn {turn}: {note}")
    assert hits(conversation[True]) > 3 * 60

    shared = corpus[:100]
    crowd = [GenerateRequest(f"p{i}", shared + corpus[500 + 23 * i :][: 8 + 4 * i], 16) for i in range(6)]
    preempting = compare(crowd, num_kv_blocks=14, max_batch_tokens=128)
    assert preempting.scheduler.total_preemptions > 0 and hits(preempting) > 0

    long_prefix = corpus[:400]
    chunked = [GenerateRequest(f"c{i}", long_prefix + corpus[700 + 11 * i :][: 5 + i], 8) for i in range(4)]
    assert hits(compare(chunked, max_batch_tokens=64)) == 3 * 400


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefix_cache_on_cuda_matches_no_cache() -> None:
    model = models.build_tiny_llama().eval().to("cuda", torch.float32)
    system = _random_tokens(100, 21)
    reqs = [GenerateRequest(f"g{i}", system + _random_tokens(5 + i, 400 + i), 10, ignore_eos=True) for i in range(16)]
    outputs = {}
    for caching in (False, True):
        engine = Engine(_settings(models.TINY_MODEL, device="cuda", num_kv_blocks=128, block_size=8,
                                  max_batch_tokens=512, enable_prefix_caching=caching), model=model, tokenizer=None)
        outputs[caching] = engine.generate(reqs)
        hits = sum(m.cached_tokens for m in engine.pop_request_metrics())
        assert hits == (15 * 96 if caching else 0)
    for r in reqs:
        assert _assert_parity(model, r.prompt_token_ids, outputs[True][r.request_id],
                              outputs[False][r.request_id]) is None
