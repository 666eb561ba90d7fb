"""One request traced across the process boundary, with a time.time() stamp at every hop.

Worker side: the `factories.tiny_traced` factory writes "trace <time> <hop> <detail>" lines to the worker's log.
Kernel side: `kernel_trace()` patches the kernel's EngineQueue for the duration of a `with` block, so the request
send and each response's arrival (on the handle's I/O thread) are stamped too. Both processes read the same wall
clock, so the stamps line up on one axis.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pandas as pd

from toolkit.worker.engine_queue import EngineQueue

TRACE_LINE = re.compile(r"trace (?P<t>\d+\.\d+) (?P<hop>worker receives|forward starts|forward ends|response sent)"
                        r" ?(?P<detail>.*)$")


@contextmanager
def kernel_trace() -> Iterator[list[tuple[float, str, str, str]]]:
    """Stamp the kernel's EngineQueue sends and StepOutput arrivals; yields the list the rows go to."""
    rows: list[tuple[float, str, str, str]] = []
    drain, send = EngineQueue.drain, EngineQueue.send_request

    def traced_send(self: EngineQueue, message: Any) -> bool:
        rows.append((time.time(), "kernel", "EngineQueue send", type(message).__name__))
        return send(self, message)

    def traced_drain(self: EngineQueue) -> Iterator[Any]:
        for message in drain(self):
            if type(message).__name__ == "StepOutput":
                tokens = sum(len(d.token_ids) for d in message.deltas)
                rows.append((time.time(), "kernel I/O thread", "parent receives", f"StepOutput, {tokens} token"))
            yield message

    EngineQueue.send_request, EngineQueue.drain = traced_send, traced_drain  # type: ignore[method-assign]
    try:
        yield rows
    finally:
        EngineQueue.send_request, EngineQueue.drain = send, drain  # type: ignore[method-assign]


def worker_trace(log_text: str, since: float) -> list[tuple[float, str, str, str]]:
    """The worker's trace lines stamped at or after `since` (time.time())."""
    rows = []
    for line in log_text.splitlines():
        match = TRACE_LINE.search(line)
        if match and float(match["t"]) >= since:
            rows.append((float(match["t"]), "worker", match["hop"], match["detail"].split(" req-")[0]))
    return rows


def hop_table(rows: list[tuple[float, str, str, str]], t0: float) -> pd.DataFrame:
    """Rows sorted by time, with milliseconds since `t0` and since the previous hop."""
    table = pd.DataFrame(sorted(rows), columns=["t", "process", "hop", "detail"])
    table.insert(0, "ms", (table.t - t0) * 1000)
    table.insert(1, "+ms", table.ms.diff().fillna(table.ms))
    return table.drop(columns="t")
