"""One request inside the worker: its tokens, how far they are computed, and its telemetry timestamps."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from toolkit.worker.messages import GenerateRequest


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    """One request's state inside the worker: its tokens, how many have K/V in the cache, and its blocks."""

    request: GenerateRequest
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # time.time() values, for telemetry
    first_token_time: float | None = None
    last_token_time: float | None = None
    itl_sum: float = 0.0  # sum of the gaps between consecutive output tokens
    finish_time: float | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of its full blocks, grown on demand
    num_cached_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first scheduled (telemetry)

    @classmethod
    def from_request(cls, req: GenerateRequest) -> Sequence:
        return cls(request=req, token_ids=list(req.prompt_token_ids), num_prompt_tokens=len(req.prompt_token_ids))

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def itl_mean(self) -> float:
        """Mean inter-token latency in seconds; NaN with fewer than two output tokens (no gap to measure)."""
        return self.itl_sum / (self.num_output_tokens - 1) if self.num_output_tokens > 1 else math.nan

    def append_token(self, token_id: int, now: float) -> None:
        if self.last_token_time is None:
            self.first_token_time = now
        else:
            self.itl_sum += now - self.last_token_time
        self.last_token_time = now
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"{self.request_id}: {self.status.value}, {self.num_computed_tokens}/{self.num_tokens} tokens computed "
                f"({self.num_prompt_tokens} prompt + {self.num_output_tokens} out), blocks {self.block_table}")
