"""`python -m toolkit bench`: one seeded workload, every chosen system one after another, one report."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toolkit.engine.hardware import HostInfo, choose_num_threads, probe_host

from .config import CLIENTS, KNOWN_SYSTEMS, BenchConfig
from .records import SystemRun
from .report import machine_info, markdown, plot, show, write_json
from .roofline import gemm_gflops
from .stats import latencies, output_tok_s, summarize
from .systems import isolated, probe_model, run_system
from .workloads import SHARED_PREFIX_UNIQUE, WORKLOADS, BenchRequest, build_workload, parse_range


def parser() -> argparse.ArgumentParser:
    """The flags of BenchConfig, with its defaults."""
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m toolkit bench", description=__doc__,
                                epilog="bench --responsiveness --help: the API latency while the engine is busy")
    p.add_argument("--systems", default=",".join(d.systems),
                   help=f"comma-separated, from {', '.join(KNOWN_SYSTEMS)}")
    p.add_argument("--workload", choices=WORKLOADS, default=d.workload)
    p.add_argument("--prefix-len", type=int, default=d.prefix_len,
                   help="shared-prefix: tokens of the system prompt all requests share")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="toolkit and toolkit-inprocess without prefix caching (toolkit-no-cache is always without)")
    p.add_argument("--num-requests", type=int, default=d.num_requests)
    p.add_argument("--input-len", default=_range(d.input_len), help="prompt tokens LO:HI, uniform (random workload)")
    p.add_argument("--output-len", default=_range(d.output_len), help="output tokens LO:HI, uniform; EOS is ignored")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=d.dtype)
    p.add_argument("--device", default=d.device, help="cpu, cuda, auto ...")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--model", default=d.model)
    p.add_argument("--request-rate", type=float, default=d.request_rate, help="requests/s, Poisson; inf = all at t=0")
    p.add_argument("--max-concurrency", type=int, default=d.max_concurrency, help="most requests in flight per system")
    p.add_argument("--out", default=d.out, help="directory for the JSON, Markdown and PNG")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="toolkit and hf-cb: sequences per step")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help="toolkit and hf-cb: tokens per step")
    p.add_argument("--kv-cache-gib", type=float, default=d.kv_cache_gib, help="toolkit and hf-cb: KV-cache memory")
    p.add_argument("--static-batch-size", type=int, default=d.static_batch_size,
                   help="hf-static: requests per generate() call")
    p.add_argument("--cb-page-size", type=int, default=d.cb_page_size, help="hf-cb: tokens per KV page")
    p.add_argument("--sequential-limit", type=int, default=d.sequential_limit,
                   help="hf-sequential: only the first N requests (0: all; it makes ~16 tok/s here)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed warm-up requests per system")
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help="run every system N times, rotating the order each round, and report each one's median run "
                        "and its per-round ratios to the first system: on a shared host one run varies by ~10 %%")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads per process (default: one per physical core this process may use)")
    p.add_argument("--replicas", type=int, default=d.replicas, help="toolkit-ray: model-worker replicas")
    p.add_argument("--threads-per-replica", type=int, default=d.threads_per_replica,
                   help="toolkit-ray: CPUs and torch threads per replica (default: --threads / --replicas)")
    p.add_argument("--client", choices=CLIENTS, default=d.client,
                   help="how toolkit / toolkit-no-cache are fed: asyncio tasks on pipe.astream, or --client-threads "
                        "Python threads each calling pipe.generate (a user's first try)")
    p.add_argument("--client-threads", type=int, default=d.client_threads, help="--client threads: how many")
    p.add_argument("--allow-slow-dtype", action="store_true",
                   help="run a bfloat16 / float16 that this host would emulate (refused otherwise); rows are marked")
    p.add_argument("--no-isolate", dest="isolate", action="store_false", help="run systems in this process")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    return p


def _range(bounds: tuple[int, int]) -> str:
    return f"{bounds[0]}:{bounds[1]}"


def parse_config(argv: Sequence[str]) -> BenchConfig:
    p = parser()
    args = p.parse_args(list(argv))
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    unknown = [s for s in systems if s not in KNOWN_SYSTEMS]
    if unknown or not systems:
        p.error(f"unknown systems {unknown}: choose from {', '.join(KNOWN_SYSTEMS)}")
    if args.prefix_len < 1:
        p.error("--prefix-len must be at least 1")
    if args.client_threads < 1:
        p.error("--client-threads must be at least 1")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    fields = vars(args) | {"systems": systems, "input_len": parse_range(args.input_len),
                           "output_len": parse_range(args.output_len)}
    return BenchConfig(**fields)


def header(cfg: BenchConfig, probe: dict[str, Any], host: HostInfo, slow: str) -> str:
    """The table title: the workload, the model and dtype, the roofline's GEMM, then the host record on its own line."""
    title = _workload_line(cfg, probe)
    if slow:
        title += f"; EMULATED {cfg.dtype}: {slow}"
    if cfg.client != "asyncio":
        title += f"; client: {cfg.client_concurrency} threads calling pipe.generate"
    return f"{title}\nhost: {host.title()}"


def _workload_line(cfg: BenchConfig, probe: dict[str, Any]) -> str:
    lens = {"random": f"prompts {cfg.input_len[0]}-{cfg.input_len[1]}", "chat": "chat prompts",
            "shared-prefix": f"a shared {cfg.prefix_len}-token prefix + {SHARED_PREFIX_UNIQUE[0]}-"
                             f"{SHARED_PREFIX_UNIQUE[1]} unique tokens"}[cfg.workload]
    lens += "" if cfg.prefix_cache else ", toolkit without prefix caching"
    arrivals = "offline (all at t=0)" if cfg.offline else f"Poisson {cfg.request_rate:g} req/s"
    limit = f", max concurrency {cfg.max_concurrency}" if cfg.max_concurrency else ""
    gemm = probe.get("gemm_gflops", math.nan)
    where = probe.get("device_name", cfg.device)
    return (f"{cfg.workload} workload: {cfg.num_requests} requests, {lens}, outputs {cfg.output_len[0]}-"
            f"{cfg.output_len[1]} tokens (EOS ignored), {arrivals}{limit}; {cfg.model} {cfg.dtype} on "
            f"{where}, {probe.get('torch_threads', '?')} threads; "
            f"GEMM {gemm:.0f} GFLOP/s (roofline = model FLOPs / this)")


def requests_for(name: str, cfg: BenchConfig, requests: list[BenchRequest]) -> tuple[list[BenchRequest], str]:
    if name == "hf-sequential" and cfg.sequential_limit and cfg.sequential_limit < len(requests):
        subset = requests[: cfg.sequential_limit]
        return subset, f"subset: first {len(subset)} of {len(requests)} requests"
    return requests, ""


def measure(name: str, cfg: BenchConfig, requests: list[BenchRequest]) -> SystemRun:
    """One system in its own process; a crash there is reported as this system's error."""
    subset, note = requests_for(name, cfg, requests)
    started = time.perf_counter()
    try:
        run = isolated(cfg, run_system, name, cfg, subset)
    except Exception as exc:
        run = SystemRun(name, error=str(exc))
    run.prepend_note(note)
    run.loadavg_1m = os.getloadavg()[0]
    tokens = sum(r.num_tokens for r in run.records)
    status = f"FAILED: {run.error.splitlines()[0]}" if run.error else f"{tokens} tokens"
    status = f"skipped: {run.skipped}" if run.skipped else status
    print(f"{name}: {status} ({time.perf_counter() - started:.0f} s with start-up)", flush=True)
    return run


def rotated(systems: Sequence[str], i: int) -> list[str]:
    """Round i's order: the systems shifted by i, so that no system always runs first (or just after another)."""
    shift = i % len(systems)
    return [*systems[shift:], *systems[:shift]]


def median_runs(rounds: list[list[SystemRun]], systems: Sequence[str]
                ) -> tuple[list[SystemRun], dict[str, dict[str, Any]]]:
    """Each system's run of median output tok/s (in `systems` order) and, with several rounds, its tok/s per round and
    the per-round ratios to the first system: the paired comparison a noisy shared host allows."""
    if len(rounds) == 1:
        return rounds[0], {}  # round 0 runs the systems in their own order
    by_name: dict[str, list[tuple[SystemRun, float]]] = {name: [] for name in systems}
    for run in (run for one_round in rounds for run in one_round):
        by_name[run.name].append((run, output_tok_s(run)))
    first = [tok_s for _, tok_s in by_name[systems[0]]]
    chosen, paired = [], {}
    for name in systems:
        ranked = sorted(by_name[name], key=lambda pair: pair[1] if math.isfinite(pair[1]) else -math.inf)
        chosen.append(ranked[(len(ranked) - 1) // 2][0])
        per_round = [tok_s for _, tok_s in by_name[name]]
        ratios = [r for r in (a / b for a, b in zip(per_round, first, strict=True) if b > 0)
                  if r > 0 and math.isfinite(r)]
        paired[name] = {"rounds_output_tok_s": per_round,
                        "paired_ratio": statistics.geometric_mean(ratios) if ratios else math.nan,
                        "paired_ratio_min": min(ratios, default=math.nan),
                        "paired_ratio_max": max(ratios, default=math.nan)}
        note = f"median of {len(per_round)} rounds (" + ", ".join(f"{t:.1f}" for t in per_round) + " tok/s)"
        if name != systems[0]:
            note += (f"; x{paired[name]['paired_ratio']:.3f} of {systems[0]} per round (geometric mean, "
                     f"{paired[name]['paired_ratio_min']:.3f}-{paired[name]['paired_ratio_max']:.3f})")
        chosen[-1].prepend_note(note)
    return chosen, paired


def emulated_dtype(cfg: BenchConfig) -> str:
    """Why cfg.dtype would run emulated on cfg.device, or '' where the hardware does it (float32 always)."""
    import torch

    from toolkit import models
    from toolkit.engine.hardware import cpu_capability, native_dtype, native_features

    if cfg.dtype == "float32":
        return ""
    device = models.resolve_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    if native_dtype(dtype, device):
        return ""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} has no native {cfg.dtype}"
    return (f"this CPU ({cpu_capability() or device}) has no {native_features(dtype)}: torch emulates {cfg.dtype}, "
            "up to 100x slower than float32 (1.2 against 125 GFLOP/s on an AVX2 EPYC)")


def refuse_slow_dtype(cfg: BenchConfig) -> str:
    """The mark for every row when --allow-slow-dtype lets an emulated dtype run; InvalidRequestError without it."""
    from toolkit.errors import InvalidRequestError

    slow = emulated_dtype(cfg)
    if slow and not cfg.allow_slow_dtype:
        raise InvalidRequestError(
            f"refusing to benchmark --dtype {cfg.dtype}: {slow}. Use --dtype float32, or --allow-slow-dtype to run it "
            "anyway with every row marked as emulated"
        )
    return slow


def machine_probe(cfg: BenchConfig, device: str) -> dict[str, Any]:
    """GEMM GFLOP/s for the dtype, measured here (the other processes idle) and the load average around it."""
    return {"gemm_gflops": gemm_gflops(cfg.dtype, device, min_s=1.0), "loadavg_1m": os.getloadavg()[0]}


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Build the workload, probe the machine, run each system, print and write the report; returns the JSON data.

    The GEMM ceiling is measured before and after the systems and the better one kept: the cores are shared, and
    a probe that ran while someone else was busy would make every roofline fraction look too good.
    """
    import torch

    from toolkit import models

    slow = refuse_slow_dtype(cfg)
    threads_rule = ""
    if cfg.threads is None:  # every system gets the worker's own default, so they all run with the same threads
        threads, threads_rule = choose_num_threads()
        cfg = dataclasses.replace(cfg, threads=threads)
    torch.set_num_threads(cfg.threads)  # this process's probes; each system sets its own
    tokenizer = models.load_tokenizer(cfg.model)
    requests = build_workload(tokenizer, cfg.workload, cfg.num_requests, cfg.input_len, cfg.output_len, cfg.seed,
                              cfg.request_rate, cfg.prefix_len)
    probe = isolated(cfg, probe_model, cfg)
    host = probe_host(min_s=0.3)  # the host record: CPU, flags, float32 / bfloat16 GEMM, memory bandwidth
    before = machine_probe(cfg, probe["device"])
    probe |= {"gemm_gflops": before["gemm_gflops"]}
    print(header(cfg, probe, host, slow), flush=True)
    rounds = [[measure(name, cfg, requests) for name in rotated(cfg.systems, i)] for i in range(cfg.rounds)]
    after = machine_probe(cfg, probe["device"])
    probe |= {"gemm_gflops": max(before["gemm_gflops"], after["gemm_gflops"]), "gemm_gflops_before":
              before["gemm_gflops"], "gemm_gflops_after": after["gemm_gflops"], "loadavg_1m_before":
              before["loadavg_1m"], "loadavg_1m_after": after["loadavg_1m"]}
    title = header(cfg, probe, host, slow)
    runs, paired = median_runs(rounds, cfg.systems)
    if slow:
        for run in runs:
            run.prepend_note(f"emulated {cfg.dtype}")
    summaries = {run.name: summarize(run, probe) | paired.get(run.name, {}) for run in runs}
    samples = {run.name: latencies(run.records) for run in runs}
    print("\n" + show(summaries, title), flush=True)
    host_record = host.as_dict() | {"threads_rule": threads_rule or "given (--threads)", "emulated_dtype": slow}
    data = {"config": cfg.to_dict(), "machine": machine_info(probe), "host": host_record, "title": title,
            "systems": summaries,
            "samples": samples, "workload": {"prompt_tokens": sum(len(r.prompt_ids) for r in requests),
                                             "output_tokens": sum(r.output_len for r in requests)}}
    write_outputs(cfg, data, summaries, samples, title)
    return data


def write_outputs(cfg: BenchConfig, data: dict[str, Any], summaries: dict[str, dict[str, Any]],
                  samples: dict[str, dict[str, list[float]]], title: str) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # appended, not with_suffix(): a stem such as "random-poisson-2.5rps-float32" holds a dot
    json_path, md_path, png_path = (out / f"{cfg.stem}{ext}" for ext in (".json", ".md", ".png"))
    write_json(json_path, data)
    md_path.write_text(markdown(summaries, title))
    written = [json_path, md_path]
    if cfg.plot:
        plot(png_path, summaries, samples, title)
        written.append(png_path)
    print("wrote " + ", ".join(map(str, written)), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m toolkit bench`: 0 when every system that ran produced exactly the requested tokens
    (a skipped one, e.g. llama-cpp without llama-cpp-python, does not fail the run); 2 when the run was refused."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--responsiveness" in argv:  # the API's probe-latency benchmark has its own flags
        from .responsiveness import main as responsiveness

        return responsiveness([a for a in argv if a != "--responsiveness"])
    from toolkit.errors import InvalidRequestError

    cfg = parse_config(argv)
    try:
        data = run_bench(cfg)
    except InvalidRequestError as exc:  # e.g. a dtype this host would emulate, without --allow-slow-dtype
        print(f"python -m toolkit bench: {exc}", file=sys.stderr, flush=True)
        return 2
    ok = all(s["skipped"] or (s["error"] is None and s["exact_token_counts"]) for s in data["systems"].values())
    return 0 if ok else 1
