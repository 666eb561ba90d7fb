"""The OpenAI-compatible server, driven as users drive it: `python -m toolkit serve` in a subprocess, the real `openai`
clients (max_retries=0), curl. Servers are module-scoped and shared; tests that kill or stop a server come last.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from toolkit import models

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny-random-llama"
KEY = "sekret-test-key"
GREEDY: dict[str, Any] = {"temperature": 0.0}
LONG = {"max_tokens": 1900, "extra_body": {"ignore_eos": True}}  # runs far past any client timeout below


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    """`python -m toolkit serve` on a free port (vLLM's RemoteOpenAIServer): poll /health, fail fast if it exits."""

    def __init__(self, *args: str, api_key: str | None = None, startup_s: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile("w+", prefix="toolkit-serve-", suffix=".log")
        cmd = [sys.executable, "-m", "toolkit", "serve", "--model", TINY, "--port", str(self.port), "--device",
               "cpu", "--dtype", "float32", "--num-threads", "1", "--no-access-log", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.startup_s = startup_s

    def wait_ready(self) -> RemoteServer:
        deadline = time.monotonic() + self.startup_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not healthy after {self.startup_s} s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-5000:]

    def health(self) -> tuple[int, dict[str, Any]]:
        r = httpx.get(self.url + "/health", timeout=5)
        return r.status_code, r.json()

    def wait_health(self, check: Any, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            status, body = self.health()
            if check(status, body):
                return body
            assert time.monotonic() < deadline, f"health never matched: {status} {body}"
            time.sleep(0.1)

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0,
                             **{"timeout": 60.0, **kw})

    def async_client(self, **kw: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0,
                                  **{"timeout": 60.0, **kw})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, RemoteServer]]:
    """Both servers start at once (their start-up is mostly imports and model loading, on two cores)."""
    started = {
        "plain": RemoteServer(),
        # an API key, a queue of two and no restart: for 401, 429 and the 503 after a crash
        "guarded": RemoteServer("--max-queue-size", "2", "--no-restart-on-crash", api_key=KEY),
    }
    try:
        yield started
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def server(servers: dict[str, RemoteServer]) -> RemoteServer:
    return servers["plain"].wait_ready()


@pytest.fixture(scope="module")
def guarded(servers: dict[str, RemoteServer]) -> RemoteServer:
    return servers["guarded"].wait_ready()


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return models.load_tokenizer(TINY)


def chat(client: openai.OpenAI, content: str = "Tell me about cats.", **kw: Any) -> Any:
    return client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": content}], **kw)


# ---- shapes and counts -------------------------------------------------------------------------------------------


def test_models_version_and_fingerprint(server: RemoteServer, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [TINY]
    assert client.models.retrieve(TINY).max_model_len == 2048  # type: ignore[attr-defined]
    assert httpx.get(server.url + "/version", timeout=5).json()["version"]
    out = chat(client, max_tokens=2, **GREEDY)
    assert out.system_fingerprint and TINY in out.system_fingerprint and "float32" in out.system_fingerprint


def test_usage_is_exact(client: openai.OpenAI, tokenizer: Any) -> None:
    out = client.completions.create(model=TINY, prompt=[11, 12, 13, 14, 15], max_tokens=6,
                                    extra_body={"ignore_eos": True}, **GREEDY)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (5, 6, 11)
    assert out.choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "How many tokens is this?"}]
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = len(templated if isinstance(templated, list) else templated["input_ids"])
    out = client.chat.completions.create(model=TINY, messages=messages, max_completion_tokens=4,
                                         extra_body={"ignore_eos": True}, **GREEDY)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (want, 4, want + 4)


def test_usage_counts_prompt_tokens_from_the_prefix_cache(client: openai.OpenAI) -> None:
    prompt = list(range(1000, 1040))  # 40 tokens: two full blocks of 16 can come from the cache the second time
    first, again = (client.completions.create(model=TINY, prompt=prompt, max_tokens=2, **GREEDY) for _ in range(2))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 32
    stream = client.completions.create(model=TINY, prompt=prompt, max_tokens=2, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY)
    (last,) = [c for c in stream if c.usage is not None]
    assert last.usage.prompt_tokens_details.cached_tokens == 32


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_text_equals_non_streamed(client: openai.OpenAI, kind: str) -> None:
    kw = {"max_tokens": 12, **GREEDY}
    if kind == "chat":
        whole = chat(client, **kw).choices[0].message.content
        chunks = list(chat(client, stream=True, **kw))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.choices[0].delta.role is None for c in chunks[1:])
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        whole = client.completions.create(model=TINY, prompt="Once upon a time", **kw).choices[0].text
        chunks = list(client.completions.create(model=TINY, prompt="Once upon a time", stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks)
    assert text == whole and whole
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason is not None]
    assert reasons == ["length"]
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("include_usage", [None, False, True])
@pytest.mark.parametrize("continuous", [None, False, True])
def test_every_stream_options_combination(client: openai.OpenAI, include_usage: bool | None,
                                          continuous: bool | None) -> None:
    options: dict[str, Any] = {}
    if include_usage is not None:
        options["include_usage"] = include_usage
    if continuous is not None:
        options["continuous_usage_stats"] = continuous
    chunks = list(client.completions.create(model=TINY, prompt=[21, 22, 23], max_tokens=5, stream=True,
                                            stream_options=options or None, extra_body={"ignore_eos": True}))
    finals = [c for c in chunks if not c.choices]
    if include_usage:
        assert len(finals) == 1 and chunks[-1] is finals[0]
        assert (finals[0].usage.prompt_tokens, finals[0].usage.completion_tokens) == (3, 5)
    else:
        assert not finals
    body = chunks[:-1] if include_usage else chunks
    if continuous:
        assert all(c.usage is not None and c.usage.prompt_tokens == 3 for c in body)
        assert body[-1].usage.completion_tokens == 5
    else:
        assert all(c.usage is None for c in body)


def test_stream_options_without_stream_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        chat(client, max_tokens=2, stream_options={"include_usage": True})


def test_n_with_a_seed_repeats(client: openai.OpenAI) -> None:
    def three() -> list[str]:
        out = chat(client, n=3, seed=1234, temperature=1.0, max_tokens=8)
        assert [c.index for c in out.choices] == [0, 1, 2]
        return [c.message.content for c in out.choices]

    first = three()
    assert three() == first
    assert len(set(first)) > 1  # seed, seed+1, seed+2: three different samples


def test_n_streams_every_choice_once(client: openai.OpenAI) -> None:
    chunks = list(chat(client, n=2, max_tokens=4, stream=True, **GREEDY))
    reasons = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks if c.choices[0].finish_reason]
    assert sorted(reasons) == [(0, "length"), (1, "length")]


def test_stop_strings_cut_the_text(client: openai.OpenAI) -> None:
    prompt = "The quick brown fox"
    full = client.completions.create(model=TINY, prompt=prompt, max_tokens=16, **GREEDY).choices[0].text
    k = len(full) // 2
    stop = full[k : k + 3]
    cut = full[: full.index(stop)]
    out = client.completions.create(model=TINY, prompt=prompt, max_tokens=16, stop=[stop, "\x00never"], **GREEDY)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (cut, "stop")
    streamed = list(client.completions.create(model=TINY, prompt=prompt, max_tokens=16, stop=stop, stream=True,
                                              **GREEDY))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert [c.choices[0].finish_reason for c in streamed if c.choices[0].finish_reason] == ["stop"]


def test_logprobs_greedy_chooses_the_top_one(client: openai.OpenAI) -> None:
    out = chat(client, max_tokens=6, logprobs=True, top_logprobs=5, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1.0 + 1e-6
    completion = client.completions.create(model=TINY, prompt=[5, 6, 7], max_tokens=4, logprobs=3, **GREEDY)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(max(top.values()) == pytest.approx(chosen) for top, chosen in zip(lp.top_logprobs, lp.token_logprobs,
                                                                                    strict=True))
    assert "".join(lp.tokens) == completion.choices[0].text


def test_token_id_prompts(client: openai.OpenAI, tokenizer: Any) -> None:
    text = "Paris is the capital of"
    ids = tokenizer.encode(text, add_special_tokens=False)
    by_text = client.completions.create(model=TINY, prompt=text, max_tokens=5, **GREEDY)
    by_ids = client.completions.create(model=TINY, prompt=ids, max_tokens=5, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model=TINY, prompt=[ids, ids[:3]], max_tokens=5, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text
    assert batch.usage.prompt_tokens == len(ids) + 3


# ---- errors --------------------------------------------------------------------------------------------------------


def _post(server: RemoteServer, path: str, **kw: Any) -> httpx.Response:
    return httpx.post(server.url + path, timeout=10, **kw)


ERROR_ROWS = [
    ("bad temperature type", {"temperature": "hot"}, openai.BadRequestError),
    ("temperature out of range", {"temperature": 3.0}, openai.BadRequestError),
    ("unknown model", {"model": "gpt-17"}, openai.NotFoundError),
    ("n over the limit", {"n": 99}, openai.BadRequestError),
    ("too many top logprobs", {"logprobs": True, "top_logprobs": 21}, openai.BadRequestError),
    ("past the context", {"max_tokens": 4000}, openai.BadRequestError),
    ("unsupported penalty", {"presence_penalty": 1.0}, openai.BadRequestError),
    ("min_tokens over max_tokens", {"max_tokens": 2, "extra_body": {"min_tokens": 5}}, openai.BadRequestError),
]


@pytest.mark.parametrize(("name", "params", "error"), ERROR_ROWS, ids=[r[0] for r in ERROR_ROWS])
def test_each_error_row_is_its_openai_exception(client: openai.OpenAI, name: str, params: dict, error: type) -> None:
    kw = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **params}
    with pytest.raises(error) as info:
        client.chat.completions.create(**kw)
    body = info.value.body
    assert isinstance(body, dict) and body["message"] and body["type"]  # the client unwraps {"error": {...}}


def test_raw_errors_have_the_openai_shape(server: RemoteServer) -> None:
    bad_json = _post(server, "/v1/chat/completions", content=b'{"messages": [', headers={"content-type":
                                                                                        "application/json"})
    assert bad_json.status_code == 400
    assert set(bad_json.json()["error"]) == {"message", "type", "param", "code"} and "detail" not in bad_json.json()
    missing = _post(server, "/v1/chat/completions", json={"model": TINY})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    out_of_vocab = _post(server, "/v1/completions", json={"prompt": [10**7], "max_tokens": 2})
    assert out_of_vocab.status_code == 400 and "vocabulary" in out_of_vocab.json()["error"]["message"]
    huge = _post(server, "/v1/completions", content=b"x" * (5 << 20), headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    nowhere = httpx.get(server.url + "/v1/nothing-here", timeout=5)
    assert nowhere.status_code == 404 and "error" in nowhere.json()
    assert _post(server, "/v1/embeddings", json={"input": "hi"}).status_code == 404  # no embeddings model here


def test_the_server_survives_every_error(server: RemoteServer, client: openai.OpenAI) -> None:
    assert server.health()[0] == 200
    assert chat(client, max_tokens=3, **GREEDY).choices[0].finish_reason in ("length", "stop")


# ---- load, cancellation, metrics ---------------------------------------------------------------------------------


def test_cancelled_requests_free_the_worker(server: RemoteServer, client: openai.OpenAI) -> None:
    """vLLM's test: 100 requests with a 0.5 s client timeout all time out; then nothing is left in the worker."""

    async def one(c: openai.AsyncOpenAI, i: int) -> None:
        kw: dict[str, Any] = {"model": TINY, "prompt": f"Count to a thousand, take {i}:", **LONG}
        if i % 2:  # a stream keeps the read timeout from firing: the client gives up after 0.5 s in all

            async def consume() -> None:
                async for _ in await c.completions.create(stream=True, **kw):
                    pass

            await asyncio.wait_for(consume(), 0.5)
        else:
            await c.completions.create(**kw)

    async def hundred() -> list[BaseException | None]:
        c = server.async_client(timeout=0.5)
        try:
            return await asyncio.gather(*(one(c, i) for i in range(100)), return_exceptions=True)
        finally:
            await c.close()

    results = asyncio.run(asyncio.wait_for(hundred(), 60))
    kinds = {type(r).__name__ for r in results}
    assert all(isinstance(r, (openai.APITimeoutError, asyncio.TimeoutError)) for r in results), kinds
    server.wait_health(lambda s, b: s == 200 and b["in_flight"] == 0 and b["kv_blocks_used"] == 0, 30)
    assert chat(client, max_tokens=3, **GREEDY).choices


def test_two_hundred_concurrent_streams_each_finish_once(server: RemoteServer) -> None:
    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, list[str]]:
        stream = await c.chat.completions.create(model=TINY, messages=[{"role": "user", "content": f"Hi {i}"}],
                                                 max_tokens=6, stream=True, **GREEDY)
        text, reasons = "", []
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].finish_reason:
                reasons.append(chunk.choices[0].finish_reason)
        return text, reasons

    async def all_of_them() -> list[tuple[str, list[str]]]:
        c = server.async_client(timeout=120)
        try:
            return await asyncio.gather(*(one(c, i) for i in range(200)))
        finally:
            await c.close()

    results = asyncio.run(asyncio.wait_for(all_of_them(), 150))
    assert len(results) == 200
    assert all(len(reasons) == 1 and reasons[0] in ("length", "stop") for _, reasons in results)


def test_curl_streams_as_the_readme_shows(server: RemoteServer) -> None:
    body = json.dumps({"model": TINY, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5,
                       "stream": True})
    out = subprocess.run(["curl", "-N", "-s", f"{server.url}/v1/chat/completions", "-H",
                          "Content-Type: application/json", "-d", body], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    events = [line for line in out.splitlines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_metrics_count_what_the_worker_did(server: RemoteServer, client: openai.OpenAI) -> None:
    client.completions.create(model=TINY, prompt=[1, 2, 3], max_tokens=3, extra_body={"ignore_eos": True})
    time.sleep(1.5)  # the worker's telemetry arrives every metrics_interval_s (idle: every second)
    text = httpx.get(server.url + "/metrics", timeout=10).text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    label = f'model_name="{TINY}"'
    assert samples[f'toolkit:request_success_total{{finished_reason="length",{label}}}'] >= 1
    assert samples[f"toolkit:generation_tokens_total{{{label}}}"] >= 3
    assert samples[f"toolkit:time_to_first_token_seconds_count{{{label}}}"] >= 1
    assert samples[f"toolkit:num_requests_running{{{label}}}"] == 0
    assert f"toolkit:kv_cache_usage_perc{{{label}}}" in samples
    assert samples[f"toolkit:batch_size_count{{{label}}}"] >= 1


# ---- the API key and the queue limit -------------------------------------------------------------------------------


def test_api_key_is_required_on_v1_only(guarded: RemoteServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0).models.list()
    no_header = httpx.get(guarded.url + "/v1/models", timeout=5)
    assert no_header.status_code == 401 and no_header.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(guarded.url + "/health", timeout=5).status_code == 200
    assert [m.id for m in guarded.client().models.list().data] == [TINY]


def test_a_full_queue_answers_429_with_retry_after(guarded: RemoteServer) -> None:
    c = guarded.client()
    streams = [chat(c, stream=True, **LONG) for _ in range(2)]
    try:
        with pytest.raises(openai.RateLimitError) as info:
            chat(c, max_tokens=2)
        assert info.value.response.headers["retry-after"] == "1"
    finally:
        for s in streams:
            s.close()
    guarded.wait_health(lambda s, b: b["in_flight"] == 0, 30)
    assert chat(c, max_tokens=2, **GREEDY).choices


# ---- in the caller's process: serve_in_background and the in-process engine ------------------------------------


@pytest.fixture(scope="module")
def inprocess() -> Iterator[Any]:
    from toolkit.api.inprocess import InProcessWorker
    from toolkit.settings import Settings

    with InProcessWorker(Settings(model=TINY, device="cpu", dtype="float32", num_threads=1)).start() as worker:
        yield worker


def test_serve_in_background_from_a_running_event_loop(inprocess: Any) -> None:
    """As from a notebook cell: the kernel's loop is running; uvicorn gets its own thread and loop."""
    from toolkit.api import serve_in_background

    async def cell() -> tuple[Any, str]:
        server = serve_in_background(inprocess, port=0)
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=30)
        out = await c.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        await c.close()
        return server, out.choices[0].finish_reason

    first, reason = asyncio.run(asyncio.wait_for(cell(), 60))
    assert reason in ("length", "stop") and first.port != 0
    second, _ = asyncio.run(asyncio.wait_for(cell(), 60))  # re-running the cell replaces the first server
    assert not first.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(first.url + "/health", timeout=2)
    with second:
        assert httpx.get(second.url + "/health", timeout=5).status_code == 200
    assert not second.running
    assert not [t.name for t in threading.enumerate() if t.name.startswith("toolkit-api-")]


def test_inprocess_engine_behind_the_same_interface(inprocess: Any) -> None:
    """Same answers as the worker; its steps run on the server's event-loop thread (the design the seed warns
    against), and without a server's loop nothing steps it, so it refuses requests."""
    from toolkit.api import serve_in_background
    from toolkit.errors import WorkerNotRunningError
    from toolkit.pipeline.generate import TokenGeneratorPipeline

    stepped_on: set[str] = set()
    loop, step = inprocess._worker_loop, inprocess._worker_loop.step

    def recording_step() -> None:
        stepped_on.add(threading.current_thread().name)
        step()

    loop.step = recording_step
    with serve_in_background(inprocess) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=30)
        out = c.completions.create(model=TINY, prompt=[3, 4, 5], max_tokens=4, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 4
        streamed = list(c.completions.create(model=TINY, prompt=[3, 4, 5], max_tokens=4, stream=True, **GREEDY))
        whole = c.completions.create(model=TINY, prompt=[3, 4, 5], max_tokens=4, **GREEDY).choices[0].text
        assert "".join(ch.choices[0].text for ch in streamed) == whole
        assert httpx.get(server.url + "/health", timeout=5).json()["pid"] == os.getpid()
    assert stepped_on == {f"toolkit-api-{server.port}"}  # uvicorn's thread, the one its event loop runs on
    with pytest.raises(WorkerNotRunningError, match="event loop"):
        TokenGeneratorPipeline(inprocess).generate([3, 4, 5], max_new_tokens=2)


def test_inprocess_streams_are_cancelled_when_the_client_goes(inprocess: Any) -> None:
    """With the engine on the server's loop, a client that drops its stream still cancels it in the engine at once;
    before the fix each stream ran to its last token (anyio's cancel of the streaming task never landed)."""
    from toolkit.api import serve_in_background

    def cancelled(url: str) -> float:
        for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("toolkit:request_success_total") and 'finished_reason="cancelled"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    with serve_in_background(inprocess) as server:
        before = cancelled(server.url)
        for i in range(4):
            with httpx.Client(base_url=server.url, timeout=30) as http, http.stream(
                    "POST", "/v1/completions", json={"model": TINY, "prompt": f"take {i}", "stream": True,
                                                     "max_tokens": 1900, "ignore_eos": True}) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")  # streaming has started; leaving the block hangs up
        deadline = time.monotonic() + 30
        while cancelled(server.url) - before < 4 or httpx.get(server.url + "/health").json()["in_flight"]:
            assert time.monotonic() < deadline, "the dropped streams were not cancelled"
            time.sleep(0.1)
        assert cancelled(server.url) - before == 4


def test_non_loopback_without_a_key_is_refused() -> None:
    out = subprocess.run([sys.executable, "-m", "toolkit", "serve", "--model", TINY, "--host", "0.0.0.0"],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "refusing to bind" in out.stderr


# ---- worker faults behind the server (these kill things: keep them last) -----------------------------------------


def test_dead_worker_gives_503_and_health_says_why(guarded: RemoteServer) -> None:
    pid = guarded.health()[1]["pid"]
    os.kill(pid, signal.SIGKILL)
    body = guarded.wait_health(lambda s, b: s == 503, 10)
    assert "crashed" in body["reason"]
    with pytest.raises(openai.InternalServerError) as info:
        chat(guarded.client(), max_tokens=2)
    assert info.value.status_code == 503


def test_restart_on_crash_fails_the_stream_then_recovers(server: RemoteServer, client: openai.OpenAI) -> None:
    old = server.health()[1]["pid"]
    stream = chat(client, stream=True, **LONG)
    next(iter(stream))
    os.kill(old, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="died"):
        for _ in stream:
            pass
    body = server.wait_health(lambda s, b: s == 200 and b["restarts"] == 1, 90)
    assert body["pid"] != old
    assert chat(client, max_tokens=3, **GREEDY).choices[0].finish_reason in ("length", "stop")


def test_sigterm_shuts_the_workers_down(server: RemoteServer) -> None:
    worker = server.health()[1]["pid"]
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE


# ---- the embedded models (slow) -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol() -> Iterator[tuple[Any, Any, Any]]:
    """SmolLM2 and MiniLM workers in this process, served together: HTTP answers are compared with the pipelines."""
    from toolkit import Settings, start_model_worker
    from toolkit.api import serve_in_background

    base = {"device": "cpu", "dtype": "float32", "startup_timeout_s": 600.0}
    with start_model_worker(Settings(model=models.DEFAULT_MODEL, **base)) as worker, \
            start_model_worker(Settings(model=models.EMBED_MODEL, **base)) as embedder, \
            serve_in_background(worker, embeddings_worker=embedder) as server:
        yield worker, embedder, server


@pytest.mark.slow
def test_smollm2_chat_over_http_equals_the_pipeline(smol: tuple[Any, Any, Any]) -> None:
    from toolkit import TokenGeneratorPipeline

    worker, _, server = smol
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    want = TokenGeneratorPipeline(worker).generate(messages, max_new_tokens=32, temperature=0.0)
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=120)
    got = c.chat.completions.create(model=models.DEFAULT_MODEL, messages=messages, max_tokens=32, temperature=0)
    assert got.choices[0].message.content == want.text
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, len(want.token_ids))
    assert got.choices[0].finish_reason == want.finish_reason


@pytest.mark.slow
def test_embeddings_over_http_equal_the_pipeline(smol: tuple[Any, Any, Any]) -> None:
    import numpy as np

    from toolkit import EmbeddingsPipeline

    _, embedder, server = smol
    texts = ["The cat sat on the mat.", "Serving engines batch requests."]
    want = EmbeddingsPipeline(embedder).embed(texts)
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=120)
    as_base64 = c.embeddings.create(model=models.EMBED_MODEL, input=texts)  # the client asks for base64
    as_floats = c.embeddings.create(model=models.EMBED_MODEL, input=texts, encoding_format="float")
    for out in (as_base64, as_floats):
        np.testing.assert_allclose(np.array([d.embedding for d in out.data]), want, atol=1e-6)
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens > len(texts)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(models.resolve(models.EMBED_MODEL).source)(texts[0])["input_ids"]
    by_ids = c.embeddings.create(model=models.EMBED_MODEL, input=ids, encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, want[0], atol=1e-6)
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(model=models.DEFAULT_MODEL, input="chat model, not an embedder")
