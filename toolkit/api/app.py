"""The OpenAI-compatible FastAPI app over a running worker handle (or anything with its interface: a pool, the
in-process engine adapter): `create_app(worker, embeddings_worker=None, api_key=...)`.

The handle interface used here: `info`, `settings`, `submit(request, sink)`, `cancel(ids)`, `health()`, `metrics`;
optionally `on_event_loop()`, an async context manager held on the server's event loop for its lifetime (the
in-process engine steps there). A pool's `health()` lists `replicas`: /health stays 200 while any of them serves.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import importlib.metadata
import logging
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from toolkit.api import errors
from toolkit.api.errors import APIError, bad_request
from toolkit.api.metrics import CONTENT_TYPE, WorkerCollector, exposition
from toolkit.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    SamplingFields,
)
from toolkit.api.serving import Call, Run, expand
from toolkit.errors import RequestCancelledError, WorkerNotRunningError
from toolkit.pipeline.generate import Prompt, TokenGeneratorPipeline, new_request_id, remote_error
from toolkit.worker import messages as m
from toolkit.worker.client import Sink

log = logging.getLogger("toolkit.api")
T = TypeVar("T")

OFFLOAD_CHARS = 4096  # prompts longer than this are tokenized (and chat-templated) off the event loop
MAX_STOP_STRINGS = 16


def version() -> str:
    try:
        return importlib.metadata.version("toolkit")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; bigger asks get 400 (413 for the body)."""

    max_n: int = 8
    max_prompts: int = 64  # prompts in one /v1/completions call, inputs in one /v1/embeddings call
    max_body_bytes: int = 4 << 20


class BodyLimit:
    """413 for a body over the limit, before FastAPI reads it. Pure ASGI (no BaseHTTPMiddleware), so the route's
    `receive()` still reports the client's disconnect once the body is read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = APIError(413, f"request body over the limit of {self.max_bytes} bytes", code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_big.response()(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await too_big.response()(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class ClientGone(Exception):
    """The client disconnected while its non-streaming request was running."""


class RunStreamingResponse(StreamingResponse):
    """A streamed response that cancels its run as soon as the client disconnects.

    Starlette cancels the streaming task on a disconnect, but anyio delivers that cancel only while the task waits on
    a future that is not done yet. With the engine stepped on the same loop (`--engine inprocess`) every step fills
    the task's queue before the cancel is tried, so it never lands and the request would run to its last token."""

    def __init__(self, run: Run, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run = run

    async def listen_for_disconnect(self, receive: Receive) -> None:
        await super().listen_for_disconnect(receive)
        self.run.close()  # the streams are done: the generator ends at its next item, the engine frees the blocks


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Race `work` against the client's disconnect (vLLM's with_cancellation); a disconnect cancels the work, whose
    `finally` cancels the request in the worker."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone
    return task.result()


class ServerState:
    """The handles behind the app, their served names, and the generation pipeline (made once the worker is up)."""

    def __init__(self, worker: Any, embeddings_worker: Any, *, api_key: str | None, model_name: str | None,
                 limits: Limits) -> None:
        self.worker, self.embeddings_worker = worker, embeddings_worker
        self.api_key = api_key
        self.limits = limits
        self.model_name = model_name or worker.settings.model
        self.embeddings_name = embeddings_worker.settings.model if embeddings_worker is not None else None
        self._pipe: TokenGeneratorPipeline | None = None
        self._token_text: dict[int, str] = {}
        # one thread: large prompts queue behind each other instead of crowding the loop's CPU
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="toolkit-api-tokenize")
        self.collector = WorkerCollector([(worker, self.model_name)] + (
            [(embeddings_worker, self.embeddings_name)] if embeddings_worker is not None else []))
        with contextlib.suppress(WorkerNotRunningError):
            self.warm_up()

    def warm_up(self) -> None:
        """Load the tokenizer and compile the chat template now, not on the event loop's first request (seconds:
        the probe's worst case would be the first request's import of transformers)."""
        self.pipe.tokenize("warm up")
        with contextlib.suppress(Exception):  # a tokenizer without a chat template fails later, with a 400
            self.pipe.tokenize([{"role": "user", "content": "warm up"}])

    @property
    def pipe(self) -> TokenGeneratorPipeline:
        if self._pipe is None:
            self._pipe = TokenGeneratorPipeline(self.worker)  # raises WorkerNotRunningError (503) until Ready
        return self._pipe

    def fingerprint(self) -> str:
        info = self.worker.info
        return f"fp_toolkit-{version()}_{info.model}_{info.dtype}"

    def token_text(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.pipe.tokenizer.decode([token])
        return text

    def check_model(self, name: str | None, task: str) -> None:
        """404 for a name nobody serves; 400 for a served model of the other kind."""
        served = {self.model_name: "generate"}
        if self.embeddings_name is not None:
            served[self.embeddings_name] = "embed"
        default = self.model_name if task == "generate" else self.embeddings_name
        name = name or default
        if name not in served:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {sorted(served)}",
                           "not_found_error", param="model", code="model_not_found")
        if served[name] != task:
            what = "chat and text completions" if task == "generate" else "embeddings"
            raise bad_request(f"the model {name!r} does not do {what}", "model")

    async def tokenize(self, prompt: Prompt) -> list[int]:
        size = len(prompt) if isinstance(prompt, str) else sum(len(p.get("content", "")) for p in prompt
                                                                  if isinstance(p, dict))
        if size > OFFLOAD_CHARS:
            return await asyncio.get_running_loop().run_in_executor(self.tokenizing, self.pipe.tokenize, prompt)
        return self.pipe.tokenize(prompt)


def _sampling(body: SamplingFields, max_tokens: int | None, prompt_len: int, max_model_len: int,
              logprobs: int | None) -> dict[str, Any]:
    """Pipeline keyword arguments from the OpenAI fields; max_tokens defaults to what the context has left."""
    room = max_model_len - prompt_len
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise bad_request(f"this model's maximum context length is {max_model_len} tokens; you asked for "
                          f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} in the completion)",
                          "max_tokens")
    if body.min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({body.min_tokens}) is over max_tokens ({max_tokens})", "min_tokens")
    return {"max_new_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "top_k": max(body.top_k or 0, 0), "seed": body.seed, "stop": body.stop, "ignore_eos": body.ignore_eos,
            "min_tokens": body.min_tokens, "logprobs": logprobs}


def _check_common(body: SamplingFields, state: ServerState) -> None:
    if (field := body.unsupported()) is not None:
        raise bad_request(f"{field} is not supported by this server", field)
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    if body.n > state.limits.max_n:
        raise bad_request(f"n must be at most {state.limits.max_n}", "n")
    if isinstance(body.stop, list) and len(body.stop) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings", "stop")


def create_app(worker: Any, embeddings_worker: Any = None, *, api_key: str | None = None,
               model_name: str | None = None, limits: Limits | None = None,
               allow_origins: list[str] | None = None) -> FastAPI:
    """The OpenAI-compatible app over `worker` (and an embeddings worker). With `api_key`, every /v1 route needs
    `Authorization: Bearer <key>`; /health, /metrics and /version stay open. CORS only for `allow_origins`."""
    state = ServerState(worker, embeddings_worker, api_key=api_key, model_name=model_name, limits=limits or Limits())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        async with contextlib.AsyncExitStack() as stack:
            for handle in (worker, embeddings_worker):
                on_loop = getattr(handle, "on_event_loop", None)
                if on_loop is not None:  # the in-process engine: stepped on the loop this server runs
                    await stack.enter_async_context(on_loop())
            yield
        state.tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="toolkit", version=version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.toolkit = state
    errors.install(app)

    async def require_key(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @v1.get("/models")
    def list_models() -> ModelList:
        return ModelList(data=[_card(w, n) for w, n in state.collector.workers])

    @v1.get("/models/{name:path}")
    def get_model(name: str) -> ModelCard:
        for w, n in state.collector.workers:
            if n == name:
                return _card(w, n)
        raise APIError(404, f"the model {name!r} does not exist", "not_found_error", param="model",
                       code="model_not_found")

    async def generate(request: Request, body: SamplingFields, prompts: list[Prompt], kind: str,
                       max_tokens: int | None, logprobs: int | None) -> Response:
        state.check_model(body.model, "generate")
        _check_common(body, state)
        pipe = state.pipe
        info = worker.info
        ids = [await state.tokenize(p) for p in prompts]
        requests, stops = [], []
        for prompt_ids in ids:
            params = _sampling(body, max_tokens, len(prompt_ids), info.max_model_len, logprobs)
            built, stops = pipe.build_request(prompt_ids, **params)
            requests += expand(built, body.n)
        call = Call(kind, body.model or state.model_name, state.fingerprint(), sum(len(x) for x in ids),
                    state.token_text)
        run = Run(pipe, requests, stops)
        run.submit()
        if body.stream:
            options = body.stream_options
            events = call.stream(run, bool(options and options.include_usage),
                                 bool(options and options.continuous_usage_stats))
            return RunStreamingResponse(run, events, media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            streams = await unless_disconnected(request, run.collect())
        except ClientGone:
            return Response(status_code=499)
        finally:
            run.close()
        return JSONResponse(call.response(streams))

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        messages = [{"role": "system" if msg.role == "developer" else msg.role, "content": msg.text()}
                    for msg in body.messages]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await generate(request, body, [messages], "chat", max_tokens, logprobs)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts: list[Prompt] = [prompt]  # type: ignore[list-item]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts:
            raise bad_request("prompt is empty", "prompt")
        if len(prompts) > state.limits.max_prompts:
            raise bad_request(f"at most {state.limits.max_prompts} prompts in one request", "prompt")
        return await generate(request, body, prompts, "completion", body.max_tokens, body.logprobs)

    @v1.post("/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        if embeddings_worker is None:
            raise APIError(404, "this server has no embeddings model (start it with --embeddings-model)",
                           "not_found_error", param="model", code="model_not_found")
        state.check_model(body.model or state.embeddings_name, "embed")
        texts, token_ids = _embedding_inputs(body, state.limits.max_prompts)
        info = embeddings_worker.info
        if body.dimensions is not None:
            raise bad_request("dimensions is not supported: the model's vectors have a fixed size", "dimensions")
        embed = m.EmbedRequest(new_request_id(), texts, time.time(), token_ids)
        sink = Sink(asyncio.get_running_loop())
        embeddings_worker.submit(embed, sink)
        try:
            item = await unless_disconnected(request, sink.items.get())
        except ClientGone:
            embeddings_worker.cancel([embed.request_id])
            return Response(status_code=499)
        except BaseException:
            embeddings_worker.cancel([embed.request_id])
            raise
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, m.RequestFailed):
            raise remote_error(item)
        if not isinstance(item, m.EmbedResult):
            raise RequestCancelledError(f"embedding request {embed.request_id} was cancelled")
        vectors = np.frombuffer(item.vectors, dtype=np.float32).reshape(item.shape)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode()
                 if body.encoding_format == "base64" else row.tolist()} for i, row in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": body.model or info.model,
                             "usage": {"prompt_tokens": item.num_tokens, "total_tokens": item.num_tokens}})

    app.include_router(v1)

    @app.get("/health")
    def health() -> JSONResponse:
        body, ok = _health(worker, state.model_name)
        if embeddings_worker is not None:
            body["embeddings"], embed_ok = _health(embeddings_worker, state.embeddings_name or "")
            if ok and not embed_ok:
                ok, body["status"], body["reason"] = False, "unavailable", "embeddings: " + body["embeddings"]["reason"]
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        text = await asyncio.to_thread(exposition, state.collector)  # DataFrames over the log: off the loop
        return Response(text, media_type=CONTENT_TYPE)

    @app.get("/version")
    def get_version() -> dict[str, str]:
        return {"version": version()}

    app.add_middleware(BodyLimit, max_bytes=state.limits.max_body_bytes)
    if allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=allow_origins, allow_methods=["*"], allow_headers=["*"])
    return app


def _card(worker: Any, name: str) -> ModelCard:
    try:
        info = worker.info
        return ModelCard(id=name, root=info.model, max_model_len=info.max_model_len)
    except WorkerNotRunningError:
        return ModelCard(id=name, root=worker.settings.model, max_model_len=worker.settings.max_model_len or 0)


def _health(worker: Any, name: str) -> tuple[dict[str, Any], bool]:
    """200-worthy when alive and not hung; otherwise the reason, in words. A pool (its health() lists `replicas`) is
    200-worthy while any replica serves: "degraded", with the others' reasons, when some do not."""
    h = worker.health()
    if "replicas" in h:
        down = [f"replica {r['replica']}: {_why_down(r)}" for r in h["replicas"] if _why_down(r)]
        if h.get("alive"):
            return {"status": "degraded" if down else "ok", "reason": "; ".join(down) or None, "model": name,
                    **h}, True
        reason = "no replica of the pool is serving" + (f" ({'; '.join(down)})" if down else "")
        return {"status": "unavailable", "reason": reason, "model": name, **h}, False
    reason = _why_down(h)
    ok = not reason
    return {"status": "ok" if ok else "unavailable", "reason": reason or None, "model": name, **h}, ok


def _why_down(h: dict[str, Any]) -> str:
    """Why one worker (or replica) does not serve, from its health(); "" when it does."""
    if h.get("hung"):
        return f"model worker is hung (silent for {h.get('heartbeat_age_s') or 0:.1f} s while busy)"
    if not h.get("alive"):
        state = h.get("state")
        reason = {"failed": "model worker crashed", "starting": "model worker is starting",
                  "stopped": "model worker is stopped"}.get(str(state), f"model worker is {state}")
        return f"{reason}: {h['died']}" if h.get("died") else reason
    return ""


def _embedding_inputs(body: EmbeddingRequest, limit: int) -> tuple[list[str], list[list[int]]]:
    value = body.input
    if isinstance(value, str):
        texts, ids = [value], []
    elif value and isinstance(value[0], int):
        texts, ids = [], [list(value)]  # type: ignore[arg-type]
    elif value and isinstance(value[0], list):
        texts, ids = [], [list(x) for x in value]  # type: ignore[union-attr]
    else:
        texts, ids = list(value), []  # type: ignore[arg-type]
    count = len(texts) + len(ids)
    if count == 0:
        raise bad_request("input is empty", "input")
    if count > limit:
        raise bad_request(f"at most {limit} inputs in one request", "input")
    if any(not t for t in texts) or any(not x for x in ids):
        raise bad_request("input must not contain empty strings or empty token lists", "input")
    return texts, ids

