"""The embedding worker's engine: EmbeddingsScheduler batches queued texts, EmbeddingsEngine embeds them.

The engine reproduces sentence-transformers' `encode` (Transformer -> Pooling -> Normalize, as the model dir's
modules.json lists them) with plain transformers, so sentence-transformers is only a test dependency.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit import models
from toolkit.embeddings.scheduler import EmbeddingsScheduler, EmbedItem, EmbedJob
from toolkit.engine.hardware import choose_max_batch_tokens, hardware_info, set_num_threads
from toolkit.engine.step_metrics import PhaseTimes, StepProbe
from toolkit.errors import InvalidRequestError, ModelNotFoundError
from toolkit.settings import Settings
from toolkit.worker.messages import EmbedRequest, EmbedResult, RequestMetrics, StepMetrics, TokenDelta

_ST = "sentence_transformers.models."
_SUPPORTED_MODULES = {_ST + "Transformer", _ST + "Pooling", _ST + "Normalize"}
_POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")  # concatenation order of ST


# ---- the sentence-transformers recipe ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EmbeddingRecipe:
    """What sentence-transformers would do with this model dir: truncation length, pooling modes, normalisation."""

    max_seq_length: int
    pooling_modes: tuple[str, ...]
    normalize: bool

    @classmethod
    def from_dir(cls, model_dir: str | Path, model_max_length: int) -> EmbeddingRecipe:
        root = Path(model_dir)
        modules = _read_json(root / "modules.json", [{"type": _ST + "Transformer"}, {"type": _ST + "Pooling"}])
        unsupported = sorted({m["type"] for m in modules} - _SUPPORTED_MODULES)
        if unsupported:
            raise ModelNotFoundError(f"{root}: unsupported sentence-transformers modules {unsupported}")
        pooling_dir = next((m.get("path", "") for m in modules if m["type"] == _ST + "Pooling"), "1_Pooling")
        pooling = _read_json(root / pooling_dir / "config.json", {"pooling_mode_mean_tokens": True})
        modes = tuple(mode for mode in _POOLING_MODES if pooling.get(f"pooling_mode_{mode}"))
        others = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and k[13:] not in modes]
        if others or not modes:
            raise ModelNotFoundError(f"{root}: unsupported pooling {others or 'none'}")
        bert_config = _read_json(root / "sentence_bert_config.json", {})
        max_len = min(int(bert_config.get("max_seq_length") or model_max_length), model_max_length)
        return cls(max_len, modes, any(m["type"] == _ST + "Normalize" for m in modules))

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[batch, tokens, dim] hidden states -> [batch, dim x modes], exactly as ST's Pooling (+ Normalize)."""
        hidden, weights = hidden.float(), mask.unsqueeze(-1).float()
        parts = []
        for mode in self.pooling_modes:
            if mode == "cls_token":
                parts.append(hidden[:, 0])
            elif mode == "max_tokens":
                parts.append(hidden.masked_fill(weights == 0, -1e9).max(dim=1).values)
            else:
                summed, count = (hidden * weights).sum(dim=1), weights.sum(dim=1).clamp(min=1e-9)
                parts.append(summed / (count if mode == "mean_tokens" else count.sqrt()))
        pooled = torch.cat(parts, dim=1)
        return torch.nn.functional.normalize(pooled, p=2, dim=1) if self.normalize else pooled


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


# ---- the engine ----------------------------------------------------------------------------------------


class EmbeddingsEngine:
    """The embedding worker's engine, driven by the worker loop like the generation Engine (EngineProtocol)."""

    def __init__(
        self, settings: Settings, *, model: Any = None, tokenizer: Any = None, set_threads: bool = False
    ) -> None:
        # the worker's process is the engine's to configure; an in-process engine leaves threads alone unless asked
        self.auto_knobs: dict[str, str] = set_num_threads(settings.num_threads) if set_threads else {}
        spec = models.resolve(settings.model)
        if model is None:
            model, tokenizer = models.load(settings.model, settings.device, settings.dtype, settings.cache_dir)
        self.settings, self.model, self.tokenizer = settings, model, tokenizer
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.hardware = hardware_info(self.device, self.dtype)
        model_limit = int(getattr(model.config, "max_position_embeddings", 512))
        self.recipe = EmbeddingRecipe.from_dir(spec.source, min(model_limit, tokenizer.model_max_length))
        self.max_batch_tokens, self.gemm_gflops, knobs = choose_max_batch_tokens(
            settings.max_batch_tokens, model, self.device, self.dtype, settings.max_batch_size)
        self.auto_knobs |= knobs
        self.scheduler = EmbeddingsScheduler(settings.max_batch_size, self.max_batch_tokens)
        self._token_ids: dict[str, list[list[int]]] = {}
        self._vectors: dict[str, list[np.ndarray | None]] = {}
        self._finished: list[RequestMetrics] = []
        self._probe = StepProbe(self.device)
        self.timings = PhaseTimes()  # of the last embed_token_ids(); pooling counts as its "sample" phase
        self._stepping: list[EmbedItem] | None = None  # the texts of the step in progress, for fail_scheduled

    def ready_info(self) -> dict[str, Any]:
        """The fields of messages.Ready that the engine knows (all but pid, load time and tokenizer dir)."""
        return {
            "model": self.settings.model, "task": "embed", "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."), "num_kv_blocks": 0, "block_size": 0,
            "max_model_len": self.recipe.max_seq_length, "vocab_size": int(self.model.config.vocab_size),
            "eos_token_ids": [], "num_threads": torch.get_num_threads(), **self.hardware,
            "max_batch_tokens": self.max_batch_tokens, "gemm_gflops": self.gemm_gflops,
            "auto_knobs": dict(self.auto_knobs),
        }

    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.hidden_size) * len(self.recipe.pooling_modes)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def kv_blocks_used(self) -> int:
        return 0  # no KV cache: each batch is one padded forward

    def add(self, request: EmbedRequest) -> None:
        """Tokenize now (truncated like ST) so the scheduler can budget by real lengths."""
        texts, limit = list(request.texts), self.recipe.max_seq_length
        if request.token_ids:
            ids = [list(x) for x in request.token_ids]
            vocab = int(self.model.config.vocab_size)
            bad = [x for x in ids if not x or len(x) > limit or not all(0 <= t < vocab for t in x)]
            if bad:
                raise InvalidRequestError(f"token id inputs must be 1..{limit} ids each in [0, {vocab})")
        else:
            ids = self.tokenizer(texts, truncation=True, max_length=limit)["input_ids"] if texts else []
        self._token_ids[request.request_id] = ids
        self._vectors[request.request_id] = [None] * len(ids)
        self.scheduler.add(request.request_id, [len(x) for x in ids], request.arrival_time or time.time())

    def cancel(self, request_ids: Iterable[str]) -> list[TokenDelta]:
        """Drop queued requests; a final "cancelled" delta for each, as the generation engine sends."""
        deltas = []
        for rid in request_ids:
            job = self.scheduler.cancel(rid)
            if job is not None:
                self._forget(rid)
                self._finished.append(_request_metrics(job, "cancelled", self._probe.pid))
                deltas.append(TokenDelta(rid, [], "cancelled"))
        return deltas

    def abort_all(self) -> list[str]:
        """Forget every queued request; returns their ids."""
        ids = [job.request_id for job in self.scheduler.jobs]
        self.cancel(ids)
        return ids

    def fail_scheduled(self) -> list[str]:
        """After `step()` raised: end the requests with a text in that step (finish_reason "error"); others go on."""
        items, self._stepping = self._stepping, None
        if items is None:  # it raised before it chose its batch: the queue is in doubt
            ids = [job.request_id for job in self.scheduler.jobs]
        else:
            ids = list(dict.fromkeys(item.request_id for item in items))
        ended = []
        for rid in ids:
            job = self.scheduler.cancel(rid)
            if job is not None:
                self._forget(rid)
                self._finished.append(_request_metrics(job, "error", self._probe.pid))
                ended.append(rid)
        return ended

    def pop_failures(self) -> list[tuple[str, Exception]]:
        """Always empty: a failed embedding step raises, and the worker calls `fail_scheduled`."""
        return []

    def step(self) -> tuple[list[EmbedResult], StepMetrics]:
        """Embed one batch of texts; one EmbedResult per request whose last text was in it."""
        probe = self._probe
        probe.start()
        items = self._stepping = self.scheduler.schedule()
        schedule_ms = probe.lap()
        batch = [self._token_ids[item.request_id][item.index] for item in items]
        vectors = self.embed_token_ids(batch)
        probe.lap()
        for item, vector in zip(items, vectors, strict=True):
            self._vectors[item.request_id][item.index] = vector
        results = [self._result(job) for job in self.scheduler.complete(items)]
        update_ms = probe.lap()
        phases = self.timings
        metrics = probe.finish(
            kind="embed", batch_size=len(items), prefill_tokens=sum(item.length for item in items), decode_tokens=0,
            num_waiting=self.scheduler.num_waiting, num_running=0, kv_blocks_used=0, kv_blocks_total=0,
            preemptions=0, schedule_ms=schedule_ms, prepare_ms=phases.prepare_ms, forward_ms=phases.forward_ms,
            sample_ms=phases.sample_ms, update_ms=update_ms, request_ids=tuple(item.request_id for item in items),
        )
        self._stepping = None
        return results, metrics

    def embed_token_ids(self, batch: list[list[int]]) -> np.ndarray:
        """One padded forward over the batch, then ST's pooling: float32 [len(batch), dim]."""
        self.timings = timings = PhaseTimes()
        if not batch:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        started = time.perf_counter()
        longest = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([ids + [pad] * (longest - len(ids)) for ids in batch], device=self.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in batch], device=self.device)
        prepared = time.perf_counter()
        with torch.inference_mode():
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the forward's time, not pooling's
            forwarded = time.perf_counter()
            pooled = self.recipe.pool(hidden, mask)
        vectors = pooled.cpu().numpy().astype(np.float32, copy=False)
        timings.prepare_ms, timings.forward_ms = (prepared - started) * 1000, (forwarded - prepared) * 1000
        timings.sample_ms = (time.perf_counter() - forwarded) * 1000
        return vectors

    def pop_request_metrics(self) -> list[RequestMetrics]:
        """Timings of the requests finished since the last call."""
        finished, self._finished = self._finished, []
        return finished

    def _result(self, job: EmbedJob) -> EmbedResult:
        rows = self._vectors[job.request_id]
        matrix = np.stack(rows) if rows else np.zeros((0, self.embedding_dim), dtype=np.float32)
        self._forget(job.request_id)
        self._finished.append(_request_metrics(job, "stop", self._probe.pid))
        vectors = np.ascontiguousarray(matrix, np.float32).tobytes()
        return EmbedResult(job.request_id, vectors, matrix.shape, num_tokens=sum(job.lengths))

    def _forget(self, request_id: str) -> None:
        self._token_ids.pop(request_id, None)
        self._vectors.pop(request_id, None)


def _request_metrics(job: EmbedJob, finish_reason: str, pid: int) -> RequestMetrics:
    """An embedding arrives all at once: time to first output is the end-to-end time (NaN if cancelled first)."""
    now = time.time()
    queued = math.nan if job.first_scheduled is None else job.first_scheduled - job.arrival_time
    ttft = now - job.arrival_time if finish_reason == "stop" else math.nan
    return RequestMetrics(
        request_id=job.request_id, prompt_tokens=sum(job.lengths), output_tokens=0, queued_s=queued,
        ttft_s=ttft, itl_mean_s=math.nan, e2e_s=now - job.arrival_time, finish_reason=finish_reason,
        pid=pid,
    )
