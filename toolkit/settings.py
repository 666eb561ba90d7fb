"""Settings: one typed, picklable object that configures a worker; every field also reads TOOLKIT_<FIELD>."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class Settings(BaseSettings):
    """Everything a worker needs. Explicit arguments win over `TOOLKIT_*` variables, which win over defaults."""

    model_config = SettingsConfigDict(env_prefix="TOOLKIT_", frozen=True, extra="forbid", validate_default=True)

    model: str = Field(
        "smollm2-135m-instruct", min_length=1, description="registry name, HF id, local dir or 'pkg.mod:factory'"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU (the exact reference); on CUDA bfloat16 where the GPU has it "
        "natively, else float16; never a type the device would emulate"
    )
    max_batch_size: int = Field(32, gt=0, description="most sequences in one step")
    max_batch_tokens: int | None = Field(
        None, gt=0, description="token budget of one step (decodes + prefill chunks); None or 'auto': chosen at "
        "start-up from the host's measured GEMM speed for a ~0.25 s step, reported in Ready.max_batch_tokens"
    )
    block_size: int = Field(16, gt=0, description="tokens per KV-cache block")
    num_kv_blocks: int | None = Field(None, gt=0, description="KV blocks to preallocate; None: sized from kv_cache_gib")
    kv_cache_gib: float = Field(0.5, gt=0, description="memory budget of the KV cache when num_kv_blocks is None")
    max_model_len: int | None = Field(None, gt=0, description="longest sequence; None: the model's own limit")
    enable_prefix_caching: bool = Field(True, description="reuse the KV blocks of prompt prefixes already computed")
    max_queue_size: int = Field(1024, gt=0, description="requests outstanding at once before QueueFullError")
    num_threads: int | None = Field(
        None, gt=0, description="torch threads in the worker; None or 'auto': one per physical core the worker "
        "process may use (affinity mask, cgroup quota), reported in Ready.num_threads"
    )
    startup_timeout_s: float = Field(300.0, gt=0, description="how long the parent waits for Ready")
    hang_timeout_s: float = Field(
        60.0, gt=0, description="no message at all, heartbeats included, for this long while requests are in flight: "
        "WorkerHungError (a frozen process); heartbeats flow during a step, so a long forward is not silence"
    )
    step_timeout_s: float = Field(
        600.0, gt=0, description="one step (one model forward) running this long while requests are in flight: "
        "WorkerHungError (a forward that never returns); keep it above your longest prefill or first CUDA step"
    )
    restart_on_hang: bool = Field(False, description="kill and restart a hung worker")
    shutdown_timeout_s: float = Field(5.0, gt=0, description="grace for each shutdown stage before escalating")
    metrics_interval_s: float = Field(
        0.25, gt=0, description="how often coalesced metrics (and heartbeats, also during a long step) are sent; a "
        "shutdown or restart sends the rest, a killed worker (SIGKILL, hang) loses at most this much of its step rows",
    )
    metrics_capacity: int = Field(100_000, gt=0, description="rows kept by MetricsLog before the oldest are dropped")
    cache_dir: str | None = Field(None, description="converted-model cache; None: ~/.cache/toolkit")
    log_dir: str | None = Field(None, description="where worker logs go; None: the worker's private temp dir")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="worker log level")

    @field_validator("max_batch_tokens", "num_threads", mode="before")
    @classmethod
    def _auto_is_none(cls, value: object) -> object:
        """'auto' (e.g. TOOLKIT_NUM_THREADS=auto) means what None means: the host decides."""
        return None if isinstance(value, str) and value.strip().lower() == "auto" else value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"unknown device {value!r}: use auto, cpu, cuda, cuda:N or mps")
        return value

    def replace(self, **changes: object) -> Settings:
        """A validated copy with some fields changed (the object itself is frozen)."""
        return type(self)(**{**self.model_dump(), **changes})
