"""Refuse, with advice, to start a worker from a script's top level where spawn would start it again in the child.

Python's spawn start method re-runs the parent's main module in the child (as `__mp_main__`) before calling the
worker's entry point. A script that starts a worker outside `if __name__ == "__main__":` would start another one
there; multiprocessing stops that with a bootstrapping RuntimeError, and the parent saw only "exited before it
was ready (exit code 1)". We find the case in the parent before spawning, and in the child should that miss it.
"""

from __future__ import annotations

import ast
import multiprocessing as mp
import os
import sys
from pathlib import Path

from toolkit.errors import WorkerStartupError

ADVICE = (
    'start the model worker under `if __name__ == "__main__":` (or in a function called from there): Python\'s '
    "spawn start method re-runs the main module in the worker process, which would start a worker again"
)


def check_main_guard() -> None:
    """WorkerStartupError if starting a worker from here would happen again inside the spawned child."""
    if getattr(mp.current_process(), "_inheriting", False):  # we are that child, re-running the main module
        raise WorkerStartupError(f"a model worker was started while a worker process was starting: {ADVICE}")
    path = rerun_main_path()
    line = _main_module_line()
    if path is None or line is None:
        return
    try:
        guarded = is_guarded(Path(path).read_text(), line)
    except (OSError, SyntaxError, ValueError):
        return  # no readable source: let the start go ahead; the child-side check above still speaks
    if not guarded:
        raise WorkerStartupError(f"{path}, line {line}, starts a model worker when the module is imported: {ADVICE}")


def rerun_main_path() -> str | None:
    """The file that spawn re-runs in the child, decided as `multiprocessing.spawn` decides it; None if none."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:  # `python -m pkg.mod`: re-imported by name, unless it is a package's __main__
        return None if name == "__main__" or name.endswith(".__main__") else path
    if path is None or os.path.splitext(os.path.basename(path))[0] == "ipython":
        return None
    return path


def _main_module_line() -> int | None:
    """The line the main module's top-level code is running now, if this call comes from it (any depth)."""
    main = sys.modules.get("__main__")
    frame = sys._getframe(1)
    line = None
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is getattr(main, "__dict__", None):
            line = frame.f_lineno
        frame = frame.f_back
    return line


def is_guarded(source: str, line: int) -> bool:
    """Whether `line` of a module lies inside an `if` that tests `__name__` (the main guard, either way round)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and node.lineno <= line <= (node.end_lineno or node.lineno):
            if any(isinstance(n, ast.Name) and n.id == "__name__" for n in ast.walk(node.test)):
                return True
    return False
