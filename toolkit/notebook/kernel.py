"""Output from background threads lands in the cell that started them (ipykernel 7 thread parents).

Since ipykernel 7 a thread's output goes to whichever cell runs *now* unless the thread adopts a parent message
(ipykernel#1546). The notebook widgets capture the parent in the cell that starts them and adopt it in their thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def _shell() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        return None
    return get_ipython()


def in_kernel() -> bool:
    """True inside a Jupyter kernel (where display() reaches a frontend), False in plain Python and pytest."""
    shell = _shell()
    return shell is not None and hasattr(shell, "kernel")


def current_parent() -> Any:
    """The message of the cell running now, or None outside a kernel."""
    shell = _shell()
    get_parent = getattr(shell, "get_parent", None)
    return get_parent() if get_parent is not None else None


@contextmanager
def adopt_parent(parent: Any) -> Iterator[None]:
    """Make the calling thread's output belong to `parent`'s cell; a no-op before ipykernel 7 or outside a kernel."""
    shell = _shell()
    set_thread_parent = getattr(shell, "set_thread_parent", None)
    if parent is None or set_thread_parent is None:
        yield
        return
    tokens = set_thread_parent(parent)
    try:
        yield
    finally:
        shell.reset_thread_parent(tokens)


def show_figures_as_png() -> None:
    """Let a plain matplotlib Figure returned by a cell render as PNG, as it does once pyplot is imported."""
    shell = _shell()
    if shell is None or not hasattr(shell, "display_formatter"):
        return
    from IPython.core.pylabtools import select_figure_formats

    select_figure_formats(shell, {"png"})
