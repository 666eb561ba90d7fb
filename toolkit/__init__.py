"""Run a language model in a background worker process and drive it live from Jupyter."""

from typing import Any

from toolkit import errors
from toolkit.errors import (
    InvalidRequestError,
    QueueFullError,
    RequestCancelledError,
    RequestTimeoutError,
    ToolkitError,
    WorkerCrashedError,
    WorkerHungError,
    WorkerStartupError,
)
from toolkit.pipeline import Completion, EmbeddingsPipeline, SamplingParams, StreamChunk, TokenGeneratorPipeline
from toolkit.settings import Settings
from toolkit.worker.client import ModelWorker, WorkerState, start_model_worker

__all__ = [
    "Completion",
    "EmbeddingsPipeline",
    "InvalidRequestError",
    "ModelWorker",
    "QueueFullError",
    "RequestCancelledError",
    "RequestTimeoutError",
    "SamplingParams",
    "Settings",
    "StreamChunk",
    "TokenGeneratorPipeline",
    "ToolkitError",
    "WorkerCrashedError",
    "WorkerHungError",
    "WorkerStartupError",
    "WorkerState",
    "errors",
    "start_model_worker",
]

# Imported on first use, so `import toolkit` (and `from toolkit import *`) need neither the web stack nor Ray.
_POOL = ("WorkerPool", "start_worker_pool")


def __getattr__(name: str) -> Any:
    if name == "api":
        import importlib

        return importlib.import_module("toolkit.api")
    if name in _POOL:
        from toolkit.pool import client

        return getattr(client, name)
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_POOL, "api"])
