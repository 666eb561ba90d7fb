"""The API server over a pool of two tiny-model replicas on a local Ray (`python -m toolkit serve --replicas 2`),
driven with the real `openai` client. One module-scoped server; the tests that kill things come last.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from tests.test_api import ROOT, RemoteServer

pytest.importorskip("ray")

CHAT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    started = RemoteServer("--replicas", "2", "--threads-per-replica", "1", "--metrics-interval-s", "0.1",
                           startup_s=240)
    try:
        yield started.wait_ready()
    finally:
        started.stop()


def replica_pids(body: dict[str, Any]) -> list[int]:
    return [r["pid"] for r in body["replicas"]]


@pytest.mark.timeout(300)
def test_health_lists_both_replicas(server: RemoteServer) -> None:
    status, body = server.health()
    assert status == 200 and body["status"] == "ok" and body["state"] == "ready"
    assert [r["replica"] for r in body["replicas"]] == [0, 1]
    assert all(r["alive"] for r in body["replicas"]) and body["replicas_serving"] == 2
    pids = replica_pids(body)
    assert len(set(pids)) == 2 and server.proc.pid not in pids  # two actor processes, not the server's


@pytest.mark.timeout(120)
def test_chat_and_streamed_completion_through_the_pool(server: RemoteServer) -> None:
    client = server.client()
    chat = client.chat.completions.create(model="tiny-random-llama", messages=CHAT, max_tokens=5,
                                          temperature=0.0, extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 5
    whole = client.completions.create(model="tiny-random-llama", prompt="Once upon", max_tokens=6, temperature=0.0)
    chunks = list(client.completions.create(model="tiny-random-llama", prompt="Once upon", max_tokens=6,
                                            temperature=0.0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason]
    submitted = [r["submitted"] for r in server.health()[1]["replicas"]]
    assert sum(submitted) >= 3 and all(n >= 1 for n in submitted)  # least-outstanding spread them


@pytest.mark.timeout(60)
def test_metrics_name_each_replica(server: RemoteServer) -> None:
    import httpx

    text = httpx.get(server.url + "/metrics", timeout=30).text
    assert 'toolkit:replica_up{model_name="tiny-random-llama",replica="0"} 1.0' in text
    assert 'toolkit:replica_up{model_name="tiny-random-llama",replica="1"} 1.0' in text
    assert 'toolkit:worker_up{model_name="tiny-random-llama"} 1.0' in text


# ---- faults (kill things: keep them last) ----------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_dead_replica_degrades_health_and_only_it_is_restarted(server: RemoteServer) -> None:
    before = server.health()[1]
    victim, survivor = replica_pids(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (seen := server.health())[1]["replicas"][0]["alive"]:  # until the pool has noticed
        assert time.monotonic() < deadline, "replica 0 still alive 30 s after its SIGKILL"
        time.sleep(0.05)
    status, degraded = seen  # dead, or restarting: either way the pool still serves on replica 1
    assert status == 200 and degraded["status"] == "degraded" and "replica 0" in degraded["reason"]
    assert degraded["replicas"][1]["alive"] and len(degraded["replicas"]) == 2
    out = server.client().chat.completions.create(model="tiny-random-llama", messages=CHAT, max_tokens=3)
    assert out.choices[0].finish_reason in ("length", "stop")  # served meanwhile, by replica 1 or the new 0
    back = server.wait_health(lambda s, b: s == 200 and b["status"] == "ok" and b["replicas"][0]["restarts"] == 1,
                              120)
    assert replica_pids(back)[1] == survivor and replica_pids(back)[0] != victim
    assert back["replicas"][1]["restarts"] == 0


@pytest.mark.timeout(120)
def test_sigterm_stops_the_pool_and_its_ray(server: RemoteServer) -> None:
    family = psutil.Process(server.proc.pid).children(recursive=True)
    names = {p.name() for p in family}
    assert {"gcs_server", "raylet"} <= names  # the pool started a private Ray under the server
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.output()
    deadline = time.monotonic() + 30
    while (left := [p for p in family if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"still running after shutdown: {[(p.pid, p.name()) for p in left]}"


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.timeout(120)
def test_pool_flags_are_checked_before_anything_starts() -> None:
    for args, message in ((["--replicas", "2", "--engine", "inprocess"], "does not go with --engine inprocess"),
                          (["--ray-address", "auto"], "need --replicas"), (["--replicas", "0"], "at least 1")):
        out = subprocess.run([sys.executable, "-m", "toolkit", "serve", "--model", "tiny-random-llama", *args],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                             timeout=100)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
