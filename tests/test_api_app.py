"""The app's error mapping and health reasons over a scripted handle (no worker process): every failure a worker can
report reaches the client as the status and OpenAI error shape the `openai` client expects."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from toolkit import models
from toolkit.api import create_app
from toolkit.errors import QueueFullError, WorkerCrashedError, WorkerHungError, WorkerNotRunningError
from toolkit.settings import Settings
from toolkit.telemetry.metrics import MetricsLog
from toolkit.worker import messages as m


class ScriptedWorker:
    """The handle interface the app uses; submit() raises `error` when set, and health() is whatever a test says."""

    def __init__(self, tokenizer_dir: str) -> None:
        self.settings = Settings(model="tiny-random-llama", device="cpu", dtype="float32")
        self.metrics = MetricsLog()
        self.info = m.Ready(pid=1, model="tiny-random-llama", task="generate", device="cpu", dtype="float32",
                            num_kv_blocks=64, block_size=16, max_model_len=256, vocab_size=49152, eos_token_ids=[2],
                            load_time_s=0.0, tokenizer_dir=tokenizer_dir)
        self.error: BaseException | None = None
        self.state = "ready"
        self.hung = False
        self.cancelled: list[str] = []

    def health(self) -> dict[str, Any]:
        alive = self.state == "ready"
        return {"state": self.state, "alive": alive, "pid": 1, "heartbeat_age_s": 0.1, "in_flight": 0,
                "hung": self.hung, "busy": False, "kv_blocks_used": 0, "restarts": 0}

    def submit(self, request: Any, sink: Any) -> None:
        if self.error is not None:
            raise self.error
        sink.put(m.RequestFailed(request.request_id, "ValueError", "boom in the worker"))

    def cancel(self, request_ids: list[str]) -> None:
        self.cancelled += request_ids


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tokenizer")
    models.load_tokenizer("tiny-random-llama").save_pretrained(path)
    return str(path)


@pytest.fixture
def worker(tokenizer_dir: str) -> ScriptedWorker:
    return ScriptedWorker(tokenizer_dir)


def _chat(client: TestClient, **kw: Any) -> Any:
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2, **kw})


@pytest.mark.parametrize(("error", "status", "kind"), [
    (QueueFullError("full"), 429, "rate_limit_error"),
    (WorkerCrashedError("died", -9), 503, "service_unavailable"),
    (WorkerHungError("silent"), 503, "service_unavailable"),
    (WorkerNotRunningError("stopped"), 503, "service_unavailable"),
])
def test_worker_errors_map_to_status_and_shape(worker: ScriptedWorker, error: Exception, status: int,
                                               kind: str) -> None:
    worker.error = error
    response = _chat(TestClient(create_app(worker)))
    assert response.status_code == status
    assert response.json()["error"]["type"] == kind and response.headers["retry-after"] == "1"


def test_a_failure_inside_the_worker_is_a_500_with_its_type(worker: ScriptedWorker) -> None:
    response = _chat(TestClient(create_app(worker)))
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "ValueError" and "boom" in response.json()["error"]["message"]


def test_a_failure_after_the_stream_started_is_an_error_event_then_done(worker: ScriptedWorker) -> None:
    with TestClient(create_app(worker)) as client:
        events = [line for line in _chat(client, stream=True).text.splitlines() if line]
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2] and "boom" in events[-2]
    assert '"role": "assistant"' in events[0]


@pytest.mark.parametrize(("state", "hung", "reason"), [
    ("failed", False, "crashed"), ("starting", False, "starting"), ("stopped", False, "stopped"),
    ("ready", True, "hung"),
])
def test_health_says_why_it_is_unavailable(worker: ScriptedWorker, state: str, hung: bool, reason: str) -> None:
    worker.state, worker.hung = state, hung
    response = TestClient(create_app(worker)).get("/health")
    assert response.status_code == 503 and reason in response.json()["reason"]


def test_cors_only_when_asked(worker: ScriptedWorker) -> None:
    preflight = {"Origin": "http://notebook.local", "Access-Control-Request-Method": "POST"}
    closed = TestClient(create_app(worker)).options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    opened = TestClient(create_app(worker, allow_origins=["http://notebook.local"])).options(
        "/v1/chat/completions", headers=preflight)
    assert opened.headers["access-control-allow-origin"] == "http://notebook.local"


def test_a_chunked_body_over_the_limit_is_413(worker: ScriptedWorker) -> None:
    from toolkit.api import Limits

    client = TestClient(create_app(worker, limits=Limits(max_body_bytes=1000)))
    chunks = (b"x" * 400 for _ in range(5))  # no Content-Length: the limit is counted as the body arrives
    response = client.post("/v1/completions", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_tokenizer_is_loaded_before_the_first_request(worker: ScriptedWorker) -> None:
    app = create_app(worker)
    assert app.state.toolkit._pipe is not None and Path(worker.info.tokenizer_dir).is_dir()


class ScriptedPool(ScriptedWorker):
    """A pool's health(): one entry per replica (state, alive, hung, died) and the overall state WorkerPool reports."""

    def __init__(self, tokenizer_dir: str, states: list[str]) -> None:
        super().__init__(tokenizer_dir)
        self.states = states
        self.restarted: list[int | None] = []

    def health(self) -> dict[str, Any]:
        replicas = [{"replica": i, "state": s, "alive": s == "ready", "hung": False, "pid": 10 + i, "in_flight": 0,
                     "busy": False, "kv_blocks_used": 0, "restarts": 0, "died": "killed" if s == "failed" else None}
                    for i, s in enumerate(self.states)]
        serving = sum(r["alive"] for r in replicas)
        state = ("degraded" if serving < len(replicas) else "ready") if serving else (
            "failed" if "failed" in self.states else "starting")
        return {"state": state, "alive": serving > 0, "replicas_serving": serving, "pid": 10, "in_flight": 0,
                "hung": False, "busy": False, "kv_blocks_used": 0, "restarts": 0, "replicas": replicas}

    def restart(self, replica: int | None = None) -> ScriptedPool:
        self.restarted.append(replica)
        if replica is not None:
            self.states[replica] = "ready"
        return self


def test_a_degraded_pool_is_healthy_and_lists_its_replicas(tokenizer_dir: str) -> None:
    pool = ScriptedPool(tokenizer_dir, ["failed", "ready"])
    response = TestClient(create_app(pool)).get("/health")
    body = response.json()
    assert response.status_code == 200 and body["status"] == "degraded" and body["state"] == "degraded"
    assert "replica 0: model worker crashed: killed" in body["reason"]
    assert [r["alive"] for r in body["replicas"]] == [False, True]


@pytest.mark.parametrize(("states", "reason"), [
    (["failed", "failed"], "crashed"), (["starting", "failed"], "starting"),
])
def test_a_pool_with_no_replica_serving_is_503(tokenizer_dir: str, states: list[str], reason: str) -> None:
    response = TestClient(create_app(ScriptedPool(tokenizer_dir, states))).get("/health")
    body = response.json()
    assert response.status_code == 503 and body["reason"].startswith("no replica of the pool is serving")
    assert reason in body["reason"] and len(body["replicas"]) == 2


@pytest.mark.timeout(30)
def test_restart_on_crash_restarts_only_the_dead_replicas(tokenizer_dir: str) -> None:
    from toolkit.api.server import CrashWatcher

    pool = ScriptedPool(tokenizer_dir, ["ready", "failed", "ready", "failed"])
    watcher = CrashWatcher(pool, interval_s=0.01).start()
    try:
        deadline = time.monotonic() + 10
        while pool.states != ["ready"] * 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        watcher.stop()
    assert pool.restarted == [1, 3]
