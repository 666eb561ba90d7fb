"""Seeded workloads, as vLLM's serving benchmark builds them: prompts, output lengths and arrival times.

Every request carries its prompt as token ids, so each system gets exactly the same input and must produce exactly
`output_len` tokens (EOS is ignored everywhere).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CHAT_PROMPTS = (
    "Explain the difference between a process and a thread in simple terms.",
    "Write a short poem about the sea at night.",
    "What are three tips for writing readable Python code?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How does a hash map work? Give a small example.",
    "I have eggs, spinach and cheese. What can I cook for dinner?",
    "What is the capital of Australia, and why is it not Sydney?",
    "Give me a plan to learn basic Spanish in one month.",
    "Why is the sky blue? Answer for a ten-year-old.",
    "Write a polite email asking my manager for a day off next Friday.",
    "What is continuous batching in LLM serving, and why does it help throughput?",
    "List five healthy snacks that are easy to take to work.",
    "Translate 'Where is the train station?' into French and German.",
    "What are the pros and cons of working from home?",
    "Describe how photosynthesis works in a few sentences.",
    "Suggest a name for a small bakery that sells sourdough bread.",
)


WORKLOADS = ("random", "chat", "shared-prefix")
SHARED_PREFIX_UNIQUE = (16, 64)  # tokens after the shared system prompt in the shared-prefix workload


@dataclass(slots=True)
class BenchRequest:
    """One request of a workload: prompt ids, how many tokens to generate, when it arrives (s after the start)."""

    index: int
    prompt_ids: list[int]
    output_len: int
    arrival_s: float = 0.0


def parse_range(text: str) -> tuple[int, int]:
    """'16:256' -> (16, 256); '64' -> (64, 64). Both ends inclusive, as vLLM's random dataset."""
    lo, _, hi = text.partition(":")
    low, high = int(lo), int(hi or lo)
    if not 0 < low <= high:
        raise ValueError(f"range {text!r} must be LO:HI with 0 < LO <= HI")
    return low, high


def allowed_token_ids(tokenizer: Any) -> np.ndarray:
    """The vocabulary without special tokens, so a random prompt never contains BOS/EOS/chat markers."""
    vocab = int(tokenizer.vocab_size)
    special = [i for i in tokenizer.all_special_ids if i is not None and 0 <= i < vocab]
    return np.setdiff1d(np.arange(vocab), np.asarray(special, dtype=np.int64))


def random_workload(
    tokenizer: Any, num_requests: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int
) -> list[BenchRequest]:
    """Prompt lengths and output lengths uniform in their ranges, prompt ids uniform over the non-special vocab."""
    rng = np.random.default_rng(seed)
    allowed = allowed_token_ids(tokenizer)
    in_lens = rng.integers(input_len[0], input_len[1] + 1, size=num_requests)
    out_lens = rng.integers(output_len[0], output_len[1] + 1, size=num_requests)
    return [
        BenchRequest(i, rng.choice(allowed, size=int(n_in)).tolist(), int(n_out))
        for i, (n_in, n_out) in enumerate(zip(in_lens, out_lens, strict=True))
    ]


def shared_prefix_workload(
    tokenizer: Any, num_requests: int, prefix_len: int, unique_len: tuple[int, int], output_len: tuple[int, int],
    seed: int,
) -> list[BenchRequest]:
    """One random system prompt of `prefix_len` tokens shared by every request, then a random unique part."""
    rng = np.random.default_rng(seed)
    allowed = allowed_token_ids(tokenizer)
    prefix = rng.choice(allowed, size=prefix_len).tolist()
    tails = random_workload(tokenizer, num_requests, unique_len, output_len, seed + 1)
    return [BenchRequest(t.index, prefix + t.prompt_ids, t.output_len) for t in tails]


def chat_workload(tokenizer: Any, num_requests: int, output_len: tuple[int, int], seed: int) -> list[BenchRequest]:
    """The built-in chat prompts, cycled, through the tokenizer's chat template; output lengths as `random`."""
    rng = np.random.default_rng(seed)
    out_lens = rng.integers(output_len[0], output_len[1] + 1, size=num_requests)
    requests = []
    for i, n_out in enumerate(out_lens):
        messages = [{"role": "user", "content": CHAT_PROMPTS[i % len(CHAT_PROMPTS)]}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids if isinstance(ids, list) else list(ids["input_ids"])
        requests.append(BenchRequest(i, [int(t) for t in ids], int(n_out)))
    return requests


def warmup_requests(requests: Sequence[BenchRequest], count: int) -> list[BenchRequest]:
    """Short untimed requests (prompts cut from the workload's own) that pay one-off costs before the clock starts."""
    return [BenchRequest(-1 - i, requests[i % len(requests)].prompt_ids[:16], 4) for i in range(count)]


def poisson_arrivals(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Arrival offsets in seconds: all 0 for an infinite rate, else exponential gaps (a Poisson process) from 0."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed + 1)
    gaps = rng.exponential(1.0 / request_rate, size=max(num_requests - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:num_requests]


def build_workload(
    tokenizer: Any,
    kind: str,
    num_requests: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int,
    request_rate: float = math.inf,
    prefix_len: int = 512,
) -> list[BenchRequest]:
    """The whole workload, arrivals included, from a seed: every system sees identical requests.

    shared-prefix: a `prefix_len`-token system prompt, then 16-64 unique tokens (input_len is not used).
    """
    if kind == "random":
        requests = random_workload(tokenizer, num_requests, input_len, output_len, seed)
    elif kind == "chat":
        requests = chat_workload(tokenizer, num_requests, output_len, seed)
    elif kind == "shared-prefix":
        requests = shared_prefix_workload(tokenizer, num_requests, prefix_len, SHARED_PREFIX_UNIQUE, output_len, seed)
    else:
        raise ValueError(f"unknown workload {kind!r}: use {', '.join(WORKLOADS)}")
    for request, arrival in zip(requests, poisson_arrivals(num_requests, request_rate, seed), strict=True):
        request.arrival_s = arrival
    return requests
