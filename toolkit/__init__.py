"""Run a language model in a background worker process and drive it live from Jupyter."""

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


def __getattr__(name: str) -> object:
    """`toolkit.api` on first use, so `import toolkit` does not import the web stack."""
    if name == "api":
        import importlib

        return importlib.import_module("toolkit.api")
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
