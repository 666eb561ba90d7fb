"""The process boundary (MAX's chapters 4 and 7): the parent's handle (`client`), the child's loop (`process`),
the `EngineQueue` between them, and the `messages` that cross it."""

from toolkit.worker.client import ModelWorker, WorkerState, start_model_worker

__all__ = ["ModelWorker", "WorkerState", "start_model_worker"]
