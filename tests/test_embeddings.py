"""The embedding engine reproduces sentence-transformers' encode; its scheduler batches by count and padded tokens."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import numpy as np
import pytest

from toolkit import models
from toolkit.embeddings.engine import EmbeddingRecipe, EmbeddingsEngine
from toolkit.embeddings.scheduler import EmbeddingsScheduler
from toolkit.errors import ModelNotFoundError
from toolkit.settings import Settings
from toolkit.telemetry.metrics import MetricsLog
from toolkit.worker.messages import EmbedRequest, EmbedResult, FromWorker, Metrics, Ready

pytestmark = pytest.mark.timeout(180)

TEXTS = [
    "",
    "   ",
    "a",
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "日本語のテキストと emoji 🙂🙃",
    "def f(x):\n    return x * 2\n",
    "UPPER lower MiXeD 12345 3.14159",
    "Paris is the capital and most populous city of France. " * 3,
    "word " * 400,  # longer than max_seq_length (256): truncated like sentence-transformers
]


def _settings(**overrides: object) -> Settings:
    base: dict[str, object] = {"model": models.EMBED_MODEL, "device": "cpu", "dtype": "float32", "num_threads": 1}
    return Settings(**{**base, **overrides})


def _run(engine: EmbeddingsEngine, requests: list[EmbedRequest]) -> tuple[dict[str, np.ndarray], list[int]]:
    """Every request to completion; the vectors by request id and the batch size of each step."""
    for request in requests:
        engine.add(request)
    results: list[EmbedResult] = []
    sizes = []
    while engine.has_work:
        step_results, metrics = engine.step()
        results += step_results
        sizes.append(metrics.batch_size)
    return {r.request_id: np.frombuffer(r.vectors, np.float32).reshape(r.shape) for r in results}, sizes


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def loaded() -> tuple:
    return models.load(models.EMBED_MODEL)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(models.resolve(models.EMBED_MODEL).source, device="cpu").encode(TEXTS)


def _engine(loaded: tuple, **overrides: object) -> EmbeddingsEngine:
    return EmbeddingsEngine(_settings(**overrides), model=loaded[0], tokenizer=loaded[1])


# ---- scheduler ------------------------------------------------------------------------------------------


def _drain(scheduler: EmbeddingsScheduler) -> list[list[tuple[str, int]]]:
    steps = []
    while scheduler.has_work:
        items = scheduler.schedule()
        steps.append([(item.request_id, item.index) for item in items])
        scheduler.complete(items)
    return steps


def test_scheduler_splits_by_count_and_keeps_order() -> None:
    scheduler = EmbeddingsScheduler(max_batch_size=3, max_batch_tokens=10_000)
    scheduler.add("a", [5, 5, 5, 5])
    scheduler.add("b", [5, 5])
    assert _drain(scheduler) == [[("a", 0), ("a", 1), ("a", 2)], [("a", 3), ("b", 0), ("b", 1)]]


def test_scheduler_budget_counts_padded_tokens() -> None:
    scheduler = EmbeddingsScheduler(max_batch_size=32, max_batch_tokens=100)
    scheduler.add("a", [10, 10, 10, 60, 10])
    # 3 x 10 fits; adding the 60 would pad 4 rows to 60 = 240 > 100; the 60 alone fits, then 60 + 10 pads to 120.
    assert _drain(scheduler) == [[("a", 0), ("a", 1), ("a", 2)], [("a", 3)], [("a", 4)]]


def test_scheduler_runs_an_oversize_text_alone() -> None:
    scheduler = EmbeddingsScheduler(max_batch_size=8, max_batch_tokens=16)
    scheduler.add("a", [4, 300, 4])
    assert _drain(scheduler) == [[("a", 0)], [("a", 1)], [("a", 2)]]


def test_scheduler_finishes_jobs_in_order_and_cancels() -> None:
    scheduler = EmbeddingsScheduler(max_batch_size=2, max_batch_tokens=1000)
    scheduler.add("a", [1, 1, 1])
    scheduler.add("b", [1])
    scheduler.add("c", [1])
    assert [job.request_id for job in scheduler.complete(scheduler.schedule())] == []
    assert scheduler.cancel("b") is not None and scheduler.cancel("b") is None
    assert [job.request_id for job in scheduler.complete(scheduler.schedule())] == ["a", "c"]
    assert not scheduler.has_work


# ---- engine ---------------------------------------------------------------------------------------------


def test_matches_sentence_transformers_encode(loaded: tuple, reference: np.ndarray) -> None:
    vectors, sizes = _run(_engine(loaded, max_batch_size=4), [EmbedRequest("r", TEXTS)])
    assert vectors["r"].shape == reference.shape == (len(TEXTS), 384)
    assert _cosine(vectors["r"], reference).min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(vectors["r"], axis=1), 1.0, atol=1e-5)
    assert sizes == [4, 4, 2]


def test_batching_does_not_change_vectors(loaded: tuple) -> None:
    together, _ = _run(_engine(loaded, max_batch_size=32, max_batch_tokens=100_000), [EmbedRequest("r", TEXTS)])
    one_by_one, sizes = _run(_engine(loaded, max_batch_size=1), [EmbedRequest("r", TEXTS)])
    assert sizes == [1] * len(TEXTS)
    np.testing.assert_allclose(together["r"], one_by_one["r"], atol=1e-5)


def test_requests_share_steps_and_get_their_own_rows(loaded: tuple, reference: np.ndarray) -> None:
    requests = [EmbedRequest("x", TEXTS[:3]), EmbedRequest("y", TEXTS[3:5]), EmbedRequest("z", [])]
    vectors, sizes = _run(_engine(loaded, max_batch_size=4), requests)
    assert sizes == [4, 1]
    assert vectors["z"].shape == (0, 384)
    assert _cosine(np.concatenate([vectors["x"], vectors["y"]]), reference[:5]).min() > 0.9999


def test_a_step_row_names_the_request_of_each_text_and_survives_the_wire(loaded: tuple) -> None:
    """Two requests' texts in one step: the step row says whose texts ran, after msgpack and in MetricsLog."""
    engine = _engine(loaded, max_batch_size=4)
    engine.add(EmbedRequest("x", TEXTS[2:5]))
    engine.add(EmbedRequest("y", TEXTS[2:4]))
    rows = [engine.step()[1], engine.step()[1]]
    assert [row.request_ids for row in rows] == [("x", "x", "x", "y"), ("y",)]
    assert [row.batch_size for row in rows] == [4, 1]
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(Metrics(0.0, False, rows)), type=FromWorker)
    log = MetricsLog()
    log.add(wire)
    assert [tuple(ids) for ids in log.steps().request_ids] == [("x", "x", "x", "y"), ("y",)]


def test_cancel_drops_a_queued_request(loaded: tuple) -> None:
    engine = _engine(loaded, max_batch_size=2)
    engine.add(EmbedRequest("keep", ["a", "b"]))
    engine.add(EmbedRequest("drop", ["c"]))
    deltas = engine.cancel(["drop", "unknown"])
    assert [(d.request_id, d.finish_reason) for d in deltas] == [("drop", "cancelled")]
    results, metrics = engine.step()
    assert [r.request_id for r in results] == ["keep"] and not engine.has_work
    assert (metrics.kind, metrics.batch_size, metrics.prefill_tokens) == ("embed", 2, 6)
    finished = {(r.request_id, r.finish_reason) for r in engine.pop_request_metrics()}
    assert finished == {("keep", "stop"), ("drop", "cancelled")}


def test_a_failed_step_ends_only_the_requests_in_it(loaded: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(loaded, max_batch_size=2)
    engine.add(EmbedRequest("first", ["a", "b"]))
    engine.add(EmbedRequest("next", ["c"]))
    monkeypatch.setattr(engine, "embed_token_ids", lambda batch: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        engine.step()
    assert engine.fail_scheduled() == ["first"]
    monkeypatch.undo()
    results, _ = engine.step()
    assert [r.request_id for r in results] == ["next"] and not engine.has_work
    finished = {(r.request_id, r.finish_reason) for r in engine.pop_request_metrics()}
    assert finished == {("first", "error"), ("next", "stop")}


def test_ready_info_builds_a_ready_message(loaded: tuple) -> None:
    ready = Ready(pid=os.getpid(), load_time_s=0.0, **_engine(loaded).ready_info())
    assert (ready.task, ready.max_model_len, ready.dtype) == ("embed", 256, "float32")


def test_engine_loads_the_model_itself() -> None:
    engine = EmbeddingsEngine(_settings())
    vectors, _ = _run(engine, [EmbedRequest("r", ["Hello world!"])])
    assert vectors["r"].shape == (1, engine.embedding_dim) == (1, 384)


# ---- other sentence-transformers recipes -----------------------------------------------------------------


def _variant(tmp_path: Path, pooling: dict[str, bool], normalize: bool) -> Path:
    """A copy of MiniLM's dir (weights symlinked) with another pooling config."""
    source = Path(models.resolve(models.EMBED_MODEL).source)
    for item in source.iterdir():
        if item.is_file():
            (tmp_path / item.name).symlink_to(item)
    (tmp_path / "1_Pooling").mkdir()
    config = {"word_embedding_dimension": 384, **{f"pooling_mode_{k}": v for k, v in pooling.items()}}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    modules = json.loads((source / "modules.json").read_text())
    (tmp_path / "modules.json").unlink()
    (tmp_path / "modules.json").write_text(json.dumps(modules if normalize else modules[:2]))
    return tmp_path


def test_cls_and_max_pooling_without_normalize_match(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    path = _variant(tmp_path, {"cls_token": True, "max_tokens": True, "mean_tokens": False}, normalize=False)
    reference = SentenceTransformer(str(path), device="cpu").encode(TEXTS[:6])
    engine = EmbeddingsEngine(_settings(model=str(path)))
    vectors, _ = _run(engine, [EmbedRequest("r", TEXTS[:6])])
    assert vectors["r"].shape == reference.shape == (6, 768)
    np.testing.assert_allclose(vectors["r"], reference, atol=1e-4)


def test_unsupported_module_is_refused(tmp_path: Path) -> None:
    (tmp_path / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ModelNotFoundError, match="Dense"):
        EmbeddingRecipe.from_dir(tmp_path, 512)
