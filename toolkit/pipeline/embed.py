"""EmbeddingsPipeline: texts in, one vector per text out, from a worker running an embedding model."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from toolkit.errors import InvalidRequestError, RequestCancelledError
from toolkit.pipeline.generate import new_request_id, remote_error
from toolkit.pipeline.inputs import check_encodable, kind
from toolkit.worker import messages as m
from toolkit.worker.client import ModelWorker, Sink


class EmbeddingsPipeline:
    """Texts in, one L2-normalised vector per text out (numpy), from a worker running an embedding model."""

    def __init__(self, worker: ModelWorker) -> None:
        if worker.info.task != "embed":
            raise InvalidRequestError(f"worker runs {worker.info.model!r}, not an embedding model")
        self.worker = worker

    def embed(self, texts: str | Sequence[str], timeout_s: float | None = None) -> np.ndarray:
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts) if isinstance(texts, Sequence) else None
        if not batch or not all(isinstance(t, str) for t in batch):
            raise InvalidRequestError(f"texts must be a str or a non-empty list of str, not {kind(texts)}")
        for t in batch:
            check_encodable(t)
        sink = Sink()
        request = m.EmbedRequest(new_request_id(), batch, time.time())
        self.worker.submit(request, sink)
        try:
            item = sink.items.get(timeout=timeout_s)
        except BaseException:  # Ctrl-C or timeout: nobody will read the vectors
            self.worker.cancel([request.request_id])
            raise
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, m.RequestFailed):
            raise remote_error(item)
        if isinstance(item, m.TokenDelta):
            raise RequestCancelledError(f"embedding request {request.request_id} was cancelled")
        vectors = np.frombuffer(item.vectors, dtype=np.float32).reshape(item.shape)
        return vectors[0] if single else vectors
