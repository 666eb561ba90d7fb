"""The fault table (issue 6): every fault injected, every request ends in a result or a clear error.

Rows already covered elsewhere are not repeated here: queue overflow (test_worker), wrong prompt types, bad
parameters and out-of-vocabulary ids (test_pipeline), unknown model and missing GGUF package (test_worker,
test_models). Most tests share one tiny worker whose KV cache is far too small on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
import torch
import zmq
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from tests.conftest import tiny_settings
from tests.factories import HANG_AFTER_ENV, POISON_TOKEN, SLEEP_ENV, SLIDING_WINDOW, tiny
from toolkit import (
    InvalidRequestError,
    ModelWorker,
    TokenGeneratorPipeline,
    WorkerCrashedError,
    WorkerHungError,
    WorkerStartupError,
    WorkerState,
    start_model_worker,
)
from toolkit.engine.core import Engine, sliding_window
from toolkit.errors import RemoteError
from toolkit.models import build_tiny_llama
from toolkit.telemetry.metrics import MetricsLog
from toolkit.worker import messages as m
from toolkit.worker.client import Sink, _Connection
from toolkit.worker.engine_queue import EngineQueue
from toolkit.worker.main_guard import is_guarded

SMALL_CACHE_BLOCKS = 24  # x 16 tokens = 384: a third of what 8 requests of ~70 tokens need at once
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)  # the tests that inject hangs must not wait on them forever


@pytest.fixture(scope="module")
def worker() -> Iterator[ModelWorker]:
    with start_model_worker(tiny_settings(num_kv_blocks=SMALL_CACHE_BLOCKS)) as w:
        yield w


@pytest.fixture(scope="module")
def pipe(worker: ModelWorker) -> TokenGeneratorPipeline:
    return TokenGeneratorPipeline(worker)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout_s} s for {what}")
        time.sleep(0.02)


def settled_blocks(worker: ModelWorker, timeout_s: float = 20.0) -> int:
    """KV blocks in use per a heartbeat the worker sent after its last request ended (0 unless blocks leaked)."""
    wait_until(lambda: worker.health()["in_flight"] == 0, timeout_s, "every request to end")
    since = time.time()
    wait_until(lambda: (worker.metrics.last_heartbeat or 0) > since and worker.health()["busy"] is False,
               timeout_s, "an idle heartbeat")
    return worker.health()["kv_blocks_used"]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def still_serves(pipe: TokenGeneratorPipeline) -> None:
    out = pipe.generate("still there?", max_new_tokens=3, ignore_eos=True)
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def out_of_memory(device: str, dtype: str) -> tuple[Any, Any]:
    """A factory whose load runs out of memory for real: a 4 EiB allocation fails at once, touching nothing."""
    model, tokenizer = tiny(device, dtype)
    model.scratch = torch.empty(2**62, dtype=torch.uint8, device=device)
    return model, tokenizer


# ---- the process dies, hangs or never starts ---------------------------------------------------


def test_sigkill_with_eight_in_flight_fails_each_with_the_signal_then_restart_serves() -> None:
    with start_model_worker(tiny_settings()) as w:
        pipe = TokenGeneratorPipeline(w)
        streams = [pipe.stream(f"story {i}", max_new_tokens=2000, ignore_eos=True) for i in range(8)]
        for s in streams:
            next(s)  # all eight are streaming
        old_pid = w.pid
        os.kill(old_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        for s in streams:
            with pytest.raises(WorkerCrashedError) as info:
                s.result()
            assert info.value.signal == signal.SIGKILL
        assert time.monotonic() - killed_at < 5
        w.restart()
        assert w.pid != old_pid and w.state is WorkerState.READY
        assert len(pipe.generate("again", max_new_tokens=4, ignore_eos=True).token_ids) == 4  # same pipeline


def test_hung_worker_fails_in_flight_requests_then_restart_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward that never returns: heartbeats still flow from inside it, so the step limit is what catches it."""
    monkeypatch.setenv(HANG_AFTER_ENV, "2")  # the warm-up's two forwards run, the next one never returns
    settings = tiny_settings(model="tests.factories:hanging_forward", hang_timeout_s=1.0, step_timeout_s=2.5,
                             metrics_interval_s=0.1, shutdown_timeout_s=1.0)
    with start_model_worker(settings) as w:
        pipe = TokenGeneratorPipeline(w)
        assert len(pipe.generate("warm", max_new_tokens=2, ignore_eos=True).token_ids) == 2
        started = time.monotonic()
        streams = [pipe.stream(f"hang {i}", max_new_tokens=4) for i in range(3)]
        for s in streams:
            with pytest.raises(WorkerHungError, match="step_timeout_s"):
                s.result()
        assert 2.0 <= time.monotonic() - started < 6  # step_timeout_s, not the (shorter) hang_timeout_s
        assert w.health()["hung"] and w.health()["heartbeat_age_s"] < 1.0  # it was alive all along
        with pytest.raises(WorkerHungError, match="restart"):  # refused at once, not left to wait forever
            pipe.generate("anyone?", max_new_tokens=2)
        hung_pid = w.pid
        w.restart()
        assert gone(hung_pid)
        assert len(pipe.generate("back", max_new_tokens=2, ignore_eos=True).token_ids) == 2


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("/no/such/dir/model", "unknown model '/no/such/dir/model'"),
        ("broken-dir", "could not load"),
        (f"{__name__}:out_of_memory", "can't allocate memory"),
    ],
    ids=["bad-path", "broken-model-dir", "out-of-memory"],
)
def test_model_load_failure_is_a_startup_error_and_leaves_no_process(tmp_path: Path, model: str,
                                                                       message: str) -> None:
    if model == "broken-dir":
        (tmp_path / "config.json").write_text("{not json")
        model = str(tmp_path)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(WorkerStartupError, match=message) as info:
        start_model_worker(tiny_settings(model=model))
    assert "Traceback" in info.value.remote_traceback  # the child's own traceback
    left = [p for p in psutil.Process().children(recursive=True)
            if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline())]
    assert not left


PARENT_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from toolkit import Settings, TokenGeneratorPipeline, start_model_worker

    def main():
        settings = Settings(**json.loads(sys.argv[1]))
        idle, busy = start_model_worker(settings), start_model_worker(settings)
        pipe = TokenGeneratorPipeline(busy)
        streams = [pipe.stream(f"busy {i}", max_new_tokens=2000, ignore_eos=True) for i in range(4)]
        next(streams[0])
        print(json.dumps([[w.pid, w.ipc_dir, w.log_dir] for w in (idle, busy)]), flush=True)
        if sys.argv[2] == "wait":
            time.sleep(120)
        # "exit": the interpreter ends with both handles still referenced, as when a kernel shuts down

    if __name__ == "__main__":
        main()
""")


@pytest.mark.parametrize("ending", ["sigkill", "exit"])
def test_when_the_parent_goes_its_workers_go_too(tmp_path: Path, ending: str) -> None:
    """SIGKILLed parent: each worker (one idle, one busy) notices within 5 s and removes its socket dir.
    Parent exiting without shutdown() (kernel restart): the finalizers stop the workers and clean up."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    settings = json.dumps(tiny_settings().model_dump())
    mode = "wait" if ending == "sigkill" else "exit"
    with open(tmp_path / "parent.log", "w") as err:
        parent = subprocess.Popen([sys.executable, str(script), settings, mode], cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)},  # this checkout's toolkit
                                  stdout=subprocess.PIPE, stderr=err, text=True)
    workers: list[list[Any]] = []
    try:
        line = parent.stdout.readline() if parent.stdout else ""
        assert line, (tmp_path / "parent.log").read_text()
        workers = json.loads(line)
        if ending == "sigkill":
            parent.kill()
        parent.wait(timeout=30)
        ended = time.monotonic()
        for pid, _, _ in workers:
            wait_until(lambda pid=pid: gone(pid), 5 - (time.monotonic() - ended), f"worker {pid} to exit")
        for _, ipc_dir, log_dir in workers:
            assert not Path(ipc_dir).exists()
            if ending == "exit":
                assert not Path(log_dir).exists()
    finally:
        parent.kill()
        parent.wait(timeout=10)
        for pid, _, log_dir in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
            shutil.rmtree(log_dir, ignore_errors=True)  # an orphaned worker leaves its log for a post-mortem


def test_rerunning_the_launch_cell_replaces_the_worker_and_a_second_one_is_independent(
    worker: ModelWorker, pipe: TokenGeneratorPipeline
) -> None:
    cell = start_model_worker(tiny_settings())
    first_pid, first_dir = cell.pid, cell.ipc_dir
    assert first_pid != worker.pid and first_dir != worker.ipc_dir
    cell = start_model_worker(tiny_settings())  # the launch cell again: the old handle is dropped
    assert first_pid is not None and gone(first_pid) and not Path(str(first_dir)).exists()
    ours = pipe.generate("same prompt", max_new_tokens=6, ignore_eos=True)
    theirs = TokenGeneratorPipeline(cell).generate("same prompt", max_new_tokens=6, ignore_eos=True)
    assert ours.token_ids == theirs.token_ids
    second_pid = cell.pid
    cell.shutdown()
    assert second_pid is not None and gone(second_pid)
    assert worker.is_alive()
    still_serves(pipe)


# ---- load, cancellation and a cache that is far too small -------------------------------------


def test_two_hundred_cancels_under_load_return_every_block(worker: ModelWorker, pipe: TokenGeneratorPipeline) -> None:
    rng = random.Random(6)
    prompts = ["alpha beta", "the quick brown fox", "one two three four five"]
    reference = {p: pipe.generate(p, max_new_tokens=12, ignore_eos=True).token_ids for p in prompts}

    async def consume(prompt: str, cut: int | None) -> list[int]:
        tokens: list[int] = []
        async with contextlib.aclosing(pipe.astream(prompt, max_new_tokens=12, ignore_eos=True)) as chunks:
            async for chunk in chunks:
                tokens.extend(chunk.token_ids)
                if cut is not None and len(tokens) >= cut:
                    break  # stops reading midway: aclosing closes the stream, which cancels it
        return tokens

    async def main() -> list[tuple[str, str, list[int] | None]]:
        plan = [(rng.choice(prompts), kind) for kind in ["finish"] * 60 + ["break"] * 100 + ["kill"] * 100]
        rng.shuffle(plan)
        tasks = [asyncio.create_task(consume(p, rng.randint(1, 11) if kind == "break" else None)) for p, kind in plan]
        for task, (_, kind) in zip(tasks, plan, strict=True):
            if kind == "kill":
                asyncio.get_running_loop().call_later(rng.uniform(0, 0.5), task.cancel)
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=120)
        return [(p, kind, None if isinstance(r, asyncio.CancelledError) else r)
                for (p, kind), r in zip(plan, done, strict=True)]

    results = asyncio.run(main())
    for prompt, kind, tokens in results:
        if kind == "finish":
            assert tokens == reference[prompt]
        elif tokens is not None:  # a cancelled stream got a correct prefix, never garbage
            assert tokens == reference[prompt][: len(tokens)]
    assert sum(tokens is None for _, _, tokens in results) > 10  # the task cancels really landed mid-flight
    assert settled_blocks(worker) == 0
    still_serves(pipe)


def test_dropped_or_closed_streams_are_cancelled_in_the_worker(worker: ModelWorker,
                                                               pipe: TokenGeneratorPipeline) -> None:
    for _ in pipe.stream("read one chunk then leave", max_new_tokens=300, ignore_eos=True):
        break  # the loop held the only reference: the stream is dropped here
    streams = [pipe.stream(f"closed at once {i}", max_new_tokens=300, ignore_eos=True) for i in range(10)]
    ids = {s.request_id for s in streams}
    for s in streams:
        s.close()  # before the worker saw the request: the cancel must not overtake it
    del streams
    assert settled_blocks(worker) == 0
    rows = worker.metrics.requests().loc[lambda df: df.request_id.isin(ids)]
    assert len(rows) == 10 and set(rows.finish_reason) == {"cancelled"}  # stopped early, not run to the end
    assert (rows.output_tokens < 300).all()


def test_ctrl_c_in_a_blocking_generate_cancels_it_and_the_worker_keeps_serving(
    worker: ModelWorker, pipe: TokenGeneratorPipeline
) -> None:
    assert settled_blocks(worker) == 0
    seen = len(worker.metrics.requests())

    stop, lock = threading.Event(), threading.Lock()

    def press_ctrl_c() -> None:
        """Ctrl-C until generate has raised: one signal can land where nothing turns it into KeyboardInterrupt."""
        wait_until(lambda: worker.health()["in_flight"] > 0, 10, "the request to be submitted")
        while not stop.wait(0.01):  # the KV cache ends it at 384 tokens: under a second when the host is quiet
            with lock:  # never after the main thread has left generate
                if not stop.is_set():
                    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    with pytest.raises(KeyboardInterrupt):
        try:
            pipe.generate("interrupt me", max_new_tokens=2000, ignore_eos=True)
        finally:
            with lock:
                stop.set()
    presser.join(10)
    assert settled_blocks(worker) == 0
    rows = worker.metrics.requests().iloc[seen:]
    assert list(rows.finish_reason) == ["cancelled"] and rows.output_tokens.iloc[0] < 2000
    still_serves(pipe)


def test_a_cache_far_too_small_preempts_and_every_request_finishes_in_full(
    worker: ModelWorker, pipe: TokenGeneratorPipeline
) -> None:
    prompts = [f"long answer number {i}" for i in range(8)]
    alone = [pipe.generate(p, max_new_tokens=64, ignore_eos=True).token_ids for p in prompts]
    settled_blocks(worker)
    preempted_before = int(worker.metrics.steps().preemptions.sum())
    together = pipe.generate_batch(prompts, max_new_tokens=64, ignore_eos=True, progress=False)
    assert [c.token_ids for c in together] == alone
    assert settled_blocks(worker) == 0
    assert int(worker.metrics.steps().preemptions.sum()) > preempted_before


def test_a_thousand_short_requests_from_sixteen_threads(worker: ModelWorker, pipe: TokenGeneratorPipeline) -> None:
    prompts = [f"short request {i}" for i in range(10)]
    reference = {p: pipe.generate(p, max_new_tokens=3, ignore_eos=True).token_ids for p in prompts}
    results: list[list[tuple[str, Any]]] = [[] for _ in range(16)]
    failures: list[BaseException] = []

    def client(t: int) -> None:
        try:
            mine = [prompts[i % 10] for i in range(t, 1000, 16)]
            streams = [(p, pipe.stream(p, max_new_tokens=3, ignore_eos=True)) for p in mine]  # all at once
            results[t] = [(p, s.result()) for p, s in streams]
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not failures, failures
    flat = [r for rs in results for r in rs]
    assert len(flat) == 1000
    assert all(c.token_ids == reference[p] and c.finish_reason == "length" for p, c in flat)
    ids = [c.request_id for _, c in flat]
    assert len(set(ids)) == 1000
    assert settled_blocks(worker) == 0
    finished = Counter(worker.metrics.requests().request_id)
    assert all(finished[i] == 1 for i in ids)  # each ran exactly once in the worker


# ---- input the pipeline must survive ------------------------------------------------------------


def test_a_prompt_over_the_cache_names_the_limit(worker: ModelWorker, pipe: TokenGeneratorPipeline) -> None:
    capacity = SMALL_CACHE_BLOCKS * worker.info.block_size
    assert capacity < worker.info.max_model_len
    with pytest.raises(InvalidRequestError, match=f"KV cache holds {capacity} tokens"):
        pipe.generate([5] * (capacity + 10), max_new_tokens=2)
    assert worker.health()["in_flight"] == 0
    still_serves(pipe)


def test_nul_bytes_emoji_floods_and_surrogates_are_served_or_refused_cleanly(pipe: TokenGeneratorPipeline) -> None:
    assert len(pipe.generate("before\x00after\x00", max_new_tokens=4, ignore_eos=True).token_ids) == 4
    assert len(pipe.generate("🧪🚀" * 20, max_new_tokens=4, ignore_eos=True).token_ids) == 4
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        pipe.generate("🧪" * 25_000, max_new_tokens=4)  # 100 kB of emoji
    with pytest.raises(InvalidRequestError, match="lone surrogate"):
        pipe.generate([{"role": "user", "content": "half \udc00 a pair"}], max_new_tokens=4)
    still_serves(pipe)


def test_streamed_text_is_always_valid_utf8(pipe: TokenGeneratorPipeline) -> None:
    for seed in range(3):  # sampled random tokens: byte-level pieces that split characters
        chunks = list(pipe.stream("🧪 ünïcödé 中文", max_new_tokens=120, temperature=1.0, seed=seed, ignore_eos=True))
        for chunk in chunks:
            chunk.text.encode("utf-8")
        ids = [t for c in chunks for t in c.token_ids]
        assert "".join(c.text for c in chunks) == pipe.tokenizer.decode(ids, skip_special_tokens=True)


def boundary_stop(pipe: TokenGeneratorPipeline, ids: list[int], text: str, k: int) -> tuple[str, int] | None:
    """A two-character stop string straddling the boundary before token k, if its first occurrence is there."""
    before = pipe.tokenizer.decode(ids[:k], skip_special_tokens=True)
    b = len(before)
    if not (0 < b < len(text)) or not text.startswith(before):
        return None
    stop = text[b - 1 : b + 1]
    return (stop, b - 1) if text.find(stop) == b - 1 else None


def test_stop_strings_spanning_tokens_cut_exactly_even_on_the_last_token(pipe: TokenGeneratorPipeline) -> None:
    full = pipe.generate("Repeat after me", max_new_tokens=24, ignore_eos=True)
    ids, text = full.token_ids, full.text
    spans = [(k, found) for k in range(1, len(ids)) if (found := boundary_stop(pipe, ids, text, k))]
    assert spans, f"no token boundary to test in {text!r}"
    k, (stop, cut) = spans[0]
    out = pipe.generate("Repeat after me", max_new_tokens=24, ignore_eos=True, stop=stop)
    assert (out.text, out.finish_reason) == (text[:cut], "stop")
    k, (stop, cut) = spans[-1]  # the stop string completes on the very last token the request may produce
    out = pipe.generate("Repeat after me", max_new_tokens=k + 1, ignore_eos=True, stop=stop)
    assert (out.text, out.finish_reason) == (text[:cut], "stop")


# ---- the boundary itself -------------------------------------------------------------------------


def test_corrupt_and_foreign_messages_are_logged_and_dropped(
    worker: ModelWorker, pipe: TokenGeneratorPipeline, caplog: pytest.LogCaptureFixture
) -> None:
    queue = worker._conn.queue  # inject through the parent's own sockets: nothing else can reach the worker's
    ready = msgspec.msgpack.encode(worker.info)  # a real message, going the wrong way
    junk = [b"\x00\xffnot msgpack", msgspec.msgpack.encode({"type": "Evil", "x": 1}), ready]
    with queue._send_lock:
        for sock in (queue.requests, queue.control):
            for frame in junk:
                sock.send(frame)
    with zmq.Context() as ctx, ctx.socket(zmq.PUSH) as foreign:  # a stranger writing to the parent's inbox
        foreign.connect(f"ipc://{worker.ipc_dir}/responses")
        foreign.send(b"\x93garbage")
        foreign.send(msgspec.msgpack.encode(m.Shutdown()))
        foreign.close(linger=2000)
    wait_until(lambda: worker.logs().count("dropped a corrupt or foreign message") >= 6, 10, "the worker's log")
    wait_until(lambda: caplog.text.count("dropped a corrupt or foreign message") >= 2, 10, "the parent's log")
    sink = Sink()  # well-formed but invalid, bypassing the pipeline's checks: refused by the worker, harmlessly
    worker.submit(m.GenerateRequest("foreign-1", [10**9], 4), sink)
    failure = sink.items.get(timeout=10)
    assert isinstance(failure, m.RequestFailed) and failure.error_type == "InvalidRequestError"
    assert worker.is_alive()
    still_serves(pipe)


def test_sockets_are_private_ipc_paths_and_nothing_listens_on_tcp(worker: ModelWorker) -> None:
    ipc_dir = Path(str(worker.ipc_dir))
    assert stat.S_IMODE(ipc_dir.stat().st_mode) == 0o700
    assert {p.name for p in ipc_dir.iterdir() if p.is_socket()} == {"requests", "control", "responses"}
    assert psutil.Process(worker.pid).net_connections(kind="inet") == []
    listening = [c for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert not [c for c in listening if c.laddr.ip not in ("127.0.0.1", "::1")]


def test_a_send_with_nobody_listening_gives_up_instead_of_blocking(tmp_path: Path) -> None:
    """A bound PUSH socket blocks forever without a peer: a dead worker must never freeze submit, cancel or close."""
    queue = EngineQueue.parent(str(tmp_path))
    try:
        started = time.monotonic()
        assert queue.send_control(m.Shutdown()) is False
        assert queue.send_request(m.Cancel(["nobody"])) is False
        assert time.monotonic() - started < 5
    finally:
        queue.close()


# ---- one failure stays one failure (issue 10 §2) ----------------------------------------------------


def test_a_request_whose_forward_raises_fails_alone_and_the_others_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The poisoned prompt shares a step with three decoding requests, and a fifth waits for a free slot: only the
    poisoned one fails (typed, with the worker's traceback, recorded as "error"), the rest finish as if alone."""
    settings = tiny_settings(model="tests.factories:poisoned", max_batch_size=4, metrics_interval_s=0.1)
    with start_model_worker(settings) as w:
        pipe = TokenGeneratorPipeline(w)
        prompts = [f"long story {i}" for i in range(4)]
        alone = [pipe.generate(p, max_new_tokens=120, ignore_eos=True).token_ids for p in prompts]
        running = [pipe.stream(p, max_new_tokens=120, ignore_eos=True) for p in prompts[:3]]
        for s in running:
            next(s)  # all three are decoding
        poison = pipe.stream([5, POISON_TOKEN, 7], max_new_tokens=4)
        waiting = pipe.stream(prompts[3], max_new_tokens=120, ignore_eos=True)  # the batch is full: it waits
        with pytest.raises(RemoteError, match=f"poisoned token {POISON_TOKEN}") as info:
            poison.result()
        assert info.value.error_type == "ValueError" and "Traceback" in info.value.remote_traceback
        assert [s.result().token_ids for s in [*running, waiting]] == alone
        assert "running each alone" in w.logs()  # it did share a step with the others
        ids = [s.request_id for s in [*running, waiting]]
        wait_until(lambda: {poison.request_id, *ids} <= set(w.metrics.requests().request_id), 10, "their rows")
        reasons = dict(w.metrics.requests()[["request_id", "finish_reason"]].itertuples(index=False))
        assert reasons[poison.request_id] == "error" and {reasons[i] for i in ids} == {"length"}
        outs = pipe.generate_batch(["fine", [POISON_TOKEN]], max_new_tokens=3, ignore_eos=True, progress=False,
                                   return_exceptions=True)
        assert len(outs[0].token_ids) == 3 and isinstance(outs[1], RemoteError)
        assert w.is_alive() and settled_blocks(w) == 0
        still_serves(pipe)


def test_a_step_that_raises_outside_the_forward_ends_only_its_batch() -> None:
    """In the engine: a failure after the batch was chosen ends that batch ("error"); the waiting requests finish."""
    engine = Engine(tiny_settings(max_batch_size=1, num_kv_blocks=16), model=build_tiny_llama())
    for rid in ("a", "b", "c"):
        engine.add(m.GenerateRequest(rid, [5, 6, 7], max_new_tokens=2, ignore_eos=True))
    update = engine.scheduler.update
    engine.scheduler.update = lambda out, sampled: 1 / 0  # type: ignore[method-assign]
    with pytest.raises(ZeroDivisionError):
        engine.step()
    assert engine.fail_scheduled() == ["a"]
    engine.scheduler.update = update  # type: ignore[method-assign]
    outputs: dict[str, list[int]] = {"b": [], "c": []}
    while engine.has_work:
        for delta in engine.step()[0]:
            outputs[delta.request_id] += delta.token_ids
    assert [len(v) for v in outputs.values()] == [2, 2] and engine.blocks.num_used_blocks == 0
    reasons = {r.request_id: r.finish_reason for r in engine.pop_request_metrics()}
    assert reasons == {"a": "error", "b": "length", "c": "length"}


def test_a_forward_longer_than_hang_timeout_still_completes(monkeypatch: pytest.MonkeyPatch) -> None:
    """One forward sleeps hang_timeout_s + 1: the heartbeat thread keeps the worker from being called hung."""
    monkeypatch.setenv(SLEEP_ENV, "2.0")
    settings = tiny_settings(model="tests.factories:slow_forward", hang_timeout_s=1.0, metrics_interval_s=0.1)
    with start_model_worker(settings) as w:
        pipe = TokenGeneratorPipeline(w)
        started = time.monotonic()
        out = pipe.generate("slow first step", max_new_tokens=3, ignore_eos=True)
        assert time.monotonic() - started >= 2.0  # the slow forward did run
        assert len(out.token_ids) == 3 and out.finish_reason == "length"
        assert not w.health()["hung"]
        still_serves(pipe)


def test_a_frozen_worker_is_hung_after_hang_timeout() -> None:
    """SIGSTOP freezes the heartbeat thread too: silence past hang_timeout_s is a hang, well before step_timeout_s."""
    settings = tiny_settings(hang_timeout_s=1.0, step_timeout_s=60.0, metrics_interval_s=0.1, shutdown_timeout_s=1.0)
    with start_model_worker(settings) as w:
        stream = TokenGeneratorPipeline(w).stream("frozen", max_new_tokens=2000, ignore_eos=True)
        next(stream)
        pid = w.pid or 0
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(WorkerHungError, match="sent nothing"):
                stream.result()
            assert 0.8 <= time.monotonic() - started < 5
        finally:
            os.kill(pid, signal.SIGCONT)


def test_a_startup_failure_sent_just_before_the_exit_is_still_reported(tmp_path: Path) -> None:
    """The StartupFailed arrives after the parent saw the process exit: the parent waits for it, and raises it."""
    conn = _Connection(tiny_settings(), str(tmp_path), MetricsLog(10), on_hang=lambda: None)
    conn.process = mp.get_context("spawn").Process(target=os._exit, args=(1,), daemon=True)

    def report_late() -> None:
        wait_until(lambda: conn.process.pid is not None, 60, "the stand-in worker to start")
        mp.connection.wait([conn.process.sentinel], timeout=60)
        time.sleep(0.3)  # the parent has seen the exit by now
        queue = EngineQueue.worker(conn.ipc_dir)
        queue.send_response(m.StartupFailed("RuntimeError", "late words", "Traceback (most recent call last): ..."))
        queue.close()

    reporter = threading.Thread(target=report_late, daemon=True)
    reporter.start()
    with pytest.raises(WorkerStartupError, match="failed to start: RuntimeError: late words") as info:
        conn.start()
    reporter.join(10)
    assert info.value.remote_traceback.startswith("Traceback")


def test_a_factory_that_raises_gives_its_own_error_every_time() -> None:
    for _ in range(3):  # the worker exits right after it reports: the report must win every time
        with pytest.raises(WorkerStartupError, match="factory exploded on purpose") as info:
            start_model_worker(tiny_settings(model="tests.factories:raising"))
        assert "Traceback" in info.value.remote_traceback and info.value.error_type == "RuntimeError"


def test_sliding_window_model_is_clamped_to_its_window_and_says_so() -> None:
    with start_model_worker(tiny_settings(model="tests.factories:sliding_window_mistral")) as w:
        assert w.info.max_model_len == SLIDING_WINDOW
        assert any("sliding window" in note for note in w.info.notes)
        pipe = TokenGeneratorPipeline(w)
        out = pipe.generate(list(range(100, 110)), max_new_tokens=SLIDING_WINDOW, ignore_eos=True)  # to the window
        assert out.finish_reason == "length" and out.prompt_tokens + len(out.token_ids) == SLIDING_WINDOW
        with pytest.raises(InvalidRequestError, match="max_model_len"):
            pipe.generate(list(range(100, 100 + SLIDING_WINDOW)), max_new_tokens=2)
        still_serves(pipe)


@pytest.mark.parametrize(
    ("config", "window"),
    [
        (MistralConfig(sliding_window=4096), 4096),
        (MistralConfig(sliding_window=None), None),
        (Qwen2Config(use_sliding_window=False, sliding_window=4096), None),
        (Qwen2Config(use_sliding_window=True, sliding_window=64, num_hidden_layers=2, max_window_layers=1), 64),
        (Qwen2Config(use_sliding_window=True, sliding_window=64, num_hidden_layers=2, max_window_layers=2), None),
        (LlamaConfig(), None),
    ],
    ids=["mistral", "mistral-off", "qwen2-off", "qwen2-some-layers", "qwen2-no-layer-slides", "llama"],
)
def test_sliding_window_is_read_from_the_config(config: Any, window: int | None) -> None:
    assert sliding_window(config) == window


UNGUARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    from toolkit import Settings, start_model_worker

    def start():
        return start_model_worker(Settings(**json.loads(sys.argv[1])))

    worker = start()  # no `if __name__ == "__main__":`: spawn would run this again in the child
    print("started", flush=True)
    worker.shutdown()
""")


def test_a_script_without_the_main_guard_is_told_what_to_do(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script), json.dumps(tiny_settings().model_dump())], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "started" not in done.stdout
    assert "WorkerStartupError" in done.stderr and 'if __name__ == "__main__":' in done.stderr
    assert f"{script}, line 8" in done.stderr  # the line that starts it at import time


def test_a_worker_started_while_a_child_bootstraps_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the child itself says, should the parent's check miss a case: before any process is spawned."""
    monkeypatch.setattr(mp.current_process(), "_inheriting", True, raising=False)
    before = psutil.Process().children()
    with pytest.raises(WorkerStartupError, match="__name__"):
        start_model_worker(tiny_settings())
    assert psutil.Process().children() == before


@pytest.mark.parametrize(
    ("source", "line", "guarded"),
    [
        ("import x\nx.start()\n", 2, False),
        ("import x\nif __name__ == '__main__':\n    x.start()\n", 3, True),
        ("import x\nif '__main__' == __name__:\n    w = x.start()\n    w.go()\n", 4, True),
        ("import x\nif x.ok:\n    x.start()\n", 3, False),
    ],
)
def test_main_guard_detection_reads_the_source(source: str, line: int, guarded: bool) -> None:
    assert is_guarded(source, line) is guarded
