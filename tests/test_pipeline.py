"""TokenGeneratorPipeline on the tiny model: input forms, validation, streaming, stop strings, cancellation."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest

from toolkit import (
    Completion,
    InvalidRequestError,
    RequestTimeoutError,
    SamplingParams,
    StreamChunk,
    TokenGeneratorPipeline,
)


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


def test_generate_batch_validates_every_prompt_before_sending_any(tiny_pipe, monkeypatch) -> None:
    sent: list[str] = []
    submit = tiny_pipe.worker.submit

    def spy(request, sink) -> None:
        sent.append(request.request_id)
        submit(request, sink)

    monkeypatch.setattr(tiny_pipe.worker, "submit", spy)
    with pytest.raises(InvalidRequestError, match="prompt 2: prompt is empty"):
        tiny_pipe.generate_batch(["fine", "also fine", "", "fine again"], max_new_tokens=4, progress=False)
    assert sent == []
    with pytest.raises(InvalidRequestError, match="prompt 1: temperature"):
        tiny_pipe.generate_batch(["a", "b"], [{"max_new_tokens": 2}, {"temperature": -1.0}], progress=False)
    assert sent == []


def test_generate_batch_takes_parameters_per_prompt(tiny_pipe) -> None:
    prompts = ["first prompt", "second prompt", "third prompt"]
    params = [SamplingParams(max_new_tokens=2, ignore_eos=True), SamplingParams(max_new_tokens=5, ignore_eos=True),
              SamplingParams(max_new_tokens=7, temperature=1.0, seed=3, ignore_eos=True)]
    outs = tiny_pipe.generate_batch(prompts, params, progress=False)
    singles = [tiny_pipe.generate(p, **sp.as_kwargs()) for p, sp in zip(prompts, params, strict=True)]
    assert [len(o.token_ids) for o in outs] == [2, 5, 7]
    assert [o.token_ids for o in outs] == [s.token_ids for s in singles]
    dicts = tiny_pipe.generate_batch(prompts[:2], [{"max_new_tokens": 3}, {}], max_new_tokens=6, ignore_eos=True,
                                     progress=False)  # a dict entry overrides the keyword parameters
    assert [len(o.token_ids) for o in dicts] == [3, 6]
    default = tiny_pipe.generate_batch(prompts[:1], SamplingParams(), progress=False)[0]
    assert default.token_ids == tiny_pipe.generate(prompts[0]).token_ids  # the same defaults as generate


@pytest.mark.parametrize(
    ("sampling_params", "params", "message"),
    [
        ([SamplingParams()], {}, "1 entries for 2 prompts"),
        (SamplingParams(), {"max_new_tokens": 3}, "cannot be combined"),
        ([{"max_tokens": 3}, {}], {}, "unknown parameters \\['max_tokens'\\]"),
        ([3, 4], {}, "must be a SamplingParams or a dict"),
    ],
    ids=["wrong-length", "object-and-keywords", "unknown-key", "not-params"],
)
def test_generate_batch_refuses_malformed_sampling_params(tiny_pipe, sampling_params, params, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        tiny_pipe.generate_batch(["a", "b"], sampling_params, progress=False, **params)
    assert tiny_pipe.worker.health()["in_flight"] == 0


def test_generate_batch_return_exceptions_puts_each_error_in_its_place(tiny_pipe) -> None:
    outs = tiny_pipe.generate_batch(["good one", "", [1, 10**9], "good two"], max_new_tokens=3, ignore_eos=True,
                                    progress=False, return_exceptions=True)
    assert [type(o).__name__ for o in outs] == ["Completion", "InvalidRequestError", "InvalidRequestError",
                                                "Completion"]
    assert "outside the vocabulary" in str(outs[2])
    assert outs[3].token_ids == tiny_pipe.generate("good two", max_new_tokens=3, ignore_eos=True).token_ids


def test_seeded_sampling_is_reproducible(tiny_pipe) -> None:
    a = tiny_pipe.generate("sample me", max_new_tokens=10, temperature=1.0, seed=123, ignore_eos=True)
    b = tiny_pipe.generate("sample me", max_new_tokens=10, temperature=1.0, seed=123, ignore_eos=True)
    assert a.token_ids == b.token_ids


# ---- encoding like tokenizer(prompt), seeding the detokenizer with the prompt ---------------------------------


@pytest.fixture(scope="module")
def spm_pipe(tiny_worker, tmp_path_factory: pytest.TempPathFactory) -> TokenGeneratorPipeline:
    """The tiny worker behind a SentencePiece tokenizer that adds BOS (its 400 ids are all in the tiny vocab)."""
    from tests.factories import sentencepiece_tokenizer

    return TokenGeneratorPipeline(tiny_worker, tokenizer=sentencepiece_tokenizer(tmp_path_factory.mktemp("spm")))


def test_raw_text_is_encoded_as_the_tokenizer_does_by_default(spm_pipe, tiny_pipe) -> None:
    bos = spm_pipe.tokenizer.bos_token_id
    request, _ = spm_pipe.build_request("Hello world")
    assert request.prompt_token_ids == spm_pipe.tokenizer("Hello world").input_ids
    assert request.prompt_token_ids[0] == bos
    bare, _ = spm_pipe.build_request("Hello world", add_special_tokens=False)
    assert bare.prompt_token_ids == request.prompt_token_ids[1:]
    assert tiny_pipe.tokenize("Hello world") == tiny_pipe.tokenizer("Hello world").input_ids
    with pytest.raises(InvalidRequestError, match="add_special_tokens"):
        spm_pipe.build_request("Hello world", add_special_tokens="no")


def test_a_stream_keeps_the_space_before_its_first_word(spm_pipe) -> None:
    from toolkit.pipeline import RequestStream
    from toolkit.worker import messages as m
    from toolkit.worker.client import Sink

    request, _ = spm_pipe.build_request("Hello")
    stream = RequestStream(spm_pipe, request, [], Sink())
    output = spm_pipe.tokenizer(" world there", add_special_tokens=False).input_ids
    chunks = [stream.on_item(m.TokenDelta(request.request_id, [t])) for t in output]
    chunks.append(stream.on_item(m.TokenDelta(request.request_id, [], "length")))
    assert "".join(c.text for c in chunks) == stream.text == " world there"
    assert {c.request_id for c in chunks} == {request.request_id}


# ---- timeouts, agenerate, callbacks --------------------------------------------------------------------------


def wait_idle(pipe: TokenGeneratorPipeline) -> None:
    deadline = time.monotonic() + 10
    while pipe.worker.health()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pipe.worker.health()["in_flight"] == 0


def test_generate_timeout_cancels_and_raises(tiny_pipe) -> None:
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError, match=r"timeout_s=0\.3") as info:
        tiny_pipe.generate("go on forever", max_new_tokens=2000, ignore_eos=True, timeout_s=0.3)
    assert isinstance(info.value, TimeoutError) and time.monotonic() - started < 3
    wait_idle(tiny_pipe)  # the worker dropped it
    still_serves(tiny_pipe)


def test_stream_timeout_keeps_the_text_so_far(tiny_pipe) -> None:
    stream = tiny_pipe.stream("go on forever", max_new_tokens=2000, ignore_eos=True, timeout_s=0.5)
    chunks = []
    with pytest.raises(RequestTimeoutError):
        for chunk in stream:
            chunks.append(chunk)
    assert chunks and stream.finish_reason == "cancelled" and stream.text == "".join(c.text for c in chunks)
    wait_idle(tiny_pipe)
    assert len(tiny_pipe.generate("quick", max_new_tokens=3, ignore_eos=True, timeout_s=30).token_ids) == 3


@pytest.mark.parametrize("bad", [0, -1, math.nan, "5"])
def test_bad_timeout_is_refused(tiny_pipe, bad: object) -> None:
    with pytest.raises(InvalidRequestError, match="timeout_s"):
        tiny_pipe.generate("hello", timeout_s=bad)


def test_agenerate_equals_generate_and_times_out(tiny_pipe) -> None:
    async def main() -> tuple[Completion, BaseException]:
        done = await tiny_pipe.agenerate("async twin", max_new_tokens=6, ignore_eos=True)
        try:
            await tiny_pipe.agenerate("go on forever", max_new_tokens=2000, ignore_eos=True, timeout_s=0.3)
        except RequestTimeoutError as exc:
            return done, exc
        raise AssertionError("no timeout")

    done, _ = asyncio.run(asyncio.wait_for(main(), 60))
    same = tiny_pipe.generate("async twin", max_new_tokens=6, ignore_eos=True)
    assert (done.token_ids, done.text, done.finish_reason) == (same.token_ids, same.text, "length")
    wait_idle(tiny_pipe)


def test_submit_calls_back_every_chunk_then_done_once(tiny_pipe) -> None:
    chunks: list[StreamChunk] = []
    ends: list[tuple[Completion, Exception | None]] = []
    handle = tiny_pipe.submit("call me back", max_new_tokens=8, ignore_eos=True,
                              on_chunk=chunks.append, on_done=lambda c, e: ends.append((c, e)))
    done = handle.wait(timeout_s=30)
    assert ends == [(done, None)] and handle.done and handle.completion is done
    assert "".join(c.text for c in chunks) == done.text == handle.text
    assert [t for c in chunks for t in c.token_ids] == done.token_ids and len(done.token_ids) == 8
    assert {c.request_id for c in chunks} == {handle.request_id} == {done.request_id}
    same = tiny_pipe.generate("call me back", max_new_tokens=8, ignore_eos=True)
    assert same.token_ids == done.token_ids and same.text == done.text


def test_cancel_through_the_handle_ends_it_once(tiny_pipe) -> None:
    first = threading.Event()
    ends: list[Completion] = []
    after_done: list[StreamChunk] = []

    def on_chunk(chunk: StreamChunk) -> None:
        if ends:
            after_done.append(chunk)
        first.set()

    handle = tiny_pipe.submit("go on forever", max_new_tokens=2000, ignore_eos=True, on_chunk=on_chunk,
                              on_done=lambda c, e: ends.append(c))
    assert first.wait(30)
    handle.cancel()
    handle.cancel()
    assert [c.finish_reason for c in ends] == ["cancelled"] and handle.wait(0).finish_reason == "cancelled"
    wait_idle(tiny_pipe)
    assert not after_done and len(ends) == 1


def test_a_raising_callback_does_not_break_the_worker_handle(tiny_pipe) -> None:
    def boom(chunk: StreamChunk) -> None:
        raise RuntimeError("UI bug")

    handle = tiny_pipe.submit("robust", max_new_tokens=4, ignore_eos=True, on_chunk=boom)
    assert len(handle.wait(timeout_s=30).token_ids) == 4
    still_serves(tiny_pipe)


# ---- prefix caching through the worker ----------------------------------------------------------------

LONG = "The quick brown fox jumps over the lazy dog while the cat watches from the old stone wall. " * 3


def test_repeated_prompt_reports_cached_tokens(tiny_pipe) -> None:
    wait_idle(tiny_pipe)
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

    wait_idle(tiny_pipe)
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
