"""Side-by-side output of one benchmark run: pandas tables on screen, JSON, a Markdown table and a PNG."""

from __future__ import annotations

import json
import math
import platform
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .stats import LATENCIES, LATENCY_STATS

THROUGHPUT_COLUMNS = {
    "requests": "requests", "exact_token_counts": "exact tokens", "output_tok_s": "output tok/s",
    "total_tok_s": "total tok/s", "req_s": "req/s", "batch_mean": "batch mean", "batch_peak": "batch peak",
    "peak_rss_mib": "peak RSS MiB", "roofline_frac": "roofline", "prefix_hit_rate": "prefix hits",
    "loadavg_1m": "load", "note": "note",
}
LATENCY_COLUMNS = {
    f"{name}_{stat}_ms": f"{name.upper()} {stat}" for name in LATENCIES for stat in LATENCY_STATS
}
Samples = dict[str, dict[str, list[float]]]


def tables(summaries: dict[str, dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(throughput table, latency table in ms), one row per system."""
    frame = pd.DataFrame.from_dict(summaries, orient="index")
    frame.index.name = "system"
    throughput = frame.reindex(columns=list(THROUGHPUT_COLUMNS)).rename(columns=THROUGHPUT_COLUMNS)
    latency = frame.reindex(columns=list(LATENCY_COLUMNS)).rename(columns=LATENCY_COLUMNS)
    return throughput, latency


def show(summaries: dict[str, dict[str, Any]], header: str) -> str:
    throughput, latency = tables(summaries)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.precision", 3):
        text = f"{header}\n\n{throughput}\n\nlatency (ms)\n{latency}"
    errors = [f"{name}: {s['error']}" for name, s in summaries.items() if s.get("error")]
    return text + ("\n\nfailed systems:\n" + "\n".join(errors) if errors else "")


def markdown(summaries: dict[str, dict[str, Any]], header: str) -> str:
    """The two tables as GitHub Markdown (what BENCHMARKS.md quotes), without needing `tabulate`."""
    throughput, latency = tables(summaries)
    return f"{header}\n\n{_md(throughput)}\n\nLatency (ms):\n\n{_md(latency)}\n"


def _md(frame: pd.DataFrame) -> str:
    rows = [["system", *map(str, frame.columns)], ["---"] * (len(frame.columns) + 1)]
    rows += [[str(name), *(_cell(v) for v in row)] for name, row in zip(frame.index, frame.to_numpy(), strict=True)]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _cell(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "**NO**"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else str(value)


def machine_info(probe: dict[str, Any]) -> dict[str, Any]:
    """The software and the model probe; the CPU itself is in the run's `host` record (engine.hardware.probe_host)."""
    import torch
    import transformers

    from toolkit.engine.hardware import cpu_model, usable_cpus

    return {
        "cpu": cpu_model(), "cpus_usable": len(usable_cpus()), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, **probe,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=True))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    return str(value)


def plot(path: Path, summaries: dict[str, dict[str, Any]], samples: Samples, title: str) -> None:
    """Output and total tok/s bars, and the CDFs of TTFT and ITL (log scale), one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    names = list(summaries)
    fig, (bars, ttft, itl) = plt.subplots(1, 3, figsize=(17, 4.8))
    x = np.arange(len(names))
    bars.bar(x - 0.2, [summaries[n]["output_tok_s"] for n in names], 0.4, label="output tok/s")
    bars.bar(x + 0.2, [summaries[n]["total_tok_s"] for n in names], 0.4, label="total tok/s")
    bars.set_xticks(x, names, rotation=20)
    bars.set_title("throughput")
    bars.legend()
    for axis, key, label in ((ttft, "ttft", "TTFT (s)"), (itl, "itl", "inter-token latency (s)")):
        for name in names:
            values = np.sort(np.asarray(samples.get(name, {}).get(key, []), dtype=float))
            if values.size:
                axis.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=name)
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # 1, 2, 5, 10 ...: readable in any span
        axis.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        axis.set_xlabel(label)
        axis.set_ylabel("fraction of " + ("requests" if key == "ttft" else "gaps"))
        axis.set_title(f"{key.upper()} CDF")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 150), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
