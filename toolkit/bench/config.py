"""BenchConfig: every knob of one benchmark run, picklable so each system can run in its own spawned process."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

SYSTEMS = ("toolkit", "toolkit-inprocess", "toolkit-http", "hf-sequential", "hf-static", "hf-cb")  # the default set
# on request: the worker with prefix caching off beside `toolkit`; replicas on a Ray this process starts; llama.cpp
# on the same GGUF file when llama-cpp-python is installed (skipped with a note otherwise)
EXTRA_SYSTEMS = ("toolkit-no-cache", "toolkit-ray", "llama-cpp")
CLIENTS = ("asyncio", "threads")  # how `toolkit` is fed: pipe.astream tasks, or threads each calling pipe.generate
KNOWN_SYSTEMS = SYSTEMS + EXTRA_SYSTEMS


@dataclass(slots=True)
class BenchConfig:
    systems: tuple[str, ...] = SYSTEMS
    workload: str = "random"
    num_requests: int = 32
    input_len: tuple[int, int] = (16, 256)
    output_len: tuple[int, int] = (8, 128)
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    model: str = "smollm2-135m-instruct"
    prefix_len: int = 512  # shared-prefix workload: tokens of the system prompt every request starts with
    prefix_cache: bool = True  # toolkit and toolkit-inprocess: automatic prefix caching
    request_rate: float = math.inf
    max_concurrency: int | None = None
    out: str = "bench-results"
    max_batch_size: int = 32  # toolkit and hf-cb: most sequences in one step
    max_batch_tokens: int = 512  # toolkit and hf-cb: token budget of one step
    kv_cache_gib: float = 0.5  # toolkit and hf-cb: the same KV-cache memory
    static_batch_size: int = 8  # hf-static
    cb_page_size: int = 64  # hf-cb: tokens per KV page (transformers' default, 256, wastes the shared budget)
    sequential_limit: int | None = 8  # hf-sequential runs only the first N requests (it is slow); 0/None: all
    warmup: int = 1  # untimed warm-up requests per system
    rounds: int = 1  # each system runs this many times, the order rotated each round; the median run is reported
    threads: int | None = None  # torch threads in every process; None: torch's default
    replicas: int = 2  # toolkit-ray: model-worker replicas (Ray actors)
    threads_per_replica: int | None = None  # toolkit-ray: CPUs and torch threads of each; None: threads / replicas
    client: str = "asyncio"  # toolkit / toolkit-no-cache: "asyncio" (astream tasks) or "threads" (pipe.generate)
    client_threads: int = 32  # client "threads": how many threads (also the concurrency limit)
    allow_slow_dtype: bool = False  # run a bfloat16 / float16 the device would emulate (rows marked); False: refuse
    isolate: bool = True  # each system in its own spawned process (clean memory, a crash stays contained)
    plot: bool = True

    @property
    def client_concurrency(self) -> int:
        """Client "threads": how many threads run, within --max-concurrency."""
        return min(self.client_threads, self.max_concurrency or self.client_threads)

    @property
    def offline(self) -> bool:
        return math.isinf(self.request_rate)

    @property
    def mode(self) -> str:
        return "offline" if self.offline else f"poisson-{self.request_rate:g}rps"

    @property
    def stem(self) -> str:
        """File name stem of the results: one file set per workload, mode and dtype; a rerun replaces it."""
        return (f"{self.workload}-{self.mode}-{self.dtype}" + ("" if self.prefix_cache else "-no-prefix-cache")
                + ("" if self.client == "asyncio" else f"-{self.client}-client"))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["request_rate"] = "inf" if self.offline else self.request_rate
        return data
