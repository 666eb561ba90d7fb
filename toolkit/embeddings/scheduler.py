"""EmbeddingsScheduler: FIFO batching of queued texts under a padded-token budget (pure Python, no torch)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class EmbedJob:
    """One request's progress: texts are embedded in order, possibly across several steps."""

    request_id: str
    lengths: list[int]
    arrival_time: float
    next_index: int = 0
    done: int = 0
    first_scheduled: float | None = None

    @property
    def finished(self) -> bool:
        return self.done == len(self.lengths)


@dataclass(slots=True)
class EmbedItem:
    """One text of one request, scheduled in a step."""

    request_id: str
    index: int
    length: int


@dataclass(slots=True)
class EmbeddingsScheduler:
    """FIFO over requests; a step takes texts until `max_batch_size` texts or the padded-token budget is reached.

    The budget counts padded tokens (texts x longest text), what a padded forward really costs. A single text
    longer than the budget still runs alone, so no request can starve.
    """

    max_batch_size: int
    max_batch_tokens: int
    jobs: deque[EmbedJob] = field(default_factory=deque)

    def add(self, request_id: str, lengths: list[int], arrival_time: float = 0.0) -> None:
        self.jobs.append(EmbedJob(request_id, list(lengths), arrival_time))

    @property
    def has_work(self) -> bool:
        return bool(self.jobs)

    @property
    def num_waiting(self) -> int:
        return len(self.jobs)

    def schedule(self) -> list[EmbedItem]:
        """The texts of the next step, in request order then text order."""
        items: list[EmbedItem] = []
        longest = 0
        for job in self.jobs:
            while job.next_index < len(job.lengths) and len(items) < self.max_batch_size:
                length = job.lengths[job.next_index]
                if items and (len(items) + 1) * max(longest, length) > self.max_batch_tokens:
                    return items
                items.append(EmbedItem(job.request_id, job.next_index, length))
                longest = max(longest, length)
                job.next_index += 1
                if job.first_scheduled is None:
                    job.first_scheduled = time.time()
            if len(items) >= self.max_batch_size:
                break
        return items

    def complete(self, items: list[EmbedItem]) -> list[EmbedJob]:
        """Mark scheduled texts done; the jobs whose every text is now done leave the queue (in order)."""
        by_id = {job.request_id: job for job in self.jobs}
        for item in items:
            by_id[item.request_id].done += 1
        finished = [job for job in self.jobs if job.finished]
        self.jobs = deque(job for job in self.jobs if not job.finished)
        return finished

    def cancel(self, request_id: str) -> EmbedJob | None:
        job = next((j for j in self.jobs if j.request_id == request_id), None)
        if job is not None:
            self.jobs.remove(job)
        return job
