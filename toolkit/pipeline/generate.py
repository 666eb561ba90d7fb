"""TokenGeneratorPipeline: the main-process side of a generation request.

Validate and tokenize (so bad input fails here, before anything is sent), submit to the worker, stream back,
detokenize, cut at stop strings. Closing a stream, dropping it, Ctrl-C or a passed `timeout_s` cancels the request
in the worker. Four ways to consume one: `generate` / `agenerate` (the whole completion), `stream` / `astream`
(chunks), and `submit` (callbacks, for UIs).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Literal, overload

from tqdm.auto import tqdm

from toolkit.errors import InvalidRequestError, RemoteError, RequestTimeoutError, ToolkitError
from toolkit.pipeline.detokenizer import IncrementalDetokenizer, StopStringMatcher
from toolkit.pipeline.inputs import check_encodable, check_messages, check_stop, is_int, is_real, kind
from toolkit.pipeline.outputs import Completion, StreamChunk
from toolkit.pipeline.params import PerPrompt, per_prompt_params
from toolkit.validation import check_prompt_length, check_token_ids
from toolkit.worker import messages as m
from toolkit.worker.client import ModelWorker, Sink

Prompt = str | Sequence[dict[str, str]] | Sequence[int]
ChunkCallback = Callable[[StreamChunk], None]
DoneCallback = Callable[[Completion, Exception | None], None]
_ids = itertools.count()
log = logging.getLogger(__name__)


def new_request_id() -> str:
    return f"req-{os.getpid()}-{next(_ids)}"


def remote_error(failure: m.RequestFailed) -> ToolkitError:
    """A worker-side failure of one request as the typed error the caller would have got locally."""
    if failure.error_type == "InvalidRequestError":
        return InvalidRequestError(failure.message)
    return RemoteError(f"{failure.error_type}: {failure.message}", failure.traceback, failure.error_type)


class TokenGeneratorPipeline:
    """Text in, text out, through a ModelWorker. Uses the very tokenizer the worker saved at start-up."""

    def __init__(self, worker: ModelWorker, tokenizer: Any = None) -> None:
        self.worker = worker
        info = worker.info
        if info.task != "generate":
            raise InvalidRequestError(f"worker runs {info.model!r}, an {info.task} model: use EmbeddingsPipeline")
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(info.tokenizer_dir)
        self.tokenizer = tokenizer

    # ---- building a request -------------------------------------------------------------------

    def tokenize(self, prompt: Prompt, add_special_tokens: bool = True) -> list[int]:
        """Raw text as `tokenizer(prompt)` encodes it (BOS where the model expects one, unless add_special_tokens is
        False), chat messages through the chat template, token ids checked against the vocabulary."""
        info = self.worker.info
        if not isinstance(add_special_tokens, bool):
            raise InvalidRequestError(f"add_special_tokens must be a bool, not {add_special_tokens!r}")
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidRequestError("prompt is empty or only whitespace")
            check_encodable(prompt)
            ids = list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(x, dict) for x in prompt):
            check_messages(prompt)
            ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            if not isinstance(ids, list):
                ids = list(ids["input_ids"])
        elif isinstance(prompt, Sequence) and prompt and all(is_int(x) for x in prompt):
            ids = [int(x) for x in prompt]
            check_token_ids(ids, info.vocab_size)
        else:
            raise InvalidRequestError(
                f"prompt must be a non-empty str, a list of chat messages or a list of token ids, not {kind(prompt)}"
            )
        if not ids:
            raise InvalidRequestError("prompt tokenizes to no tokens")
        check_prompt_length(len(ids), max_model_len=info.max_model_len,
                            kv_cache_tokens=info.num_kv_blocks * info.block_size)
        return ids

    def build_request(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        stop_token_ids: Sequence[int] = (),
        add_special_tokens: bool = True,
        min_tokens: int = 0,
        logprobs: int | None = None,
        cache_salt: str | None = None,
        prefix_cache: bool = True,
    ) -> tuple[m.GenerateRequest, list[str]]:
        """Validate every parameter, tokenize, and return the request plus its stop strings."""
        info = self.worker.info
        if not is_int(max_new_tokens) or not 0 < max_new_tokens <= info.max_model_len:
            raise InvalidRequestError(
                f"max_new_tokens must be an int in [1, {info.max_model_len}], not {max_new_tokens!r}"
            )
        if not is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
            raise InvalidRequestError(f"temperature must be a finite number >= 0, not {temperature!r}")
        if not is_real(top_p) or not 0 < top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], not {top_p!r}")
        if not is_int(top_k) or top_k < 0:
            raise InvalidRequestError(f"top_k must be an int >= 0 (0 = off), not {top_k!r}")
        if seed is not None and (not is_int(seed) or not 0 <= seed < 2**63):
            raise InvalidRequestError(f"seed must be None or an int in [0, 2**63), not {seed!r}")
        if not isinstance(ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be a bool, not {ignore_eos!r}")
        if not is_int(min_tokens) or not 0 <= min_tokens <= max_new_tokens:
            raise InvalidRequestError(f"min_tokens must be an int in [0, max_new_tokens], not {min_tokens!r}")
        if logprobs is not None and (not is_int(logprobs) or not 0 <= logprobs <= m.MAX_LOGPROBS):
            raise InvalidRequestError(f"logprobs must be None or an int in [0, {m.MAX_LOGPROBS}], not {logprobs!r}")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InvalidRequestError(f"cache_salt must be None or a non-empty str, not {cache_salt!r}")
        if not isinstance(prefix_cache, bool):
            raise InvalidRequestError(f"prefix_cache must be a bool, not {prefix_cache!r}")
        stops = check_stop(stop)
        if not all(is_int(t) and 0 <= t < info.vocab_size for t in stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be token ids in [0, {info.vocab_size})")
        ids = self.tokenize(prompt, add_special_tokens)
        sampling = m.SamplingParams(
            float(temperature), float(top_p), int(top_k), None if seed is None else int(seed),
            None if logprobs is None else int(logprobs),
        )
        request = m.GenerateRequest(
            request_id=new_request_id(),
            prompt_token_ids=ids,
            max_new_tokens=int(max_new_tokens),
            sampling=sampling,
            stop_token_ids=[int(t) for t in stop_token_ids],
            ignore_eos=ignore_eos,
            arrival_time=time.time(),
            min_tokens=int(min_tokens),
            cache_salt=cache_salt,
            use_prefix_cache=prefix_cache,
        )
        return request, stops

    # ---- running it ---------------------------------------------------------------------------

    def stream(self, prompt: Prompt, *, timeout_s: float | None = None, **params: Any) -> RequestStream:
        """Submit now; iterate for StreamChunks. close() (or dropping the stream) cancels the request.

        timeout_s: seconds from now until iterating raises RequestTimeoutError (the request is cancelled then).
        """
        check_timeout(timeout_s)
        return self._submit(*self.build_request(prompt, **params), timeout_s)

    def _submit(self, request: m.GenerateRequest, stops: list[str], timeout_s: float | None = None) -> RequestStream:
        request.arrival_time = time.time()  # the request arrives now, however long ago it was built
        stream = RequestStream(self, request, stops, Sink(), timeout_s)
        self.worker.submit(request, stream.sink)
        return stream

    def generate(self, prompt: Prompt, *, timeout_s: float | None = None, **params: Any) -> Completion:
        """Blocking: the whole completion. Ctrl-C, or timeout_s passing (RequestTimeoutError), cancels it."""
        with self.stream(prompt, timeout_s=timeout_s, **params) as stream:
            return stream.result()

    async def agenerate(self, prompt: Prompt, *, timeout_s: float | None = None, **params: Any) -> Completion:
        """The async twin of generate, on the caller's running loop; cancelling the task cancels the request."""
        stream = self._astart(prompt, timeout_s, params)
        try:
            async for _ in self._achunks(stream):
                pass
        finally:
            stream.close()
        return stream.completion()

    @overload
    def generate_batch(
        self, prompts: Sequence[Prompt], sampling_params: PerPrompt | Sequence[PerPrompt] | None = None, *,
        progress: bool = True, return_exceptions: Literal[False] = False, **params: Any,
    ) -> list[Completion]: ...

    @overload
    def generate_batch(
        self, prompts: Sequence[Prompt], sampling_params: PerPrompt | Sequence[PerPrompt] | None = None, *,
        progress: bool = True, return_exceptions: Literal[True], **params: Any,
    ) -> list[Completion | Exception]: ...

    def generate_batch(
        self, prompts: Sequence[Prompt], sampling_params: PerPrompt | Sequence[PerPrompt] | None = None, *,
        progress: bool = True, return_exceptions: bool = False, **params: Any,
    ) -> list[Completion] | list[Completion | Exception]:
        """Every prompt validated first, then all submitted at once (up to max_queue_size outstanding); results
        in prompt order.

        `sampling_params`, as in vLLM's `LLM.generate`: one SamplingParams (or dict) for every prompt, or a list
        with one per prompt; keyword parameters apply to every prompt (a dict entry overrides them). A bad prompt
        raises InvalidRequestError before anything is sent. With `return_exceptions=True` nothing raises: a bad
        prompt's or a failed request's exception stands in its result's place, and the others run.
        """
        if isinstance(prompts, str):
            raise InvalidRequestError("generate_batch takes a list of prompts, not one str: use generate")
        built: list[tuple[m.GenerateRequest, list[str]] | Exception] = []
        for i, (prompt, kwargs) in enumerate(zip(prompts, per_prompt_params(len(prompts), sampling_params, params),
                                                 strict=True)):
            try:
                built.append(self.build_request(prompt, **kwargs))
            except InvalidRequestError as exc:
                if not return_exceptions:
                    raise InvalidRequestError(f"prompt {i}: {exc}") from exc
                built.append(exc)
        results: list[Completion | Exception | None] = [b if isinstance(b, Exception) else None for b in built]
        pending: deque[tuple[int, RequestStream]] = deque()
        window = self.worker.settings.max_queue_size
        with tqdm(total=len(built), disable=not progress, desc="generate") as bar:
            bar.update(sum(r is not None for r in results))
            try:
                for i, item in enumerate(built):
                    if isinstance(item, Exception):
                        continue
                    if len(pending) >= window:
                        _collect(pending.popleft(), results, return_exceptions)
                        bar.update()
                    try:
                        pending.append((i, self._submit(*item)))
                    except ToolkitError as exc:  # the worker died or the queue is full: nothing was sent
                        if not return_exceptions:
                            raise
                        results[i] = exc
                        bar.update()
                while pending:
                    _collect(pending.popleft(), results, return_exceptions)
                    bar.update()
            finally:
                for _, stream in pending:
                    stream.close()
        return results  # type: ignore[return-value]  # every slot is filled once the loop ends

    async def astream(
        self, prompt: Prompt, *, timeout_s: float | None = None, **params: Any
    ) -> AsyncIterator[StreamChunk]:
        """Async streaming on the caller's running loop (Jupyter's included); cancelling the task cancels."""
        stream = self._astart(prompt, timeout_s, params)
        try:
            async for chunk in self._achunks(stream):
                yield chunk
        finally:
            stream.close()

    def submit(
        self, prompt: Prompt, *, on_chunk: ChunkCallback | None = None, on_done: DoneCallback | None = None,
        **params: Any,
    ) -> RequestHandle:
        """Submit now and return at once; callbacks report the request's progress (for UIs).

        on_chunk(chunk) for every StreamChunk (chunk.request_id says which request); on_done(completion, error)
        exactly once at the end: error is None when it finished or was cancelled, else the typed error (the
        completion then holds the text so far, finish_reason "error"). Callbacks run on the worker handle's I/O
        thread, or on the thread that calls cancel(): keep them short, e.g. put the chunk on your own queue.
        """
        request, stops = self.build_request(prompt, **params)
        handle = RequestHandle(self, request, stops, on_chunk, on_done)
        self.worker.submit(request, handle.stream.sink)
        return handle

    def _astart(self, prompt: Prompt, timeout_s: float | None, params: dict[str, Any]) -> RequestStream:
        check_timeout(timeout_s)
        request, stops = self.build_request(prompt, **params)
        stream = RequestStream(self, request, stops, Sink(asyncio.get_running_loop()), timeout_s)
        self.worker.submit(request, stream.sink)
        return stream

    @staticmethod
    async def _achunks(stream: RequestStream) -> AsyncIterator[StreamChunk]:
        while not stream.done:
            remaining = None if stream.deadline is None else stream.deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise stream.timed_out()
            try:
                item = await asyncio.wait_for(stream.sink.items.get(), remaining)
            except asyncio.TimeoutError:
                raise stream.timed_out() from None
            chunk = stream.on_item(item)
            if chunk is not None:
                yield chunk


def check_timeout(timeout_s: float | None) -> None:
    if timeout_s is not None and (not is_real(timeout_s) or not math.isfinite(timeout_s) or timeout_s <= 0):
        raise InvalidRequestError(f"timeout_s must be None or a number of seconds > 0, not {timeout_s!r}")


def _collect(entry: tuple[int, RequestStream], results: list[Any], return_exceptions: bool) -> None:
    """Wait for one stream of a batch and put its completion (or, if asked, its exception) in its place."""
    i, stream = entry
    try:
        results[i] = stream.result()
    except Exception as exc:
        if not return_exceptions:
            raise
        results[i] = exc


class RequestStream:
    """One request in flight: iterate for chunks, or call result(). Thread-safe to close from anywhere."""

    def __init__(
        self, pipe: TokenGeneratorPipeline, request: m.GenerateRequest, stops: list[str], sink: Sink,
        timeout_s: float | None = None,
    ) -> None:
        self.pipe = pipe
        self.request = request
        self.request_id = request.request_id
        self.sink = sink
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.detok = IncrementalDetokenizer(pipe.tokenizer, prompt_token_ids=request.prompt_token_ids)
        self.stops = StopStringMatcher(stops) if stops else None
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[m.TokenLogprob] | None = [] if request.sampling.logprobs is not None else None
        self.finish_reason: str | None = None
        self.done = False
        self.first_token_at: float | None = None
        self.finished_at: float | None = None  # when the last item reached this process (or close() cancelled)
        self.chunks = 0
        self.cached_tokens = 0

    def on_item(self, item: object) -> StreamChunk | None:
        """Turn one response item into a chunk; raises the typed error for failures."""
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if isinstance(item, m.RequestFailed):
            self.done = True
            raise remote_error(item)
        assert isinstance(item, m.TokenDelta)
        if self.first_token_at is None and item.token_ids:
            self.first_token_at = self.sink.first_at or time.time()
        if item.num_cached_tokens:
            self.cached_tokens = item.num_cached_tokens
        final = item.finish_reason is not None
        self.token_ids.extend(item.token_ids)
        if self.logprobs is not None and item.logprobs:
            self.logprobs.extend(item.logprobs)
        piece = self.detok.add(item.token_ids) + (self.detok.flush() if final else "")
        if self.stops is not None:
            piece = self.stops.feed(piece, final)
            if self.stops.stopped:  # a stop string wins over "length", even on the last delta
                if not final:
                    self.pipe.worker.cancel([self.request_id])
                final, item = True, m.TokenDelta(item.request_id, item.token_ids, "stop")
        if final:
            self.done = True
            self.finish_reason = item.finish_reason
            self.finished_at = self.sink.finished_at or time.time()  # a stop string ends it here, in this process
        self.text += piece
        self.chunks += 1
        return StreamChunk(piece, list(item.token_ids), self.finish_reason, self.request_id, item.logprobs)

    def __iter__(self) -> Iterator[StreamChunk]:
        return self

    def __next__(self) -> StreamChunk:
        try:
            while not self.done:
                wait = 0.5 if self.deadline is None else min(0.5, self.deadline - time.monotonic())
                if wait <= 0:
                    raise self.timed_out()
                try:
                    item = self.sink.items.get(timeout=wait)  # a timeout keeps Ctrl-C responsive
                except queue.Empty:
                    continue
                chunk = self.on_item(item)
                if chunk is not None:
                    return chunk
        except BaseException:
            self.close()
            raise
        raise StopIteration

    def result(self) -> Completion:
        for _ in self:
            pass
        return self.completion()

    def completion(self) -> Completion:
        arrival = self.request.arrival_time
        return Completion(
            request_id=self.request_id,
            text=self.text,
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.request.prompt_token_ids),
            ttft_s=None if self.first_token_at is None else self.first_token_at - arrival,
            e2e_s=(self.finished_at or time.time()) - arrival,
            chunks=self.chunks,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            cached_tokens=self.cached_tokens,
        )

    def timed_out(self) -> RequestTimeoutError:
        """Cancel the request (timeout_s has passed) and return the error to raise."""
        self.close()
        return RequestTimeoutError(
            f"request {self.request_id} not finished within timeout_s={self.timeout_s}: cancelled "
            f"after {len(self.token_ids)} tokens"
        )

    def close(self) -> None:
        """Cancel in the worker if still running; the text so far stays readable."""
        if not self.done:
            self.done = True
            self.finish_reason = "cancelled"
            self.finished_at = time.time()
            self.pipe.worker.cancel([self.request_id])

    def __enter__(self) -> RequestStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "done", True):
            self.close()


class _CallbackSink(Sink):
    """Hands each response straight to a RequestHandle, on the thread that delivers it."""

    def __init__(self, handler: Callable[[object], None]) -> None:
        super().__init__()
        self.handler = handler

    def put(self, item: object) -> None:
        self.handler(item)


class RequestHandle:
    """A request submitted with callbacks (TokenGeneratorPipeline.submit): cancel() it, wait() for it.

    The callbacks run under the handle's lock, so on_done comes once, after every on_chunk, even when cancel()
    races the worker's last delta.
    """

    def __init__(
        self, pipe: TokenGeneratorPipeline, request: m.GenerateRequest, stops: list[str],
        on_chunk: ChunkCallback | None, on_done: DoneCallback | None,
    ) -> None:
        self.stream = RequestStream(pipe, request, stops, _CallbackSink(self._deliver))
        self.on_chunk = on_chunk
        self.on_done = on_done
        self.error: Exception | None = None
        self._completion: Completion | None = None
        self._lock = threading.RLock()  # re-entrant: a callback may call cancel()
        self._ended = threading.Event()

    @property
    def request_id(self) -> str:
        return self.stream.request_id

    @property
    def done(self) -> bool:
        return self._ended.is_set()

    @property
    def text(self) -> str:
        """The text so far (after a stop string: up to it)."""
        return self.stream.text

    @property
    def token_ids(self) -> list[int]:
        return self.stream.token_ids

    @property
    def completion(self) -> Completion | None:
        """The final Completion once the request has ended (also after an error: see `error`); None before."""
        return self._completion

    def cancel(self) -> None:
        """Stop the request in the worker; on_done(completion with finish_reason "cancelled", None) runs now."""
        with self._lock:
            if not self._ended.is_set():
                self.stream.close()
                self._finish(None)

    def wait(self, timeout_s: float | None = None) -> Completion:
        """Block until the request has ended; its Completion, or its error raised. RequestTimeoutError on timeout
        (the request goes on: cancel() it if it should not)."""
        if not self._ended.wait(timeout_s):
            raise RequestTimeoutError(f"request {self.request_id} not finished within {timeout_s} s")
        if self.error is not None:
            raise self.error
        assert self._completion is not None
        return self._completion

    def _deliver(self, item: object) -> None:
        with self._lock:
            if self._ended.is_set():
                return  # a late delta after a cancel, a stop string or a failure
            try:
                chunk = self.stream.on_item(item)
            except Exception as exc:  # the request failed: its typed error goes to on_done
                self._finish(exc)
                return
            if chunk is not None and self.on_chunk is not None:
                self._call(self.on_chunk, chunk)
            if self.stream.done:
                self._finish(None)

    def _finish(self, error: Exception | None) -> None:
        completion = self.stream.completion()
        if error is not None:
            completion.finish_reason = "error"
        self.error, self._completion = error, completion
        self._ended.set()
        if self.on_done is not None:
            self._call(self.on_done, completion, error)

    def _call(self, callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:  # a broken UI callback must not take down the I/O thread every request depends on
            log.exception("callback %r of request %s raised", callback, self.request_id)
