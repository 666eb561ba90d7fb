"""Dashboard: live matplotlib panels of a worker's telemetry, refreshed from one thread through a display handle.

The refresh thread only redraws when new steps arrived, renders to PNG off pyplot, and updates one display
handle (`update_display_data`), so the live figure stays in the cell that started it.
"""

from __future__ import annotations

import threading
from pathlib import Path

from IPython.display import DisplayHandle, Image, display
from matplotlib.figure import Figure

from toolkit.worker.client import ModelWorker

from . import panels
from .kernel import adopt_parent, current_parent, in_kernel, show_figures_as_png


class Dashboard:
    """Batch occupancy, tokens/s, queue depth, KV-cache use and prefix-cache hit rate of `worker`, live.

    `Dashboard(worker).start()` (or just displaying it) shows the panels and refreshes them every `interval_s`
    while the worker runs; `stop()` ends that; `snapshot()` and `save(path)` give static copies. `worker` may be a
    WorkerPool: occupancy is then drawn per replica, and a status line marks a dead replica and when it died (a
    death redraws the panels even when no step follows it).
    """

    def __init__(self, worker: ModelWorker, *, interval_s: float = 0.5, window_s: float | None = None) -> None:
        self.worker = worker
        self.interval_s = interval_s
        self.window_s = window_s
        self.frames = 0  # live frames rendered: how often the display was refreshed
        self._read_view()  # raises WorkerNotRunningError before the worker has started
        self._figure = panels.new_figure()
        self._handle: DisplayHandle | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._drawn: tuple[object, ...] | None = None  # _mark() of the last live frame

    # ---- live ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Dashboard:
        """Show the panels (inside a kernel) and refresh them from a background thread until stop()."""
        if self.running:
            return self
        self._stop.clear()
        png = self._render()
        if in_kernel():
            self._handle = display(Image(data=png, format="png"), display_id=True)
        self._thread = threading.Thread(
            target=self._loop, args=(current_parent(),), name="toolkit-dashboard", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop refreshing, after one last frame with everything logged so far."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10 * self.interval_s + 5)
            self._thread = None
        self.refresh()

    def refresh(self, *, force: bool = True) -> bool:
        """Redraw the live panels now; with force=False only if steps arrived (or a replica changed) since the last
        frame."""
        if not force and self._mark(self._replicas()) == self._drawn:
            return False  # checked without building the steps DataFrame, which an idle tick would waste
        png = self._render()
        if self._handle is not None:
            self._handle.update(Image(data=png, format="png"))
        return True

    def _loop(self, parent: object) -> None:
        with adopt_parent(parent):
            while not self._stop.wait(self.interval_s):
                self.refresh(force=False)
                if not self.worker.is_alive():
                    return

    def _render(self) -> bytes:
        with self._lock:
            replicas = self._replicas()
            self._drawn = self._mark(replicas)  # before reading: a step in between only redraws again
            panels.draw(self._figure, self.worker.metrics.steps(), self._read_view(), self.window_s, replicas)
            self.frames += 1
            return panels.render_png(self._figure)

    # ---- static copies ------------------------------------------------------------------------

    def snapshot(self) -> Figure:
        """A new static figure of everything logged so far (renders as PNG when a cell returns it)."""
        show_figures_as_png()
        fig = panels.new_figure()
        return panels.draw(fig, self.worker.metrics.steps(), self._read_view(), self.window_s, self._replicas())

    def save(self, path: str | Path) -> Path:
        """Write snapshot() as a PNG file; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.snapshot().savefig(path, format="png")
        return path

    def _replicas(self) -> list[panels.ReplicaStatus]:
        """A pool's replicas as its health() reports them; none for a single worker."""
        health = getattr(self.worker, "health", None)
        return panels.replica_statuses(health()) if health is not None else []

    def _mark(self, replicas: list[panels.ReplicaStatus]) -> tuple[object, ...]:
        """What a frame shows: new steps, or a replica that died or came back, call for a new one."""
        return (self.worker.metrics.steps_mark(), tuple((r.state, r.died_at) for r in replicas))

    def _read_view(self) -> panels.WorkerView:
        """Model and device from the worker's Ready message (`info` keeps it after the worker has stopped)."""
        info = self.worker.info
        return panels.WorkerView(info.model, info.device, self.worker.settings.max_batch_size)

    # ---- notebook protocol --------------------------------------------------------------------

    def _ipython_display_(self) -> None:
        self.start()

    def __enter__(self) -> Dashboard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "live" if self.running else "stopped"
        return f"Dashboard({self.worker!r}, {state}, {self.frames} frames)"
