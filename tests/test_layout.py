"""The layout keeps its promises: pure-Python parts import without torch, and the parent side without the engine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PURE_PYTHON = ["toolkit.engine.scheduler", "toolkit.engine.block_manager", "toolkit.engine.request",
               "toolkit.embeddings.scheduler", "toolkit.models.registry", "toolkit.validation"]
PARENT_SIDE = ["toolkit", "toolkit.pipeline", "toolkit.worker.client", "toolkit.telemetry"]
WORKER_SIDE = ["toolkit.engine.core", "toolkit.engine.runner", "toolkit.layers.attention", "toolkit.layers.linear",
               "toolkit.embeddings.engine", "torch"]


def imported_after(modules: list[str]) -> set[str]:
    """Import `modules` in a fresh interpreter and return every module it then holds."""
    code = (f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(list(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("module", PURE_PYTHON)
def test_pure_python_parts_do_not_import_torch(module: str) -> None:
    loaded = imported_after([module])
    assert module in loaded and "torch" not in loaded


def test_parent_side_does_not_import_the_engine() -> None:
    loaded = imported_after(PARENT_SIDE)
    assert set(PARENT_SIDE) <= loaded
    assert not loaded & set(WORKER_SIDE), sorted(loaded & set(WORKER_SIDE))
    assert "ray" not in loaded  # only worker pools need Ray: toolkit.start_worker_pool imports it on first use
