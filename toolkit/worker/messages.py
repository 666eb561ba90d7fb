"""Every message that crosses the process boundary, defined once as msgspec Structs (msgpack on the wire)."""

from __future__ import annotations

import msgspec


class SamplingParams(msgspec.Struct, frozen=True, omit_defaults=True):
    """How to pick the next token. temperature 0 means greedy; top_k 0 means off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


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
    cache_salt: str | None = None  # requests share cached prompt blocks only with requests of the same salt
    use_prefix_cache: bool = True  # False: neither reuse cached blocks nor offer this request's blocks to others


class EmbedRequest(msgspec.Struct, tag=True):
    """Texts to embed; the embedding worker tokenizes them with its own tokenizer."""

    request_id: str
    texts: list[str]
    arrival_time: float = 0.0


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


class StartupFailed(msgspec.Struct, tag=True):
    error_type: str
    message: str
    traceback: str


class TokenDelta(msgspec.Struct, array_like=True, omit_defaults=True):
    """New tokens of one request from one step; finish_reason set on its last delta."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    num_cached_tokens: int = 0  # on the first token's delta: prompt tokens whose K/V came from the prefix cache


class PrefixCacheReset(msgspec.Struct, tag=True):
    """The answer to ResetPrefixCache: how many cached blocks were dropped, or why it was refused."""

    id: str
    blocks_cleared: int = 0
    error_type: str = ""  # "" on success
    message: str = ""


class RequestFailed(msgspec.Struct, tag=True):
    """One request ended in an error inside the worker; others go on."""

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


class StepMetrics(msgspec.Struct, array_like=True):
    """What one scheduler step did; one row of MetricsLog.steps()."""

    t: float  # seconds since the worker started
    kind: str  # "prefill" | "decode" | "mixed" | "embed"
    batch_size: int
    prefill_tokens: int
    decode_tokens: int
    step_ms: float
    forward_ms: float
    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    preemptions: int
    rss_bytes: int
    device_mem_bytes: int = 0
    device_util: float = 0.0
    output_tokens: int = 0  # tokens sampled this step (first tokens of finished prefills + decodes)
    prefix_cache_queries: int = 0  # tokens of the requests admitted this step that looked up the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found in the cache (not computed)
    kv_blocks_cached: int = 0  # blocks holding a reusable prefix after this step (in use or free)


class RequestMetrics(msgspec.Struct, array_like=True):
    """Timings of one finished request; one row of MetricsLog.requests()."""

    request_id: str
    prompt_tokens: int
    output_tokens: int
    queued_s: float
    ttft_s: float
    itl_mean_s: float
    e2e_s: float
    finish_reason: str
    preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache when first scheduled


class Metrics(msgspec.Struct, tag=True):
    """Coalesced telemetry, sent every metrics_interval_s; doubles as the heartbeat."""

    sent_at: float
    busy: bool
    steps: list[StepMetrics] = []
    requests: list[RequestMetrics] = []
    kv_blocks_used: int = 0  # now, not at the last step: an idle worker reporting > 0 has leaked blocks


ToWorker = GenerateRequest | EmbedRequest | Cancel | Shutdown | ResetPrefixCache
FromWorker = Ready | StartupFailed | StepOutput | EmbedResult | Metrics | PrefixCacheReset
