"""Turn a SystemRun into the numbers vLLM's serving benchmark reports, plus occupancy, memory and roofline."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .records import RequestRecord, SystemRun
from .roofline import model_flops

LATENCIES = ("ttft", "tpot", "itl", "e2e")
LATENCY_STATS = ("mean", "p50", "p99")
METRICS = (
    "requests", "completed", "output_tokens", "expected_output_tokens", "exact_token_counts", "duration_s",
    "output_tok_s", "total_tok_s", "req_s",
    *(f"{name}_{stat}_ms" for name in LATENCIES for stat in LATENCY_STATS),
    "batch_mean", "batch_peak", "peak_rss_mib", "load_s", "gemm_gflops", "achieved_gflops", "roofline_frac",
    "loadavg_1m", "prefix_hit_rate",
)


def latencies(records: list[RequestRecord]) -> dict[str, list[float]]:
    """Per-request TTFT, TPOT and E2E, and every inter-chunk gap (ITL), in seconds, as vLLM defines them."""
    out: dict[str, list[float]] = {name: [] for name in LATENCIES}
    for r in records:
        if not r.chunk_times:
            continue
        ttft = r.chunk_times[0] - r.sent_at
        e2e = r.chunk_times[-1] - r.sent_at
        out["ttft"].append(ttft)
        out["e2e"].append(e2e)
        if r.num_tokens > 1 and len(r.chunk_times) > 1:  # all tokens at once (a blocking generate): no TPOT
            out["tpot"].append((e2e - ttft) / (r.num_tokens - 1))
        out["itl"].extend(np.diff(r.chunk_times).tolist())
    return out


def _stats(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return math.nan, math.nan, math.nan
    ms = np.asarray(values) * 1000
    return float(ms.mean()), float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def computed_prompt_tokens(prompt_tokens: int, hit_rate: float) -> float:
    """Prompt tokens the model actually ran: those served from the prefix cache cost no FLOPs (NaN rate: none)."""
    return prompt_tokens * (1.0 - hit_rate) if math.isfinite(hit_rate) else float(prompt_tokens)


def duration_s(run: SystemRun) -> float:
    """From when the first request could be sent to the last chunk received."""
    return max((r.chunk_times[-1] for r in run.records if r.chunk_times), default=run.started_at) - run.started_at


def output_tok_s(run: SystemRun) -> float:
    duration = duration_s(run)
    return sum(r.num_tokens for r in run.records) / duration if duration > 0 else math.nan


def summarize(run: SystemRun, probe: dict[str, Any]) -> dict[str, Any]:
    """Every metric in METRICS (NaN where a system cannot know it), plus the run's error and note."""
    done = [r for r in run.records if r.chunk_times]
    duration = duration_s(run)
    output_tokens = sum(r.num_tokens for r in run.records)
    prompt_tokens = sum(r.prompt_len for r in done)
    rate = (lambda n: n / duration) if duration > 0 else (lambda n: math.nan)
    summary: dict[str, Any] = {
        "requests": len(run.records),
        "completed": sum(r.done for r in run.records),
        "output_tokens": output_tokens,
        "expected_output_tokens": sum(r.output_len for r in run.records),
        "exact_token_counts": bool(run.records) and all(r.num_tokens == r.output_len for r in run.records),
        "duration_s": duration,
        "output_tok_s": output_tok_s(run),
        "total_tok_s": rate(output_tokens + prompt_tokens),
        "req_s": rate(len(done)),
    }
    for name, values in latencies(run.records).items():
        summary.update(zip((f"{name}_{stat}_ms" for stat in LATENCY_STATS), _stats(values), strict=True))
    sizes = np.asarray(run.batch_sizes, dtype=float)
    summary["batch_mean"] = float(sizes.mean()) if sizes.size else math.nan
    summary["batch_peak"] = float(sizes.max()) if sizes.size else math.nan
    summary["peak_rss_mib"] = run.peak_rss_bytes / 2**20 if run.peak_rss_bytes else math.nan
    summary["load_s"] = run.load_s
    flops = model_flops(probe.get("num_params", 0), probe.get("lm_head_params", 0),
                        computed_prompt_tokens(prompt_tokens, run.prefix_cache_hit_rate), output_tokens)
    summary["gemm_gflops"] = probe.get("gemm_gflops", math.nan)
    summary["achieved_gflops"] = rate(flops / 1e9)
    summary["roofline_frac"] = summary["achieved_gflops"] / summary["gemm_gflops"]
    summary["loadavg_1m"] = run.loadavg_1m
    summary["prefix_hit_rate"] = run.prefix_cache_hit_rate
    summary["error"] = run.error
    summary["skipped"] = run.skipped
    summary["note"] = "; ".join(filter(None, [f"skipped: {run.skipped}" if run.skipped else "", run.note]))
    if run.skipped:
        summary["exact_token_counts"] = None  # nothing was asked of it: neither yes nor NO
    return summary
