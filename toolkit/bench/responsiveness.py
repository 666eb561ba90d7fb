"""`python -m toolkit bench --responsiveness`: does the API stay responsive while the model is busy?

The seed's claim, measured: for each engine (`worker`: the model in its spawned process; `inprocess`: the engine
stepped on the server's own event loop) a `python -m toolkit serve` subprocess is started; a load process keeps
`--streams` streams running (EOS ignored) while a probe calls GET /health and GET /v1/models every 10 ms. The report
gives the probe's p50 / p99 / max latency under load for each engine, beside the worker's mean step time, and plots
both timelines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ENGINES = ("worker", "inprocess")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m toolkit bench --responsiveness", description=__doc__)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from {', '.join(ENGINES)}")
    p.add_argument("--streams", type=int, default=32, help="concurrent streams that saturate the engine")
    p.add_argument("--output-len", type=int, default=256, help="tokens per stream (EOS ignored); restarted when done")
    p.add_argument("--duration-s", type=float, default=20.0, help="probing time under load, per engine")
    p.add_argument("--interval-ms", type=float, default=10.0, help="time between probes")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the engine")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keep_streaming(url: str, model: str, streams: int, output_len: int, stop_at: float) -> None:
    """Keep `streams` completions streaming until `stop_at` (time.time()); a separate process, so the load's own
    client work never delays the probe."""
    import openai

    async def one(client: Any, i: int) -> None:
        while time.time() < stop_at:
            stream = await client.completions.create(model=model, prompt=f"Stream {i}: tell a long story.",
                                                     max_tokens=output_len, stream=True,
                                                     extra_body={"ignore_eos": True})
            async for _ in stream:
                if time.time() >= stop_at:
                    await stream.close()
                    break

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
        try:
            await asyncio.gather(*(one(client, i) for i in range(streams)))
        finally:
            await client.close()

    asyncio.run(run())


def _probe(url: str, duration_s: float, interval_s: float) -> list[tuple[float, str, float]]:
    """(t since start, path, latency s) for GET /health and GET /v1/models, alternating, every interval_s."""
    import httpx

    samples = []
    paths = ("/health", "/v1/models")
    with httpx.Client(base_url=url, timeout=30) as client:
        start = time.perf_counter()
        i = 0
        while (now := time.perf_counter()) - start < duration_s:
            path = paths[i % 2]
            client.get(path)
            samples.append((now - start, path, time.perf_counter() - now))
            i += 1
            time.sleep(max(0.0, start + i * interval_s - time.perf_counter()))
    return samples


def _mean_step_ms(url: str) -> float:
    """The worker's mean step time, from the server's own Prometheus histogram."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("toolkit:step_duration_seconds_")}
    count = values.get("toolkit:step_duration_seconds_count", 0.0)
    return 1000 * values.get("toolkit:step_duration_seconds_sum", math.nan) / count if count else math.nan


def measure(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "toolkit", "serve", "--model", args.model, "--engine", engine, "--port", str(port),
           "--no-access-log", "--dtype", args.dtype, "--device", args.device, "--max-batch-size", str(args.streams)]
    if args.threads:
        cmd += ["--num-threads", str(args.threads)]
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(url, server, log)
            idle = _probe(url, 1.0, args.interval_ms / 1000)
            stop_at = time.time() + args.duration_s + 3.0
            load = mp.get_context("spawn").Process(target=keep_streaming, args=(url, args.model, args.streams,
                                                                       args.output_len, stop_at))
            load.start()
            time.sleep(3.0)  # the streams are admitted and the engine is stepping full batches
            busy = _probe(url, args.duration_s, args.interval_ms / 1000)
            load.join(args.duration_s + 60)
            if load.is_alive():
                load.terminate()
            step_ms = _mean_step_ms(url)
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    latencies = np.array([s[2] for s in busy]) * 1000
    return {
        "engine": engine, "probes": len(busy), "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)), "max_ms": float(latencies.max()),
        "idle_p50_ms": float(np.percentile([s[2] * 1000 for s in idle], 50)), "mean_step_ms": step_ms,
        "timeline": [(round(t, 4), path, round(lat * 1000, 3)) for t, path, lat in busy],
    }


def _wait_healthy(url: str, server: subprocess.Popen, log: Any, timeout_s: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {server.returncode}:\n{log.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout_s} s")


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    import torch

    lines = [f"Probe latency (GET /health and /v1/models every {args.interval_ms:g} ms) while {args.streams} streams "
             f"saturate {args.model} ({args.dtype}, {args.device}); host CPU capability "
             f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs", "",
             "| engine | probes | p50 ms | p99 ms | max ms | idle p50 ms | mean step ms |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['engine']} | {r['probes']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} | "
                     f"{r['idle_p50_ms']:.2f} | {r['mean_step_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, results: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for r in sorted(results, key=lambda r: r["engine"] == "worker"):  # the worker drawn last, on top
        t = [s[0] for s in r["timeline"]]
        lat = [s[2] for s in r["timeline"]]
        ax.plot(t, lat, lw=0.8, label=f"{r['engine']} (p99 {r['p99_ms']:.1f} ms)")
    ax.set_yscale("log")
    ax.set_xlabel("seconds under load")
    ax.set_ylabel("probe latency (ms)")
    ax.set_title(textwrap.fill(title, 120), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines):
        parser().error(f"engines must come from {', '.join(ENGINES)}")
    results = [measure(engine, args) for engine in engines]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"responsiveness-{args.model}-{args.dtype}"
    text = report(results, args)
    print(text, flush=True)
    Path(f"{stem}.json").write_text(json.dumps({"config": vars(args), "results": results}, indent=1))
    Path(f"{stem}.md").write_text(text)
    if args.plot:
        plot(Path(f"{stem}.png"), results, text.splitlines()[0])
    print(f"wrote {stem}.json, {stem}.md" + (f", {stem}.png" if args.plot else ""), flush=True)
    return 0
