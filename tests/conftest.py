"""Shared fixtures: one tiny-model worker per module, and a check that no test leaves a process behind."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest

from toolkit import ModelWorker, Settings, TokenGeneratorPipeline, start_model_worker

TINY = "tiny-random-llama"
EMBEDDED = "smollm2-135m-instruct"


def tiny_settings(**overrides: object) -> Settings:
    base: dict[str, object] = {"model": TINY, "device": "cpu", "dtype": "float32", "num_threads": 1,
                               "startup_timeout_s": 120.0}
    return Settings(**{**base, **overrides})


@pytest.fixture(scope="module")
def tiny_worker() -> Iterator[ModelWorker]:
    with start_model_worker(tiny_settings()) as worker:
        yield worker


@pytest.fixture(scope="module")
def tiny_pipe(tiny_worker: ModelWorker) -> TokenGeneratorPipeline:
    return TokenGeneratorPipeline(tiny_worker)


@pytest.fixture(autouse=True, scope="session")
def no_orphan_processes() -> Iterator[None]:
    """Fails the run if any child process of the test session is still alive at the end."""
    yield
    me = psutil.Process(os.getpid())
    children = [p for p in me.children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]
    _gone, alive = psutil.wait_procs(children, timeout=10)
    leftovers = [f"{p.pid} {p.name()}" for p in alive]
    for p in alive:
        p.kill()
    assert not leftovers, f"processes left behind by the tests: {leftovers}"
