"""What a system run leaves behind: per-request timings as the client saw them, plus per-step batch sizes."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it: when it was sent and when each chunk of tokens arrived (perf_counter)."""

    index: int
    prompt_len: int
    output_len: int  # tokens requested
    sent_at: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    done: bool = False

    def add_chunk(self, num_tokens: int, now: float | None = None) -> None:
        if num_tokens > 0:
            self.chunk_times.append(time.perf_counter() if now is None else now)
            self.chunk_tokens.append(num_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.chunk_tokens)


@dataclass(slots=True)
class SystemRun:
    """Everything measured for one system; summarised later by stats.summarize."""

    name: str
    records: list[RequestRecord] = field(default_factory=list)
    started_at: float = 0.0  # perf_counter when the first request could be sent
    batch_sizes: list[int] = field(default_factory=list)  # sequences in each forward step, where known
    peak_rss_bytes: int = 0
    load_s: float = 0.0
    loadavg_1m: float = 0.0  # the machine's 1-minute load average when the system finished (the cores are shared)
    error: str | None = None
    skipped: str = ""  # why the system did not run at all (e.g. its library is not installed); not a failure
    note: str = ""
    prefix_cache_hit_rate: float = math.nan  # prompt tokens served from the prefix cache / looked up (toolkit only)

    def prepend_note(self, text: str) -> None:
        self.note = "; ".join(filter(None, [text, self.note]))
