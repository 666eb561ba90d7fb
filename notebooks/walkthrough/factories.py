"""`"module:function"` model factories for notebook 01: `Settings(model="walkthrough.factories:tiny_with_pid")`.

The worker calls `factory(device, dtype) -> (model, tokenizer)` in its own process, so whatever a factory logs
shows up in the worker's log with the worker's pid, never in the kernel.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from toolkit import models

log = logging.getLogger("walkthrough.factories")


def tiny_with_pid(device: str, dtype: str) -> tuple[Any, Any]:
    """The tiny test model; logs which process loaded it."""
    log.info("factory tiny_with_pid: loading %s in pid %d (parent %d)", models.TINY_MODEL, os.getpid(), os.getppid())
    return models.load(models.TINY_MODEL, device=device, dtype=dtype)


def tiny_traced(device: str, dtype: str) -> tuple[Any, Any]:
    """The tiny model, plus trace lines in the worker's log: each message the worker's EngineQueue receives or
    sends, and each model forward's start and end, with time.time() (one clock for both processes on one host).

    The patches live in the worker process only (it imported this module; the kernel's classes are untouched).
    """
    from toolkit.worker.engine_queue import EngineQueue

    model, tokenizer = tiny_with_pid(device, dtype)
    drain, send = EngineQueue.drain, EngineQueue.send_response

    def traced_drain(self: EngineQueue) -> Any:
        for message in drain(self):
            log.info("trace %.6f worker receives %s %s", time.time(), type(message).__name__, _ids(message))
            yield message

    def traced_send(self: EngineQueue, message: Any) -> bool:
        if type(message).__name__ == "StepOutput":
            log.info("trace %.6f response sent StepOutput %s", time.time(), _ids(message))
        return send(self, message)

    EngineQueue.drain, EngineQueue.send_response = traced_drain, traced_send

    def before(module: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        log.info("trace %.6f forward starts %s tokens", time.time(), None if ids is None else ids.numel())

    def after(module: Any, args: Any, kwargs: Any, output: Any) -> None:
        log.info("trace %.6f forward ends", time.time())

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)
    return model, tokenizer


def _ids(message: Any) -> str:
    if hasattr(message, "deltas"):
        return " ".join(f"{d.request_id}:{len(d.token_ids)}" for d in message.deltas)
    return getattr(message, "request_id", "")
