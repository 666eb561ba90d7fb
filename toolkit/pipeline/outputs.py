"""What a caller gets back: a streamed chunk, and a finished Completion."""

from __future__ import annotations

from dataclasses import dataclass, field

from toolkit.worker.messages import TokenLogprob


@dataclass(slots=True)
class StreamChunk:
    """What one worker step added to a request: new text, new token ids, and the finish reason on the last one."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    request_id: str = ""  # which request: one callback can serve many (TokenGeneratorPipeline.submit)
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for logprobs


@dataclass(slots=True)
class Completion:
    """A finished request. finish_reason: "stop" (EOS, stop token or stop string), "length" or "cancelled"."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    ttft_s: float | None = None
    e2e_s: float = 0.0
    chunks: int = field(default=0, repr=False)
    logprobs: list[TokenLogprob] | None = field(default=None, repr=False)  # one per token id, when asked
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (usage.prompt_tokens_details)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.e2e_s if self.e2e_s > 0 else 0.0
