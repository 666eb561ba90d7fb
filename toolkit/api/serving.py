"""From a validated OpenAI request to worker requests and back to OpenAI's JSON and SSE chunks.

One API call becomes `n` worker requests per prompt (seed, seed+1, ... when a seed is given, so `n=3` with a seed
repeats). They share one asyncio queue on the server's loop; the worker handle's I/O thread fills it, so the event
loop only routes, detokenizes a few tokens and writes JSON. Closing a `Run` cancels whatever is still running.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from toolkit.api.errors import APIError, as_api_error
from toolkit.pipeline.generate import RequestStream, TokenGeneratorPipeline, new_request_id
from toolkit.pipeline.outputs import StreamChunk
from toolkit.worker import messages as m
from toolkit.worker.client import Sink

FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}  # "abort" as vLLM names it


def finish_reason(reason: str | None) -> str | None:
    """OpenAI's name for the toolkit's finish reason; an "error" finish is no finish but a failure."""
    if reason is None:
        return None
    if reason not in FINISH_REASONS:
        raise APIError(500, f"the request ended with {reason!r} in the worker", "internal_error")
    return FINISH_REASONS[reason]


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class Run:
    """The worker requests of one API call, read from one shared queue; index i is choice i."""

    def __init__(self, pipe: TokenGeneratorPipeline, requests: list[m.GenerateRequest], stops: list[str]) -> None:
        self.pipe = pipe
        self.sink = Sink(asyncio.get_running_loop())
        self.streams = [RequestStream(pipe, r, stops, self.sink) for r in requests]
        self.index = {s.request_id: i for i, s in enumerate(self.streams)}
        self.submitted = 0

    def submit(self) -> None:
        """All or nothing: if the queue fills half-way (QueueFullError), the ones already sent are cancelled."""
        try:
            for stream in self.streams:
                self.pipe.worker.submit(stream.request, self.sink)
                self.submitted += 1
        except BaseException:
            self.close()
            raise

    async def events(self) -> AsyncIterator[tuple[int, StreamChunk]]:
        """(choice index, chunk) as they arrive; raises the first failure (a dead worker fails every choice)."""
        while not all(s.done for s in self.streams):
            item = await self.sink.items.get()
            if isinstance(item, BaseException):
                raise item
            i = self.index.get(item.request_id)  # type: ignore[union-attr]
            if i is None or self.streams[i].done:
                continue  # the tail of a request already cut at a stop string
            chunk = self.streams[i].on_item(item)
            if chunk is not None:
                yield i, chunk

    async def collect(self) -> list[RequestStream]:
        async for _ in self.events():
            pass
        return self.streams

    def close(self) -> None:
        for stream in self.streams[: self.submitted]:
            stream.close()
        for stream in self.streams[self.submitted :]:
            stream.done = True  # never sent: nothing to cancel

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.streams)


def expand(request: m.GenerateRequest, n: int) -> list[m.GenerateRequest]:
    """n copies with their own ids; with a seed, copy i samples with seed + i."""
    seed = request.sampling.seed
    out = []
    for i in range(n):
        sampling = request.sampling if seed is None else msgspec.structs.replace(
            request.sampling, seed=(seed + i) % 2**63)
        out.append(msgspec.structs.replace(request, request_id=new_request_id(), sampling=sampling))
    return out


@dataclass
class Call:
    """What the response of one API call needs besides the tokens."""

    kind: str  # "chat" | "completion"
    model: str
    fingerprint: str
    prompt_tokens: int
    token_text: Callable[[int], str]
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def usage(self, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
        """OpenAI's usage; `cached_tokens`: prompt tokens served from the prefix cache (the first choice's)."""
        usage: dict[str, Any] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": self.prompt_tokens + completion_tokens}
        if cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
        return usage

    # ---- logprobs in OpenAI's two shapes ----------------------------------------------------------

    def chat_logprobs(self, token_ids: list[int], logprobs: list[m.TokenLogprob]) -> dict[str, Any]:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = []
        for token, lp in zip(token_ids, logprobs, strict=False):
            top = [entry(t, v) for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)]
            content.append({**entry(token, lp.logprob), "top_logprobs": top})
        return {"content": content}

    def completion_logprobs(self, token_ids: list[int], logprobs: list[m.TokenLogprob], offset: int) -> dict[str, Any]:
        tokens = [self.token_text(t) for t in token_ids[: len(logprobs)]]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{self.token_text(t): v for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)}
                             for lp in logprobs],
            "text_offset": offsets,
        }

    # ---- whole responses ----------------------------------------------------------------------

    def response(self, streams: list[RequestStream]) -> dict[str, Any]:
        choices = []
        for i, s in enumerate(streams):
            logprobs = None
            if s.logprobs is not None:
                logprobs = (self.chat_logprobs(s.token_ids, s.logprobs) if self.kind == "chat"
                            else self.completion_logprobs(s.token_ids, s.logprobs, 0))
            choice: dict[str, Any] = {"index": i}
            if self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": s.text}
            else:
                choice["text"] = s.text
            choice.update(logprobs=logprobs, finish_reason=finish_reason(s.finish_reason))
            choices.append(choice)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices,
                "usage": self.usage(sum(len(s.token_ids) for s in streams), streams[0].cached_tokens)}

    # ---- streams --------------------------------------------------------------------------------

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None, with_usage: bool) -> str:
        body: dict[str, Any] = {"id": self.id, "object": f"{self.object}.chunk" if self.kind == "chat" else self.object,
                                "created": self.created, "model": self.model,
                                "system_fingerprint": self.fingerprint, "choices": choices}
        if with_usage:
            body["usage"] = usage
        return sse(body)

    def _choice(self, i: int, text: str | None, logprobs: Any, reason: str | None, role: bool = False) -> dict:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": reason}

    async def stream(self, run: Run, include_usage: bool, continuous_usage: bool) -> AsyncIterator[str]:
        """OpenAI's SSE framing: a role delta first (chat), one finish_reason per choice, the usage chunk with
        `choices: []` when asked, then `[DONE]`; a failure after the start is a `data: {"error": ...}` event."""
        with_usage = include_usage or continuous_usage
        running = [0] * len(run.streams)
        offsets = [0] * len(run.streams)

        def usage_now() -> dict[str, Any] | None:
            return self.usage(sum(running)) if continuous_usage else None

        try:
            if self.kind == "chat":
                for i in range(len(run.streams)):
                    yield self.chunk([self._choice(i, None, None, None, role=True)], usage_now(), with_usage)
            async for i, chunk in run.events():
                running[i] += len(chunk.token_ids)
                if chunk.text or chunk.logprobs:
                    logprobs = None
                    if chunk.logprobs:
                        logprobs = (self.chat_logprobs(chunk.token_ids, chunk.logprobs) if self.kind == "chat"
                                    else self.completion_logprobs(chunk.token_ids, chunk.logprobs, offsets[i]))
                    offsets[i] += len(chunk.text)
                    yield self.chunk([self._choice(i, chunk.text, logprobs, None)], usage_now(), with_usage)
                if chunk.finish_reason is not None:
                    reason = finish_reason(chunk.finish_reason)
                    text = None if self.kind == "chat" else ""
                    yield self.chunk([self._choice(i, text, None, reason)], usage_now(), with_usage)
            if include_usage:
                yield self.chunk([], self.usage(run.completion_tokens, run.streams[0].cached_tokens), True)
        except Exception as exc:  # the status line is long gone: the error travels as an event
            yield sse({"error": as_api_error(exc).body()["error"]})
        finally:
            run.close()
        yield sse("[DONE]")
