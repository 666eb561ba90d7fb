"""TokenGeneratorPipeline: the main-process side of a generation request.

Validate and tokenize (so bad input fails here, before anything is sent), submit to the worker, stream back,
detokenize, cut at stop strings. Closing a stream, dropping it, or Ctrl-C cancels the request in the worker.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import queue
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from toolkit.errors import InvalidRequestError, RemoteError, ToolkitError
from toolkit.pipeline.detokenizer import IncrementalDetokenizer, StopStringMatcher
from toolkit.pipeline.inputs import check_encodable, check_messages, check_stop, is_int, is_real, kind
from toolkit.pipeline.outputs import Completion, StreamChunk
from toolkit.worker import messages as m
from toolkit.worker.client import ModelWorker, Sink

Prompt = str | Sequence[dict[str, str]] | Sequence[int]
_ids = itertools.count()


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

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Raw text as is, chat messages through the chat template, token ids checked against the vocabulary."""
        info = self.worker.info
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidRequestError("prompt is empty or only whitespace")
            check_encodable(prompt)
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(x, dict) for x in prompt):
            check_messages(prompt)
            ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            if not isinstance(ids, list):
                ids = list(ids["input_ids"])
        elif isinstance(prompt, Sequence) and prompt and all(is_int(x) for x in prompt):
            ids = [int(x) for x in prompt]
            bad = [x for x in ids if not 0 <= x < info.vocab_size]
            if bad:
                raise InvalidRequestError(f"token ids outside the vocabulary [0, {info.vocab_size}): {bad[:5]}")
        else:
            raise InvalidRequestError(
                f"prompt must be a non-empty str, a list of chat messages or a list of token ids, not {kind(prompt)}"
            )
        if not ids:
            raise InvalidRequestError("prompt tokenizes to no tokens")
        if len(ids) >= info.max_model_len:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens; max_model_len is {info.max_model_len}")
        capacity = info.num_kv_blocks * info.block_size
        if len(ids) + 1 > capacity:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens; the KV cache holds {capacity} tokens in all")
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
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InvalidRequestError(f"cache_salt must be None or a non-empty str, not {cache_salt!r}")
        if not isinstance(prefix_cache, bool):
            raise InvalidRequestError(f"prefix_cache must be a bool, not {prefix_cache!r}")
        stops = check_stop(stop)
        if not all(is_int(t) and 0 <= t < info.vocab_size for t in stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be token ids in [0, {info.vocab_size})")
        ids = self.tokenize(prompt)
        sampling = m.SamplingParams(float(temperature), float(top_p), int(top_k), None if seed is None else int(seed))
        request = m.GenerateRequest(
            request_id=new_request_id(),
            prompt_token_ids=ids,
            max_new_tokens=int(max_new_tokens),
            sampling=sampling,
            stop_token_ids=[int(t) for t in stop_token_ids],
            ignore_eos=ignore_eos,
            arrival_time=time.time(),
            cache_salt=cache_salt,
            use_prefix_cache=prefix_cache,
        )
        return request, stops

    # ---- running it ---------------------------------------------------------------------------

    def stream(self, prompt: Prompt, **params: Any) -> RequestStream:
        """Submit now; iterate for StreamChunks. close() (or dropping the stream) cancels the request."""
        request, stops = self.build_request(prompt, **params)
        stream = RequestStream(self, request, stops, Sink())
        self.worker.submit(request, stream.sink)
        return stream

    def generate(self, prompt: Prompt, **params: Any) -> Completion:
        """Blocking: the whole completion. Ctrl-C cancels the request in the worker and re-raises."""
        with self.stream(prompt, **params) as stream:
            return stream.result()

    def generate_batch(self, prompts: Sequence[Prompt], progress: bool = True, **params: Any) -> list[Completion]:
        """All prompts submitted at once (up to max_queue_size outstanding), results in prompt order."""
        window = self.worker.settings.max_queue_size
        streams: list[RequestStream] = []
        results: list[Completion] = []
        with tqdm(total=len(prompts), disable=not progress, desc="generate") as bar:
            try:
                for prompt in prompts:
                    if len(streams) - len(results) >= window:
                        results.append(streams[len(results)].result())
                        bar.update()
                    streams.append(self.stream(prompt, **params))
                while len(results) < len(streams):
                    results.append(streams[len(results)].result())
                    bar.update()
            finally:
                for s in streams:
                    s.close()
        return results

    async def astream(self, prompt: Prompt, **params: Any) -> AsyncIterator[StreamChunk]:
        """Async streaming on the caller's running loop (Jupyter's included); cancelling the task cancels."""
        request, stops = self.build_request(prompt, **params)
        stream = RequestStream(self, request, stops, Sink(asyncio.get_running_loop()))
        self.worker.submit(request, stream.sink)
        try:
            while not stream.done:
                chunk = stream.on_item(await stream.sink.items.get())
                if chunk is not None:
                    yield chunk
        finally:
            stream.close()


class RequestStream:
    """One request in flight: iterate for chunks, or call result(). Thread-safe to close from anywhere."""

    def __init__(self, pipe: TokenGeneratorPipeline, request: m.GenerateRequest, stops: list[str], sink: Sink) -> None:
        self.pipe = pipe
        self.request = request
        self.request_id = request.request_id
        self.sink = sink
        self.detok = IncrementalDetokenizer(pipe.tokenizer)
        self.stops = StopStringMatcher(stops) if stops else None
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.done = False
        self.first_token_at: float | None = None
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
            self.first_token_at = time.time()
        if item.num_cached_tokens:
            self.cached_tokens = item.num_cached_tokens
        final = item.finish_reason is not None
        self.token_ids.extend(item.token_ids)
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
        self.text += piece
        self.chunks += 1
        return StreamChunk(piece, list(item.token_ids), self.finish_reason)

    def __iter__(self) -> Iterator[StreamChunk]:
        return self

    def __next__(self) -> StreamChunk:
        try:
            while not self.done:
                try:
                    item = self.sink.items.get(timeout=0.5)  # a timeout keeps Ctrl-C responsive
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
            e2e_s=time.time() - arrival,
            chunks=self.chunks,
            cached_tokens=self.cached_tokens,
        )

    def close(self) -> None:
        """Cancel in the worker if still running; the text so far stays readable."""
        if not self.done:
            self.done = True
            self.finish_reason = "cancelled"
            self.pipe.worker.cancel([self.request_id])

    def __enter__(self) -> RequestStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "done", True):
            self.close()


