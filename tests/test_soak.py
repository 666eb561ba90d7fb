"""Soak (`make soak`): ten minutes of mixed load, random cancels, and a SIGKILL + restart of the worker every minute.

Every minute the load pauses once to check that the idle worker holds no KV blocks and to sample its RSS; then
load resumes and the worker is killed under it. Only the errors a crash explains may appear. TOOLKIT_SOAK_S
shortens the run (whole minutes).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import pytest

from tests.conftest import tiny_settings
from tests.test_faults import settled_blocks, wait_until
from toolkit import ModelWorker, TokenGeneratorPipeline, ToolkitError, WorkerCrashedError, WorkerState
from toolkit.errors import WorkerNotRunningError

SOAK_S = float(os.environ.get("TOOLKIT_SOAK_S", "600"))
pytestmark = [pytest.mark.soak, pytest.mark.timeout(SOAK_S + 600)]
MINUTE_S = 60.0
CLIENTS = 6
EXPECTED_ERRORS = {WorkerCrashedError.__name__, WorkerNotRunningError.__name__}  # in flight at a kill / mid-restart
PROMPTS = ["Tell me about the sea", "List three colours", "What is two plus two?", "Write a haiku about rain"]
MAX_NEW = 48


@dataclass(slots=True)
class Tally:
    """What the clients saw, under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    finished: Counter[str] = field(default_factory=Counter)  # by finish_reason
    errors: Counter[str] = field(default_factory=Counter)  # by error type
    wrong: list[str] = field(default_factory=list)  # outputs that disagree with the reference
    active: int = 0  # clients inside an action right now

    def add(self, counter: Counter[str], key: str) -> None:
        with self.lock:
            counter[key] += 1


class Load:
    """CLIENTS threads that each loop over random actions while `running` is set."""

    def __init__(self, pipe: TokenGeneratorPipeline, reference: dict[str, list[int]]) -> None:
        self.pipe = pipe
        self.reference = reference
        self.tally = Tally()
        self.running = threading.Event()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        actions: list[Callable[[random.Random], None]] = [self.greedy, self.sampled, self.cancelled, self.batch,
                                                          self.chat, self.async_stream]
        while not self.stop.is_set():
            if not self.running.wait(timeout=0.5):
                continue
            with self.tally.lock:
                self.tally.active += 1
            try:
                rng.choice(actions)(rng)
            except ToolkitError as exc:
                self.tally.add(self.tally.errors, type(exc).__name__)
                time.sleep(0.2)  # the worker is down: do not spin
            except Exception as exc:  # anything else is a bug: record it as an unexpected error type
                self.tally.add(self.tally.errors, f"{type(exc).__name__}: {exc}")
            finally:
                with self.tally.lock:
                    self.tally.active -= 1

    def check(self, prompt: str, n: int, tokens: list[int]) -> None:
        if tokens != self.reference[prompt][:n]:
            with self.tally.lock:
                self.tally.wrong.append(f"{prompt!r}[:{n}]: {tokens}")

    def greedy(self, rng: random.Random) -> None:
        prompt, n = rng.choice(PROMPTS), rng.randint(1, MAX_NEW)
        out = self.pipe.generate(prompt, max_new_tokens=n, ignore_eos=True)
        self.check(prompt, n, out.token_ids)
        self.tally.add(self.tally.finished, out.finish_reason or "none")

    def sampled(self, rng: random.Random) -> None:
        out = self.pipe.generate(rng.choice(PROMPTS), max_new_tokens=rng.randint(1, MAX_NEW), temperature=0.8,
                                 top_p=0.9, top_k=50, seed=rng.randrange(2**31), stop=["\n", "."])
        self.tally.add(self.tally.finished, out.finish_reason or "none")

    def cancelled(self, rng: random.Random) -> None:
        cut = rng.randint(0, 20)
        with self.pipe.stream(rng.choice(PROMPTS), max_new_tokens=200, ignore_eos=True) as stream:
            for i, _ in enumerate(stream):
                if i >= cut:
                    break
        self.tally.add(self.tally.finished, stream.finish_reason or "none")

    def batch(self, rng: random.Random) -> None:
        prompts = [rng.choice(PROMPTS) for _ in range(rng.randint(2, 8))]
        n = rng.randint(1, MAX_NEW)
        outs = self.pipe.generate_batch(prompts, max_new_tokens=n, ignore_eos=True, progress=False)
        for prompt, out in zip(prompts, outs, strict=True):
            self.check(prompt, n, out.token_ids)
            self.tally.add(self.tally.finished, out.finish_reason or "none")

    def chat(self, rng: random.Random) -> None:
        messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
        out = self.pipe.generate(messages, max_new_tokens=rng.randint(1, MAX_NEW))
        self.tally.add(self.tally.finished, out.finish_reason or "none")

    def async_stream(self, rng: random.Random) -> None:
        async def consume() -> None:
            async for chunk in self.pipe.astream(rng.choice(PROMPTS), max_new_tokens=rng.randint(1, MAX_NEW)):
                if chunk.finish_reason:
                    self.tally.add(self.tally.finished, chunk.finish_reason)

        asyncio.run(consume())

    def pause(self) -> None:
        self.running.clear()
        wait_until(lambda: self.tally.active == 0, 60, "the clients to finish their current call")


def rss(pid: int | None) -> int:
    return psutil.Process(pid).memory_info().rss


def test_soak(capsys: pytest.CaptureFixture[str]) -> None:
    settings = tiny_settings(num_kv_blocks=96, max_batch_size=16, hang_timeout_s=30.0)
    worker = ModelWorker(settings).start()
    try:
        pipe = TokenGeneratorPipeline(worker)
        reference = {p: pipe.generate(p, max_new_tokens=MAX_NEW, ignore_eos=True).token_ids for p in PROMPTS}
        load = Load(pipe, reference)
        for t in load.threads:
            t.start()
        report = run_minutes(worker, load, max(1, round(SOAK_S / MINUTE_S)))
        load.stop.set()
        for t in load.threads:
            t.join(timeout=60)
    finally:
        worker.shutdown()
    with capsys.disabled():
        print("\nsoak report:", json.dumps(report, indent=1))
    assert not [t for t in load.threads if t.is_alive()]
    assert set(report["errors"]) <= EXPECTED_ERRORS, report["errors"]
    assert not load.tally.wrong, load.tally.wrong[:5]
    assert report["leaked_blocks"] == [0] * len(report["leaked_blocks"])
    assert report["worker_rss_end"] <= 1.10 * report["worker_rss_start"]
    assert report["completed"] > 0 and report["restarts"] == len(report["leaked_blocks"])


def run_minutes(worker: ModelWorker, load: Load, minutes: int) -> dict[str, object]:
    """Each minute: load, pause, check blocks and RSS, resume, SIGKILL under load, restart."""
    leaked: list[int] = []
    worker_rss: list[int] = []
    parent_rss = [rss(os.getpid())]
    started = time.monotonic()
    for minute in range(minutes):
        load.running.set()
        time.sleep(max(0.0, started + (minute + 1) * MINUTE_S - 8 - time.monotonic()))
        load.pause()
        leaked.append(settled_blocks(worker))
        worker_rss.append(rss(worker.pid))
        load.running.set()
        time.sleep(2)
        os.kill(worker.pid or 0, signal.SIGKILL)
        wait_until(lambda: worker.state is WorkerState.FAILED, 5, "the I/O thread to notice the crash")
        worker.restart()
    load.pause()
    parent_rss.append(rss(os.getpid()))
    tally = load.tally
    return {
        "minutes": minutes,
        "wall_s": round(time.monotonic() - started, 1),
        "completed": sum(n for reason, n in tally.finished.items() if reason != "cancelled"),
        "finished_by_reason": dict(tally.finished),
        "errors": dict(tally.errors),
        "wrong_outputs": len(tally.wrong),
        "restarts": worker.restarts,
        "leaked_blocks": leaked,
        "worker_rss_mib": [round(r / 2**20, 1) for r in worker_rss],
        "worker_rss_start": worker_rss[0],
        "worker_rss_end": worker_rss[-1],
        "parent_rss_mib_start_end": [round(r / 2**20, 1) for r in parent_rss],
    }
