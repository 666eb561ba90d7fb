"""Every message that crosses the process boundary, defined once as msgspec Structs (msgpack on the wire)."""

from __future__ import annotations

import msgspec

MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI allows


class SamplingParams(msgspec.Struct, frozen=True, omit_defaults=True):
    """How to pick the next token. temperature 0 means greedy; top_k 0 means off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None  # return each token's logprob and this many top alternatives; None: no logprobs


# ---- parent -> worker: requests -------------------------------------------------------------


class GenerateRequest(msgspec.Struct, tag=True, omit_defaults=True):
    """One prompt to continue, already tokenized and validated by the pipeline."""

    request_id: str
    prompt_token_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    arrival_time: float = 0.0  # time.time() in the parent when submitted
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the request before this many output tokens
    cache_salt: str | None = None  # requests share cached prompt blocks only with requests of the same salt
    use_prefix_cache: bool = True  # False: neither reuse cached blocks nor offer this request's blocks to others


class EmbedRequest(msgspec.Struct, tag=True):
    """Texts to embed; the embedding worker tokenizes them with its own tokenizer."""

    request_id: str
    texts: list[str]
    arrival_time: float = 0.0
    token_ids: list[list[int]] = []  # inputs already tokenized (used instead of texts when given)


# ---- parent -> worker: control --------------------------------------------------------------


class Cancel(msgspec.Struct, tag=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True):
    pass


class ResetPrefixCache(msgspec.Struct, tag=True):
    """Forget every cached prompt block; rides the requests channel, so it comes after the requests sent before it."""

    id: str


# ---- worker -> parent -----------------------------------------------------------------------


class Ready(msgspec.Struct, tag=True):
    """Sent once the model is loaded and the KV cache sized: the worker is serving."""

    pid: int
    model: str
    task: str  # "generate" | "embed"
    device: str
    dtype: str
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    load_time_s: float
    tokenizer_dir: str = ""  # where the worker saved its tokenizer, so the parent uses the very same one
    notes: list[str] = []  # what the worker changed at load and why, e.g. max_model_len clamped to a sliding window
    linear_kernel: str = ""  # the CPU linear kernel per row range with its probe times, or "torch (why not probed)"
    num_threads: int = 0  # torch threads in the worker
    cpu_capability: str = ""  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", ...
    warnings: list[str] = []  # e.g. a dtype this CPU has no native arithmetic for
    cpu_model: str = ""  # /proc/cpuinfo's model name, e.g. "AMD EPYC 7B13"
    native_bf16: bool = False  # the worker's device does bfloat16 in hardware (AVX512_BF16 / AMX on CPU, sm80+ CUDA)
    native_fp16: bool = False  # the same for float16 (AVX512_FP16 / AMX-FP16 on CPU, any CUDA GPU)
    max_batch_tokens: int = 0  # the step token budget the scheduler uses (given, or chosen from the host)
    gemm_gflops: float = 0.0  # the GEMM speed measured at start-up in the worker's dtype (0: not measured)
    auto_knobs: dict[str, str] = {}  # knob -> why, for each knob the host chose because Settings left it None


class StartupFailed(msgspec.Struct, tag=True):
    error_type: str
    message: str
    traceback: str


class TokenLogprob(msgspec.Struct, array_like=True, omit_defaults=True):
    """One sampled token's log-probability (of the raw model distribution) and the top alternatives, best first."""

    logprob: float
    top_ids: list[int] = []
    top_logprobs: list[float] = []


class TokenDelta(msgspec.Struct, array_like=True, omit_defaults=True):
    """New tokens of one request from one step; finish_reason set on its last delta."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" ("error" ends go out as RequestFailed)
    logprobs: list[TokenLogprob] | None = None  # one per token id, only for requests that asked
    num_cached_tokens: int = 0  # on the first token's delta: prompt tokens whose K/V came from the prefix cache


class PrefixCacheReset(msgspec.Struct, tag=True):
    """The answer to ResetPrefixCache: how many cached blocks were dropped, or why it was refused."""

    id: str
    blocks_cleared: int = 0
    error_type: str = ""  # "" on success
    message: str = ""


class RequestFailed(msgspec.Struct, tag=True):
    """One request ended in an error inside the worker (its finish_reason is "error"); others go on."""

    request_id: str
    error_type: str
    message: str
    traceback: str = ""


class StepOutput(msgspec.Struct, tag=True):
    """One message per worker step: every request's new tokens, and any request errors."""

    deltas: list[TokenDelta]
    failures: list[RequestFailed] = []


class EmbedResult(msgspec.Struct, tag=True):
    request_id: str
    vectors: bytes  # float32, row-major
    shape: tuple[int, int]
    num_tokens: int = 0  # input tokens embedded, for the API's usage


class StepMetrics(msgspec.Struct, array_like=True):
    """What one scheduler step did; one row of MetricsLog.steps().

    Time base: `t` is wall-clock `time.time()` at the end of the step, in the parent's clock too, so one log stays
    ordered across worker restarts; `pid` names the worker process that produced the row (a restart changes it).
    Phases: `schedule_ms + prepare_ms + forward_ms + sample_ms + update_ms <= step_ms`; the rest is the engine's
    own bookkeeping (deltas, telemetry). `forward_ms` is the model forward alone (on CUDA up to a synchronize).
    """

    t: float  # time.time() when the step ended (wall clock, seconds since the Unix epoch)
    kind: str  # "prefill" | "decode" | "mixed" | "embed"
    batch_size: int
    prefill_tokens: int
    decode_tokens: int
    step_ms: float  # the whole engine.step() call
    forward_ms: float  # the model forward alone
    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    preemptions: int
    rss_bytes: int
    device_mem_bytes: int = 0  # CUDA: torch.cuda.memory_allocated; CPU: 0 (see rss_bytes)
    # Percent busy during the step. CUDA: torch.cuda.utilization() (NVML's sample; NaN where NVML is missing).
    # CPU: the worker process's CPU time over the step / (step wall time x torch threads) x 100, so 100 means
    # every compute thread was busy the whole step (a little above 100 is possible: other threads of the process).
    device_util: float = 0.0
    output_tokens: int = 0  # tokens sampled this step (first tokens of finished prefills + decodes)
    pid: int = 0  # the worker process that ran the step
    schedule_ms: float = 0.0  # the scheduler picking the batch and its KV blocks
    prepare_ms: float = 0.0  # building the input tensors (ids, positions, slots, masks)
    sample_ms: float = 0.0  # logits to tokens (generate) or hidden states to pooled vectors (embed)
    update_ms: float = 0.0  # applying the samples: scheduler update, finished requests retired
    prefix_cache_queries: int = 0  # tokens of the requests admitted this step that looked up the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found in the cache (not computed)
    kv_blocks_cached: int = 0  # blocks holding a reusable prefix after this step (in use or free)
    # Embedding steps: the request of each text in the batch, in batch order (one step can hold several requests'
    # texts). Empty for generation steps, whose batch is one sequence per request already.
    request_ids: tuple[str, ...] = ()


class RequestMetrics(msgspec.Struct, array_like=True):
    """Timings of one finished request; one row of MetricsLog.requests(). NaN where a timing does not exist."""

    request_id: str
    prompt_tokens: int
    output_tokens: int
    queued_s: float  # NaN if never scheduled
    ttft_s: float  # NaN if no token came out (cancelled early)
    itl_mean_s: float  # NaN with fewer than two output tokens, and for embeddings
    e2e_s: float
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    preemptions: int = 0
    pid: int = 0  # the worker process that served (finished) the request
    cached_tokens: int = 0  # prompt tokens served from the prefix cache when first scheduled


class Metrics(msgspec.Struct, tag=True):
    """Coalesced telemetry, sent every metrics_interval_s; doubles as the heartbeat, also from inside a long step.

    A worker told to shut down sends what it still holds before it exits; one killed (SIGKILL, a hang) loses at
    most the last metrics_interval_s of rows.
    """

    sent_at: float
    busy: bool
    steps: list[StepMetrics] = []
    requests: list[RequestMetrics] = []
    kv_blocks_used: int = 0  # now, not at the last step: an idle worker reporting > 0 has leaked blocks
    step: int = 0  # with step_running_s > 0: the index of the step in progress (a heartbeat from inside it)
    step_running_s: float = 0.0  # how long that step had run when sent; 0.0: sent between steps


ToWorker = GenerateRequest | EmbedRequest | Cancel | Shutdown | ResetPrefixCache
FromWorker = Ready | StartupFailed | StepOutput | EmbedResult | Metrics | PrefixCacheReset
