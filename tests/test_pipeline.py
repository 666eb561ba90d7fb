"""TokenGeneratorPipeline on the tiny model: input forms, validation, streaming, stop strings, cancellation."""

from __future__ import annotations

import math
import time

import pytest

from toolkit import InvalidRequestError, TokenGeneratorPipeline


def still_serves(pipe: TokenGeneratorPipeline) -> None:
    out = pipe.generate("still there?", max_new_tokens=3, ignore_eos=True)
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


BAD_PROMPTS = [
    ("", "empty"),
    ("   \n\t ", "whitespace"),
    (None, "prompt must be"),
    (42, "prompt must be"),
    ([], "prompt must be"),
    ([[1, 2], [3]], "prompt must be"),
    ([{"content": "no role"}], "'role' and 'content'"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "wizard", "content": "hi"}], "unknown role"),
    ([{"role": "user", "content": 5}], "content must be a str"),
    ([1, 2, 10**9], "outside the vocabulary"),
    ([-1, 2], "outside the vocabulary"),
    ("lone \ud800 surrogate", "lone surrogate"),
]


@pytest.mark.parametrize(("prompt", "message"), BAD_PROMPTS, ids=[repr(p)[:30] for p, _ in BAD_PROMPTS])
def test_bad_prompts_are_refused_before_sending(tiny_pipe, prompt, message: str) -> None:
    in_flight = tiny_pipe.worker.health()["in_flight"]
    with pytest.raises(InvalidRequestError, match=message):
        tiny_pipe.generate(prompt, max_new_tokens=4)
    assert tiny_pipe.worker.health()["in_flight"] == in_flight
    still_serves(tiny_pipe)


BAD_PARAMS = [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -5}, "max_new_tokens"),
    ({"max_new_tokens": 10**9}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"seed": "abc"}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"stop": ""}, "stop"),
    ({"stop": [None]}, "stop"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"cache_salt": ""}, "cache_salt"),
    ({"cache_salt": 7}, "cache_salt"),
    ({"prefix_cache": "no"}, "prefix_cache"),
]


PARAM_IDS = [f"{k}={v!r}" for p, _ in BAD_PARAMS for k, v in p.items()]


@pytest.mark.parametrize(("params", "name"), BAD_PARAMS, ids=PARAM_IDS)
def test_bad_parameters_name_the_parameter(tiny_pipe, params: dict, name: str) -> None:
    with pytest.raises(InvalidRequestError, match=name):
        tiny_pipe.generate("hello", **params)
    still_serves(tiny_pipe)


def test_prompt_over_the_context_length_names_the_limit(tiny_pipe) -> None:
    limit = tiny_pipe.worker.info.max_model_len
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        tiny_pipe.generate([5] * (limit + 1), max_new_tokens=2)
    still_serves(tiny_pipe)


def test_the_three_prompt_forms(tiny_pipe) -> None:
    text = tiny_pipe.generate("The capital of France is", max_new_tokens=5, ignore_eos=True)
    ids = tiny_pipe.tokenizer.encode("The capital of France is", add_special_tokens=False)
    same = tiny_pipe.generate(ids, max_new_tokens=5, ignore_eos=True)
    assert text.token_ids == same.token_ids and text.text == same.text  # greedy: raw text == its ids
    chat = tiny_pipe.generate([{"role": "user", "content": "hi"}], max_new_tokens=5, ignore_eos=True)
    templated = tiny_pipe.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                        add_generation_prompt=True, tokenize=False)
    assert chat.prompt_tokens == len(tiny_pipe.tokenizer.encode(templated, add_special_tokens=False))


def test_stream_chunks_add_up_to_generate(tiny_pipe) -> None:
    chunks = list(tiny_pipe.stream("Streaming test", max_new_tokens=12, ignore_eos=True))
    whole = tiny_pipe.generate("Streaming test", max_new_tokens=12, ignore_eos=True)
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])


def test_stop_string_cuts_the_text_exactly(tiny_pipe) -> None:
    full = tiny_pipe.generate("Repeat after me", max_new_tokens=24, ignore_eos=True).text
    assert len(full) > 6
    stop = full[3:6]  # a string that certainly appears, likely spanning tokens
    out = tiny_pipe.generate("Repeat after me", max_new_tokens=24, ignore_eos=True, stop=stop)
    assert out.text == full[: full.index(stop)]
    assert out.finish_reason == "stop"
    first = tiny_pipe.generate("Repeat after me", max_new_tokens=24, ignore_eos=True, stop=full[:1])
    assert first.text == "" and first.finish_reason == "stop"


def test_closing_a_stream_cancels_it_in_the_worker(tiny_pipe) -> None:
    stream = tiny_pipe.stream("go on forever", max_new_tokens=2000, ignore_eos=True)
    next(iter(stream))
    stream.close()
    assert stream.finish_reason == "cancelled"
    deadline = time.monotonic() + 10
    while tiny_pipe.worker.health()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tiny_pipe.worker.health()["in_flight"] == 0  # the worker acknowledged the cancel
    still_serves(tiny_pipe)


def test_dropping_a_stream_cancels_it(tiny_pipe) -> None:
    stream = tiny_pipe.stream("go on forever", max_new_tokens=2000, ignore_eos=True)
    next(iter(stream))
    del stream
    deadline = time.monotonic() + 10
    while tiny_pipe.worker.health()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tiny_pipe.worker.health()["in_flight"] == 0
    still_serves(tiny_pipe)


def test_generate_batch_keeps_order_and_counts(tiny_pipe) -> None:
    prompts = [f"prompt number {i}" for i in range(6)]
    outs = tiny_pipe.generate_batch(prompts, max_new_tokens=4, ignore_eos=True, progress=False)
    singles = [tiny_pipe.generate(p, max_new_tokens=4, ignore_eos=True) for p in prompts]
    assert [o.token_ids for o in outs] == [s.token_ids for s in singles]


def test_seeded_sampling_is_reproducible(tiny_pipe) -> None:
    a = tiny_pipe.generate("sample me", max_new_tokens=10, temperature=1.0, seed=123, ignore_eos=True)
    b = tiny_pipe.generate("sample me", max_new_tokens=10, temperature=1.0, seed=123, ignore_eos=True)
    assert a.token_ids == b.token_ids


# ---- prefix caching through the worker ----------------------------------------------------------------

LONG = "The quick brown fox jumps over the lazy dog while the cat watches from the old stone wall. " * 3


def _wait_idle(pipe: TokenGeneratorPipeline) -> None:
    deadline = time.monotonic() + 10
    while pipe.worker.health()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)


def test_repeated_prompt_reports_cached_tokens(tiny_pipe) -> None:
    _wait_idle(tiny_pipe)
    tiny_pipe.worker.reset_prefix_cache()
    first = tiny_pipe.generate(LONG, max_new_tokens=4, ignore_eos=True)
    again = tiny_pipe.generate(LONG, max_new_tokens=4, ignore_eos=True)
    block = tiny_pipe.worker.info.block_size
    assert first.cached_tokens == 0 and again.cached_tokens == (first.prompt_tokens - 1) // block * block > 0
    assert again.token_ids == first.token_ids
    assert tiny_pipe.generate(LONG, max_new_tokens=4, ignore_eos=True, prefix_cache=False).cached_tokens == 0
    assert tiny_pipe.generate(LONG, max_new_tokens=4, ignore_eos=True, cache_salt="tenant-a").cached_tokens == 0
    ids = {first.request_id, again.request_id}
    deadline = time.monotonic() + 10
    while not ids <= set(tiny_pipe.worker.metrics.requests().request_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    reqs = tiny_pipe.worker.metrics.requests().set_index("request_id")
    assert reqs.loc[again.request_id, "cached_tokens"] == again.cached_tokens
    assert reqs.loc[first.request_id, "cached_tokens"] == 0


def test_reset_prefix_cache_is_refused_while_a_request_runs(tiny_pipe) -> None:
    from toolkit.errors import PrefixCacheBusyError

    _wait_idle(tiny_pipe)
    tiny_pipe.generate(LONG, max_new_tokens=2)
    stream = tiny_pipe.stream("go on forever", max_new_tokens=2000, ignore_eos=True)
    next(iter(stream))
    with pytest.raises(PrefixCacheBusyError, match="requests run"):
        tiny_pipe.worker.reset_prefix_cache(timeout_s=10)
    stream.close()  # the cancel travels ahead of the next reset, so the worker is idle when it reads it
    assert tiny_pipe.worker.reset_prefix_cache(timeout_s=10) > 0
    assert tiny_pipe.worker.reset_prefix_cache(timeout_s=10) == 0
    assert tiny_pipe.generate(LONG, max_new_tokens=2).cached_tokens == 0


def test_an_engine_without_a_prefix_cache_refuses_the_reset() -> None:
    from toolkit.settings import Settings
    from toolkit.worker.process import WorkerLoop

    loop = WorkerLoop(engine=object(), queue=None, settings=Settings(), parent_pid=0)  # type: ignore[arg-type]
    reply = loop.reset_prefix_cache("r1")
    assert (reply.id, reply.error_type, reply.blocks_cleared) == ("r1", "InvalidRequestError", 0)
    assert "no prefix cache" in reply.message


def test_reset_on_a_worker_never_started_says_so() -> None:
    from toolkit import ModelWorker
    from toolkit.errors import WorkerNotRunningError

    with pytest.raises(WorkerNotRunningError, match="not started"):
        ModelWorker().reset_prefix_cache()
