"""EngineProtocol: what the worker loop needs from an engine, declared once for `Engine` and `EmbeddingsEngine`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from toolkit.worker.messages import EmbedResult, RequestMetrics, StepMetrics, TokenDelta


@runtime_checkable
class EngineProtocol(Protocol):
    """One worker's engine: queue requests, run one step at a time, report what happened.

    The worker loop (toolkit.worker.process.WorkerLoop) drives any engine through these members only.
    """

    def ready_info(self) -> dict[str, Any]:
        """The fields of messages.Ready that the engine knows (all but pid, load time and tokenizer dir)."""
        ...

    def add(self, request: Any) -> None:
        """Queue a GenerateRequest (generation) or an EmbedRequest (embeddings); InvalidRequestError if refused.

        Typed Any: each engine takes its own request type, which a Protocol parameter cannot narrow.
        """
        ...

    def cancel(self, request_ids: Iterable[str]) -> list[TokenDelta]:
        """Stop requests now; one final "cancelled" delta for each that was still active."""
        ...

    def abort_all(self) -> list[str]:
        """Drop every queued and running request; returns their ids."""
        ...

    def fail_scheduled(self) -> list[str]:
        """After `step()` raised: end the requests of that step with finish_reason "error"; returns their ids."""
        ...

    def pop_failures(self) -> list[tuple[str, Exception]]:
        """Requests that failed inside a step that itself completed, with their exceptions, since the last call."""
        ...

    def step(self) -> tuple[Sequence[TokenDelta | EmbedResult], StepMetrics]:
        """Run one batch: what it produced for the requests, and its telemetry row."""
        ...

    @property
    def has_work(self) -> bool:
        """Whether a step would do anything."""
        ...

    @property
    def kv_blocks_used(self) -> int:
        """KV-cache blocks held now (0 for an engine without a KV cache)."""
        ...

    def pop_request_metrics(self) -> list[RequestMetrics]:
        """Timings of the requests finished since the last call."""
        ...

