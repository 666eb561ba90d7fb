"""Dashboard: live matplotlib panels of a worker's telemetry, refreshed from one thread through a display handle.

The refresh thread only redraws when new steps arrived, renders to PNG off pyplot, and updates one display
handle (`update_display_data`), so the live figure stays in the cell that started it.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pandas as pd
from IPython.display import DisplayHandle, Image, display
from matplotlib.figure import Figure

from ..errors import ToolkitError
from ..worker import ModelWorker
from . import panels
from .kernel import adopt_parent, current_parent, in_kernel, show_figures_as_png


class Dashboard:
    """Batch occupancy, prefill/decode tokens/s, KV-cache use and queue depth of `worker`, live in a notebook.

    `Dashboard(worker).start()` (or just displaying it) shows the panels and refreshes them every `interval_s`
    while the worker runs; `stop()` ends that; `snapshot()` and `save(path)` give static copies.
    """

    def __init__(self, worker: ModelWorker, *, interval_s: float = 0.5, window_s: float | None = None) -> None:
        self.worker = worker
        self.interval_s = interval_s
        self.window_s = window_s
        self.frames = 0  # live frames rendered: how often the display was refreshed
        self._view = self._read_view(None)
        self._figure = panels.new_figure()
        self._handle: DisplayHandle | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._drawn: tuple[int, float] | None = None

    # ---- live ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Dashboard:
        """Show the panels (inside a kernel) and refresh them from a background thread until stop()."""
        if self.running:
            return self
        self._stop.clear()
        png = self._render(self.worker.metrics.steps())
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
        """Redraw the live panels now; with force=False only if steps arrived since the last frame."""
        steps = self.worker.metrics.steps()
        key = (len(steps), float(steps.t.iloc[-1]) if len(steps) else 0.0)
        if not force and key == self._drawn:
            return False
        png = self._render(steps)
        if self._handle is not None:
            self._handle.update(Image(data=png, format="png"))
        return True

    def _loop(self, parent: object) -> None:
        with adopt_parent(parent):
            while not self._stop.wait(self.interval_s):
                self.refresh(force=False)
                if not self.worker.is_alive():
                    return

    def _render(self, steps: pd.DataFrame) -> bytes:
        with self._lock:
            panels.draw(self._figure, steps, self._read_view(self._view), self.window_s)
            self.frames += 1
            self._drawn = (len(steps), float(steps.t.iloc[-1]) if len(steps) else 0.0)
            return panels.render_png(self._figure)

    # ---- static copies ------------------------------------------------------------------------

    def snapshot(self) -> Figure:
        """A new static figure of everything logged so far (renders as PNG when a cell returns it)."""
        show_figures_as_png()
        fig = panels.new_figure()
        return panels.draw(fig, self.worker.metrics.steps(), self._read_view(self._view), self.window_s)

    def save(self, path: str | Path) -> Path:
        """Write snapshot() as a PNG file; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.snapshot().savefig(path, format="png")
        return path

    def _read_view(self, fallback: panels.WorkerView | None) -> panels.WorkerView:
        """Model and device from the worker's Ready message; the last known ones once it has stopped."""
        try:
            info = self.worker.info
        except ToolkitError:
            if fallback is None:
                raise
            return fallback
        self._view = panels.WorkerView(info.model, info.device, self.worker.settings.max_batch_size)
        return self._view

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
