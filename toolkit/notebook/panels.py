"""The Dashboard's five panels, drawn from a `MetricsLog.steps()` DataFrame onto a plain matplotlib Figure.

Plain `Figure` objects (no pyplot) so a background thread can draw without touching pyplot's global state, and
the inline backend never shows a stray copy. For a worker pool the steps carry a `replica` column: occupancy is
drawn per replica, restarts are told apart per replica, and a status line says which replica is alive and which
died when (`ReplicaStatus`, from the pool's `health()`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from toolkit.telemetry.metrics import occupancy

GIB = 1024**3
# Fixed margins: rendering is ~1.5x faster than with constrained layout, which counts at 2 frames/s on a busy CPU.
# wspace is a fraction of one of the grid's six narrow columns: room for a twin axis label between panels.
MARGINS = {"left": 0.06, "right": 0.95, "top": 0.9, "bottom": 0.09, "hspace": 0.35, "wspace": 1.4}
PREFILL_COLOR, DECODE_COLOR, MEMORY_COLOR = "tab:orange", "tab:blue", "tab:gray"
CACHE_COLOR, DEAD_COLOR = "tab:green", "tab:red"
POOL_TOP = 0.86  # the grid's top for a pool: room for the replica status line under the title


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What the panels need to know about the worker beyond its steps."""

    model: str
    device: str
    max_batch_size: int

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def device_label(self) -> str:
        """Device figures are GPU figures on CUDA; everywhere else they are the worker's CPU figures."""
        return f"GPU {self.device}" if self.on_gpu else self.device.upper()


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One replica of a pool as the dashboard shows it: serving or not, and since when it is dead."""

    index: int
    state: str  # WorkerState value: "ready", "failed", "starting", "stopped"
    died_at: float | None = None  # time.time() of its death, the clock of the steps' `t`
    died: str | None = None  # why, first line

    @property
    def dead(self) -> bool:
        return self.state == "failed"

    def label(self, t0: float | None) -> str:
        """`replica 1 DEAD since t=3.2 s` on the panels' time axis (seconds since the first logged step)."""
        if not self.dead:
            return f"replica {self.index} {'alive' if self.state == 'ready' else self.state}"
        since = "" if self.died_at is None or t0 is None else f" since t={self.died_at - t0:.1f} s"
        return f"replica {self.index} DEAD{since}"


def replica_statuses(health: Mapping[str, Any]) -> list[ReplicaStatus]:
    """The replicas of a pool's `health()`; empty for a single worker, whose health has no `replicas`."""
    return [ReplicaStatus(int(r.get("replica", i)), str(r["state"]), r.get("died_at"), r.get("died"))
            for i, r in enumerate(health.get("replicas") or [])]


def time_origin(steps: pd.DataFrame) -> float | None:
    """The wall-clock time that `since_first_step` makes 0: when the first logged step began."""
    return None if steps.empty else float(steps.t.iloc[0] - steps.step_ms.iloc[0] / 1000)


def restart_times(steps: pd.DataFrame) -> list[float]:
    """`t` of each step run by a new process of the same worker (per replica in a pool's merged steps)."""
    if steps.empty:
        return []
    owner = steps.replica if "replica" in steps.columns else pd.Series(0, index=steps.index)
    new_pid = steps.pid.ne(steps.groupby(owner).pid.shift()) & owner.duplicated()
    return [float(t) for t in steps.t[new_pid]]


def _binned_sums(steps: pd.DataFrame, columns: list[str], bin_s: float | None) -> tuple[pd.DataFrame, float]:
    """Sums of `columns` in time bins of `bin_s` (default: ~40 bins) from the first step, empty bins as 0, indexed
    by each bin's start time; and the bin width used."""
    t0, span = float(steps.t.iloc[0]), float(steps.t.iloc[-1] - steps.t.iloc[0])
    bin_s = bin_s or float(np.clip(span / 40, 0.05, 5.0))
    bins = np.floor((steps.t.to_numpy() - t0) / bin_s).astype(int)
    sums = steps[columns].groupby(bins).sum().reindex(range(int(bins.max()) + 1), fill_value=0)
    sums.index = pd.Index(t0 + sums.index.to_numpy() * bin_s, name="t")
    return sums, bin_s


def throughput(steps: pd.DataFrame, bin_s: float | None = None) -> pd.DataFrame:
    """Prefill and decode tokens/s in time bins (tokens counted at each step's end time), empty bins as 0."""
    if steps.empty:
        return pd.DataFrame({"prefill_tok_s": [], "decode_tok_s": []}, index=pd.Index([], name="t"))
    sums, bin_s = _binned_sums(steps, ["prefill_tokens", "decode_tokens"], bin_s)
    return (sums / bin_s).rename(columns={"prefill_tokens": "prefill_tok_s", "decode_tokens": "decode_tok_s"})


def prefix_hit_rate(steps: pd.DataFrame, bin_s: float | None = None) -> pd.DataFrame:
    """Prefix-cache hits / queries (tokens) per time bin (NaN where nothing was looked up) and cumulatively."""
    if steps.empty:
        return pd.DataFrame({"hit_rate": [], "cumulative": []}, index=pd.Index([], name="t"))
    sums, _ = _binned_sums(steps, ["prefix_cache_hits", "prefix_cache_queries"], bin_s)
    queries = sums.prefix_cache_queries.replace(0, np.nan)
    total = sums.prefix_cache_queries.cumsum().replace(0, np.nan)
    return pd.DataFrame({"hit_rate": sums.prefix_cache_hits / queries,
                         "cumulative": sums.prefix_cache_hits.cumsum() / total}, index=sums.index)


def new_figure() -> Figure:
    return Figure(figsize=(13, 6.5), dpi=72)


def since_first_step(steps: pd.DataFrame) -> pd.DataFrame:
    """`t` (wall clock) as seconds since the first logged step began: one axis across worker restarts."""
    t0 = time_origin(steps)
    return steps if t0 is None else steps.assign(t=steps.t - t0)


def draw(fig: Figure, steps: pd.DataFrame, view: WorkerView, window_s: float | None = None,
         replicas: Sequence[ReplicaStatus] = ()) -> Figure:
    """Clear `fig` and draw occupancy, tokens/s and queue depth above KV-cache use and the prefix-cache hit rate,
    over the last `window_s` seconds; with `replicas` (a pool), a status line and a red mark where one died."""
    fig.clear()
    t0 = time_origin(steps)
    steps = since_first_step(steps)
    if window_s is not None and not steps.empty:
        steps = steps[steps.t >= steps.t.iloc[-1] - window_s]
    margins = {**MARGINS, "top": POOL_TOP} if replicas else MARGINS
    grid = fig.add_gridspec(2, 6, **margins)  # three panels on top, two wider ones below
    top = [fig.add_subplot(grid[0, 2 * i : 2 * i + 2]) for i in range(3)]
    bottom = [fig.add_subplot(grid[1, 3 * i : 3 * i + 3]) for i in range(2)]
    for ax in (*top[1:], *bottom):
        ax.sharex(top[0])
    _occupancy(top[0], steps, view)
    _throughput(top[1], steps, view)
    _queue(top[2], steps)
    _kv_cache(bottom[0], steps, view)
    _prefix_cache(bottom[1], steps)
    for ax in bottom:
        ax.set_xlabel("seconds since the first logged step")
    restarts = restart_times(steps)
    deaths = [r.died_at - t0 for r in replicas if r.dead and r.died_at is not None and t0 is not None]
    for ax in (*top, *bottom):  # a new worker process from here on; a replica died here
        for t in restarts:
            ax.axvline(t, color="gray", lw=0.8, ls="--")
        for t in deaths:
            ax.axvline(t, color=DEAD_COLOR, lw=1.2, ls="-.")
    for i, status in enumerate(replicas):
        fig.text(MARGINS["left"] + i * 0.2, 0.915, status.label(t0), fontsize=10, va="center",
                 color=DEAD_COLOR if status.dead else CACHE_COLOR, fontweight="bold" if status.dead else "normal")
    if steps.empty:
        for ax in (*top, *bottom):
            ax.text(0.5, 0.5, "no steps yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(f"{view.model} on {view.device_label}: {len(steps)} steps")
    return fig


def render_png(fig: Figure) -> bytes:
    """The figure as PNG bytes through the Agg canvas (thread-safe per figure, no GUI backend)."""
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()


def _occupancy(ax: Axes, steps: pd.DataFrame, view: WorkerView) -> None:
    ax.set_title(f"Batch occupancy (batch / max_batch_size={view.max_batch_size})")
    ax.set_ylim(0, 1.05)
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    if steps.empty:
        pass
    elif "replica" in steps.columns:  # a pool: one line per replica, each from its own steps
        for replica, own in steps.groupby("replica"):
            ax.step(own.t, occupancy(own, view.max_batch_size), where="post", label=f"replica {replica}")
        ax.legend(loc="lower right", fontsize="small")
    else:
        ax.step(steps.t, occupancy(steps, view.max_batch_size), where="post", color=DECODE_COLOR)
    ax.set_ylabel("occupancy")


def _throughput(ax: Axes, steps: pd.DataFrame, view: WorkerView) -> None:
    ax.set_title(f"Tokens/s on {view.device_label}")
    rates = throughput(steps)
    if not rates.empty:
        ax.step(rates.index, rates.prefill_tok_s, where="post", color=PREFILL_COLOR, label="prefill")
        ax.step(rates.index, rates.decode_tok_s, where="post", color=DECODE_COLOR, label="decode")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_ylabel("tokens/s")
    ax.set_ylim(bottom=0)


def _kv_cache(ax: Axes, steps: pd.DataFrame, view: WorkerView) -> None:
    ax.set_title("KV-cache use and memory")
    ax.set_ylabel("KV blocks (%)")
    ax.set_ylim(0, 105)
    if steps.empty:
        return
    if int(steps.kv_blocks_total.max()) > 0:
        ax.step(steps.t, 100 * steps.kv_blocks_used / steps.kv_blocks_total, where="post", color=DECODE_COLOR,
                label="in use")
        ax.step(steps.t, 100 * steps.kv_blocks_cached / steps.kv_blocks_total, where="post", color=CACHE_COLOR,
                label="caching a prefix")
        ax.legend(loc="upper left", fontsize="small")
    else:
        ax.text(0.5, 0.8, "no KV cache (embedding model)", ha="center", transform=ax.transAxes, color="gray")
    memory, label = (steps.device_mem_bytes, "GPU memory (GiB)") if view.on_gpu else (steps.rss_bytes, "RSS (GiB)")
    twin = ax.twinx()
    twin.plot(steps.t, memory / GIB, color=MEMORY_COLOR, lw=1, ls="--")
    twin.set_ylabel(label, color=MEMORY_COLOR)
    twin.set_ylim(0, max(float(memory.max()) / GIB * 1.2, 0.1))


def _prefix_cache(ax: Axes, steps: pd.DataFrame) -> None:
    ax.set_title("Prefix cache hit rate (prompt tokens not computed)")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(0, 105)
    if steps.empty:
        return
    if not steps.prefix_cache_queries.any():
        ax.text(0.5, 0.5, "no prefix-cache lookups", ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    rates = prefix_hit_rate(steps)
    ax.step(rates.index, 100 * rates.hit_rate, where="post", color=CACHE_COLOR, label="per interval")
    ax.plot(rates.index, 100 * rates.cumulative, color=MEMORY_COLOR, lw=1, ls="--", label="since start")
    ax.legend(loc="lower right", fontsize="small")


def _queue(ax: Axes, steps: pd.DataFrame) -> None:
    ax.set_title("Queue depth")
    if not steps.empty:
        ax.step(steps.t, steps.num_waiting, where="post", color=PREFILL_COLOR, label="waiting")
        ax.step(steps.t, steps.num_running, where="post", color=DECODE_COLOR, label="running", alpha=0.6)
        ax.legend(loc="upper right", fontsize="small")
    ax.set_ylabel("requests")
    ax.set_ylim(bottom=0)
