"""The benchmark harness: every system, the workloads, the drivers and the metrics."""

from __future__ import annotations

import ctypes
import json
import math
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch

from toolkit import models
from toolkit.bench import SYSTEMS, main
from toolkit.bench.cli import emulated_dtype, median_runs, parse_config, rotated, write_outputs
from toolkit.bench.config import BenchConfig
from toolkit.bench.drivers import drive_async, drive_steps, drive_threads
from toolkit.bench.records import RequestRecord, SystemRun
from toolkit.bench.roofline import param_counts
from toolkit.bench.stats import METRICS, latencies, summarize
from toolkit.bench.workloads import BenchRequest, allowed_token_ids, build_workload, parse_range, poisson_arrivals


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer("tiny-random-llama")


@pytest.mark.timeout(240)
def test_every_system_produces_the_requested_tokens_and_the_json_has_every_metric(tmp_path) -> None:
    argv = ["--model", "tiny-random-llama", "--num-requests", "4", "--input-len", "8:40", "--output-len", "3:12",
            "--sequential-limit", "0", "--kv-cache-gib", "0.02", "--threads", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "random-offline-float32.json").read_text())
    assert (tmp_path / "random-offline-float32.png").stat().st_size > 10_000
    assert "| toolkit |" in (tmp_path / "random-offline-float32.md").read_text()
    assert list(data["systems"]) == list(SYSTEMS)
    expected = data["workload"]["output_tokens"]
    for name, summary in data["systems"].items():
        assert summary["error"] is None, name
        assert set(METRICS) <= set(summary), (name, set(METRICS) - set(summary))
        assert summary["exact_token_counts"] is True, name
        assert summary["requests"] == summary["completed"] == 4, name
        assert summary["output_tokens"] == summary["expected_output_tokens"] == expected, name
        assert summary["output_tok_s"] > 0 and summary["ttft_p99_ms"] >= summary["ttft_p50_ms"] > 0, name
        assert 1 <= summary["batch_peak"] <= 4 and summary["peak_rss_mib"] > 50, name
        assert 0 < summary["roofline_frac"] <= 1, (name, summary["roofline_frac"])
    assert data["systems"]["hf-sequential"]["batch_peak"] == 1
    assert data["machine"]["gemm_gflops"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_toolkit_ray_runs_the_workload_on_a_pool_and_reports_routing_cost(tmp_path) -> None:
    pytest.importorskip("ray")
    argv = ["--systems", "toolkit-ray", "--model", "tiny-random-llama", "--num-requests", "6", "--input-len", "8:40",
            "--output-len", "3:12", "--kv-cache-gib", "0.02", "--replicas", "2", "--threads-per-replica", "1",
            "--out", str(tmp_path), "--no-plot"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "random-offline-float32.json").read_text())["systems"]["toolkit-ray"]
    assert summary["error"] is None and summary["exact_token_counts"] is True and summary["completed"] == 6
    assert summary["note"].startswith("2 replicas x 1 threads; Ray start ") and "routing " in summary["note"]
    assert summary["peak_rss_mib"] > 100  # both replicas' processes


def test_random_workload_is_seeded_within_ranges_and_avoids_special_tokens(tokenizer) -> None:
    a = build_workload(tokenizer, "random", 50, (16, 64), (8, 32), seed=3)
    b = build_workload(tokenizer, "random", 50, (16, 64), (8, 32), seed=3)
    c = build_workload(tokenizer, "random", 50, (16, 64), (8, 32), seed=4)
    assert [r.prompt_ids for r in a] == [r.prompt_ids for r in b]
    assert [r.prompt_ids for r in a] != [r.prompt_ids for r in c]
    assert all(16 <= len(r.prompt_ids) <= 64 and 8 <= r.output_len <= 32 for r in a)
    assert {len(r.prompt_ids) for r in a} != {16} and all(r.arrival_s == 0 for r in a)
    special = set(tokenizer.all_special_ids)
    assert special and not special & {t for r in a for t in r.prompt_ids}
    assert len(allowed_token_ids(tokenizer)) == tokenizer.vocab_size - len(special)


def test_chat_workload_goes_through_the_chat_template(tokenizer) -> None:
    requests = build_workload(tokenizer, "chat", 3, (1, 1), (5, 5), seed=0)
    text = tokenizer.decode(requests[0].prompt_ids)
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
    assert [r.output_len for r in requests] == [5, 5, 5]


def test_poisson_arrivals_have_the_requested_rate() -> None:
    arrivals = poisson_arrivals(4000, 8.0, seed=0)
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0 and (gaps > 0).all()
    assert abs(gaps.mean() - 1 / 8) < 0.01 and abs(gaps.std() - 1 / 8) < 0.015  # exponential: std == mean
    assert poisson_arrivals(3, math.inf, seed=0) == [0.0, 0.0, 0.0]
    assert parse_range("16:256") == (16, 256) and parse_range("7") == (7, 7)
    with pytest.raises(ValueError):
        parse_range("9:3")


def test_latencies_follow_vllm_definitions() -> None:
    record = RequestRecord(0, prompt_len=10, output_len=4, sent_at=1.0)
    for t, n in ((1.5, 1), (1.7, 2), (2.0, 1)):
        record.add_chunk(n, t)
    record.done = True
    lat = latencies([record])
    assert lat["ttft"] == [pytest.approx(0.5)] and lat["e2e"] == [pytest.approx(1.0)]
    assert lat["tpot"] == [pytest.approx(0.5 / 3)]
    assert lat["itl"] == pytest.approx([0.2, 0.3])
    run = SystemRun("x", records=[record], started_at=1.0, batch_sizes=[1, 3, 2])
    summary = summarize(run, {"num_params": 100, "lm_head_params": 40, "gemm_gflops": 1e-6})
    assert summary["exact_token_counts"] and summary["output_tok_s"] == pytest.approx(4.0)
    assert summary["total_tok_s"] == pytest.approx(14.0) and summary["batch_peak"] == 3
    assert summary["achieved_gflops"] == pytest.approx((2 * 100 * 4 + 2 * 60 * 10) / 1e9)
    cached = SystemRun("x", records=[record], started_at=1.0, prefix_cache_hit_rate=0.5)
    cached_summary = summarize(cached, {"num_params": 100, "lm_head_params": 40, "gemm_gflops": 1e-6})
    assert cached_summary["achieved_gflops"] == pytest.approx((2 * 100 * 4 + 2 * 60 * 5) / 1e9)  # hits cost nothing
    assert cached_summary["total_tok_s"] == summary["total_tok_s"]  # vLLM's total counts every prompt token
    short = SystemRun("y", records=[RequestRecord(0, 10, 5, 0.0, [0.1], [4], True)], started_at=0.0)
    assert summarize(short, {})["exact_token_counts"] is False


def test_model_flops_leave_out_the_input_embedding_lookup() -> None:
    """Tied or not, a token is multiplied by the same weights: the untied embedding table is only read."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(tied: bool) -> LlamaForCausalLM:
        return LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=tied))

    tied, untied = build(True), build(False)
    assert sum(p.numel() for p in untied.parameters()) == sum(p.numel() for p in tied.parameters()) + 32_000
    assert param_counts(untied) == param_counts(tied) and param_counts(tied)[1] == 32_000


class FakeStepper:
    """Each step gives one token to every request in flight; remembers the most ever in flight."""

    def __init__(self) -> None:
        self.active: list[tuple[BenchRequest, RequestRecord]] = []
        self.peak = 0

    def add(self, request: BenchRequest, record: RequestRecord) -> None:
        self.active.append((request, record))
        self.peak = max(self.peak, len(self.active))

    @property
    def has_work(self) -> bool:
        return bool(self.active)

    def step(self) -> None:
        time.sleep(0.002)
        for _, record in self.active:
            record.add_chunk(1)
            record.done = record.num_tokens == record.output_len
        self.active = [(q, r) for q, r in self.active if not r.done]


@pytest.mark.timeout(30)
def test_step_driver_honours_arrivals_and_max_concurrency() -> None:
    requests = [BenchRequest(i, [1, 2, 3], 10, arrival_s=0.004 * i) for i in range(6)]
    stepper = FakeStepper()
    records, started = drive_steps(stepper, requests, max_concurrency=2, desc="fake")
    assert stepper.peak == 2 and all(r.num_tokens == 10 and r.done for r in records)
    assert all(r.sent_at - started >= q.arrival_s for q, r in zip(requests, records, strict=True))


class FakeStreamer:
    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0

    async def stream(self, request: BenchRequest):
        import asyncio

        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        for _ in range(request.output_len):
            await asyncio.sleep(0.002)
            yield 1
        self.in_flight -= 1


@pytest.mark.timeout(30)
def test_async_driver_honours_arrivals_and_max_concurrency() -> None:
    requests = [BenchRequest(i, [1], 10, arrival_s=0.004 * i) for i in range(8)]
    streamer = FakeStreamer()
    records, started = drive_async(streamer, requests, max_concurrency=3, desc="fake")
    assert streamer.peak == 3 and all(r.num_tokens == 10 and r.done for r in records)
    assert all(r.sent_at - started >= q.arrival_s for q, r in zip(requests, records, strict=True))


def test_a_fractional_request_rate_keeps_the_whole_file_name(tmp_path) -> None:
    """`with_suffix` would cut "random-poisson-2.5rps-float32" at its dot, and runs in two dtypes would collide."""
    cfg = BenchConfig(request_rate=2.5, out=str(tmp_path), plot=False)
    write_outputs(cfg, {"config": cfg.to_dict()}, {}, {}, "title")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "random-poisson-2.5rps-float32.json", "random-poisson-2.5rps-float32.md",
    ]


def test_shared_prefix_workload_shares_exactly_the_prefix(tokenizer) -> None:
    a = build_workload(tokenizer, "shared-prefix", 20, (1, 1), (8, 32), seed=5, prefix_len=100)
    b = build_workload(tokenizer, "shared-prefix", 20, (1, 1), (8, 32), seed=5, prefix_len=100)
    assert [r.prompt_ids for r in a] == [r.prompt_ids for r in b]
    prefix = a[0].prompt_ids[:100]
    assert all(r.prompt_ids[:100] == prefix and 16 <= len(r.prompt_ids) - 100 <= 64 for r in a)
    assert len({tuple(r.prompt_ids[100:]) for r in a}) == 20 and all(8 <= r.output_len <= 32 for r in a)
    assert not set(tokenizer.all_special_ids) & {t for r in a for t in r.prompt_ids}


def test_prefix_cache_flags_parse() -> None:
    cfg = parse_config(["--workload", "shared-prefix", "--prefix-len", "64", "--no-prefix-cache",
                        "--systems", "toolkit,toolkit-no-cache,hf-cb"])
    assert (cfg.workload, cfg.prefix_len, cfg.prefix_cache) == ("shared-prefix", 64, False)
    assert cfg.systems == ("toolkit", "toolkit-no-cache", "hf-cb") and cfg.stem.endswith("-no-prefix-cache")
    assert parse_config([]).prefix_cache is True and parse_config([]).prefix_len == 512
    with pytest.raises(SystemExit):
        parse_config(["--prefix-len", "0"])


@pytest.mark.timeout(240)
def test_shared_prefix_run_shows_the_cache_beside_no_cache(tmp_path) -> None:
    argv = ["--model", "tiny-random-llama", "--workload", "shared-prefix", "--prefix-len", "96", "--num-requests", "4",
            "--output-len", "3:6", "--systems", "toolkit,toolkit-no-cache,toolkit-inprocess", "--kv-cache-gib", "0.02",
            "--threads", "1", "--no-plot", "--out", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "shared-prefix-offline-float32.json").read_text())
    systems = data["systems"]
    # 4 requests of 96 + 16..64 tokens, 16-token blocks, a cold cache: the last 3 find the 6 prefix blocks
    for name in ("toolkit", "toolkit-inprocess"):
        assert systems[name]["prefix_hit_rate"] == pytest.approx(3 * 96 / data["workload"]["prompt_tokens"]), name
    assert math.isnan(systems["toolkit-no-cache"]["prefix_hit_rate"])
    assert "prefix hits" in (tmp_path / "shared-prefix-offline-float32.md").read_text()


def _run_of(name: str, tokens: int, seconds: float) -> SystemRun:
    """A finished one-request run that made `tokens` tokens in `seconds`."""
    record = RequestRecord(0, prompt_len=4, output_len=tokens, sent_at=0.0)
    record.add_chunk(tokens, now=seconds)
    return SystemRun(name, records=[record], started_at=0.0)


def test_rounds_rotate_the_order_and_report_the_median_run_with_paired_ratios() -> None:
    assert [rotated(("a", "b", "c"), i) for i in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    seconds = {"a": [1.0, 2.0, 4.0], "b": [2.0, 2.0, 2.0]}  # 100 tokens: a makes 100, 50, 25 tok/s, b 50 each round
    rounds = [[_run_of(name, 100, seconds[name][i]) for name in rotated(("a", "b"), i)] for i in range(3)]
    runs, paired = median_runs(rounds, ("a", "b"))
    assert [run.name for run in runs] == ["a", "b"]
    assert runs[0] is rounds[1][1]  # a's median run, 50 tok/s, ran second in round 1
    assert paired["a"]["rounds_output_tok_s"] == pytest.approx([100, 50, 25])
    assert paired["b"]["paired_ratio"] == pytest.approx(1.0)  # (0.5 * 1 * 2) ** (1/3)
    assert (paired["b"]["paired_ratio_min"], paired["b"]["paired_ratio_max"]) == pytest.approx((0.5, 2.0))
    assert runs[1].note.startswith("median of 3 rounds (50.0, 50.0, 50.0 tok/s); x1.000 of a per round")
    assert runs[0].note == "median of 3 rounds (100.0, 50.0, 25.0 tok/s)"
    single, none = median_runs(rounds[:1], ("a", "b"))
    assert single == rounds[0] and none == {}


@pytest.mark.timeout(240)
def test_two_rounds_run_each_system_twice_and_keep_both_figures(tmp_path) -> None:
    argv = ["--model", "tiny-random-llama", "--num-requests", "3", "--input-len", "8:24", "--output-len", "3:6",
            "--systems", "toolkit-inprocess,toolkit-no-cache", "--rounds", "2", "--kv-cache-gib", "0.02",
            "--threads", "1", "--no-plot", "--out", str(tmp_path)]
    assert main(argv) == 0
    systems = json.loads((tmp_path / "random-offline-float32.json").read_text())["systems"]
    for name, summary in systems.items():
        assert summary["exact_token_counts"] is True and len(summary["rounds_output_tok_s"]) == 2, name
        assert summary["output_tok_s"] in summary["rounds_output_tok_s"], name
    assert systems["toolkit-inprocess"]["paired_ratio"] == pytest.approx(1.0)
    assert systems["toolkit-no-cache"]["paired_ratio"] > 0
    with pytest.raises(SystemExit):
        parse_config(["--rounds", "0"])


def _native_only_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """This host, as far as the benchmark can tell, is the AVX2 EPYC of issue 14: no native bfloat16 / float16."""
    from toolkit.engine import hardware

    monkeypatch.setattr(hardware, "native_dtype", lambda dtype, device="cpu", flags=None: dtype == torch.float32)


def test_bench_refuses_a_bf16_run_on_a_host_without_native_bf16(tmp_path, monkeypatch, capsys) -> None:
    _native_only_float32(monkeypatch)
    argv = ["--model", "tiny-random-llama", "--dtype", "bfloat16", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refusing to benchmark --dtype bfloat16" in err and "--allow-slow-dtype" in err and "float32" in err
    assert not list(tmp_path.iterdir())  # refused before anything ran or was written
    assert emulated_dtype(parse_config(["--dtype", "float32"])) == ""  # float32 is never refused


@pytest.mark.timeout(240)
def test_an_allowed_slow_dtype_run_is_marked_and_records_the_host(tmp_path, monkeypatch) -> None:
    from toolkit.bench import systems_llamacpp

    _native_only_float32(monkeypatch)
    monkeypatch.setattr(systems_llamacpp, "llama_cpp_available", lambda: False)
    argv = ["--systems", "toolkit-inprocess,llama-cpp", "--model", "tiny-random-llama", "--dtype", "bfloat16",
            "--allow-slow-dtype", "--num-requests", "2", "--input-len", "8:16", "--output-len", "2:4",
            "--kv-cache-gib", "0.02", "--threads", "1", "--no-isolate", "--no-plot", "--out", str(tmp_path)]
    assert main(argv) == 0  # the skipped llama-cpp does not fail the run
    data = json.loads((tmp_path / "random-offline-bfloat16.json").read_text())
    host = data["host"]
    assert host["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and host["torch_threads"] == 1
    assert host["gemm_gflops"]["float32"] > 0 and host["gemm_gflops"]["bfloat16"] > 0
    assert host["mem_bandwidth_gbs"] > 0 and host["emulated_dtype"] and host["threads_rule"].startswith("given")
    title = data["title"]
    assert "EMULATED bfloat16" in title and f"\nhost: {host['cpu_model']}, {host['cpu_capability']}" in title
    assert title.split("\n")[0] in (tmp_path / "random-offline-bfloat16.md").read_text()
    inprocess, llama = data["systems"]["toolkit-inprocess"], data["systems"]["llama-cpp"]
    assert inprocess["exact_token_counts"] is True and inprocess["note"].startswith("emulated bfloat16")
    assert llama["skipped"] == systems_llamacpp.NOT_INSTALLED and llama["exact_token_counts"] is None
    assert "skipped: llama_cpp (llama-cpp-python) is not installed" in llama["note"]
    assert "| llama-cpp |" in (tmp_path / "random-offline-bfloat16.md").read_text()


def test_llama_cpp_is_skipped_with_a_note_when_not_installed(monkeypatch) -> None:
    from toolkit.bench import systems_llamacpp
    from toolkit.bench.systems import run_system

    monkeypatch.setattr(systems_llamacpp, "llama_cpp_available", lambda: False)
    requests = [BenchRequest(0, [1, 2, 3], 4, 0.0)]
    run = run_system("llama-cpp", BenchConfig(), requests)
    assert run.error is None and run.records == [] and run.skipped == systems_llamacpp.NOT_INSTALLED
    monkeypatch.setattr(systems_llamacpp, "llama_cpp_available", lambda: True)
    assert run_system("llama-cpp", BenchConfig(model="tiny-random-llama"), requests).skipped.endswith(
        "llama.cpp serves only GGUF files")
    assert systems_llamacpp.gguf_file("smollm2-135m-instruct").suffix == ".gguf"


def test_thread_driver_runs_each_request_once_within_the_thread_count() -> None:
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}

    def call(request: BenchRequest) -> int:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.02)
        with lock:
            state["now"] -= 1
        return request.output_len

    requests = [BenchRequest(i, [1] * 4, 3 + i, 0.0) for i in range(10)]
    records, started = drive_threads(call, requests, 3, "fake", progress=False)
    assert [r.num_tokens for r in records] == [3 + i for i in range(10)] and all(r.done for r in records)
    assert state["peak"] == 3 and all(r.sent_at >= started and len(r.chunk_times) == 1 for r in records)

    def broken(request: BenchRequest) -> int:
        raise RuntimeError(f"request {request.index} failed")

    with pytest.raises(RuntimeError, match="failed"):
        drive_threads(broken, requests, 3, "fake", progress=False)


@pytest.mark.timeout(240)
def test_thread_client_drives_the_worker_through_pipe_generate(tmp_path) -> None:
    argv = ["--systems", "toolkit", "--client", "threads", "--client-threads", "3", "--model", "tiny-random-llama",
            "--num-requests", "5", "--input-len", "8:24", "--output-len", "2:6", "--kv-cache-gib", "0.02",
            "--threads", "1", "--no-plot", "--out", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "random-offline-float32-threads-client.json").read_text())
    summary = data["systems"]["toolkit"]
    assert summary["exact_token_counts"] is True and summary["completed"] == 5
    assert summary["note"].startswith("client: 3 threads calling pipe.generate")
    assert summary["ttft_mean_ms"] == pytest.approx(summary["e2e_mean_ms"])  # no streaming: one chunk a request
    assert "; client: 3 threads calling pipe.generate\nhost: " in data["title"]


class FakeLlamaCpp:
    """The few llama_cpp calls the llama-cpp system makes, over a toy model: the next token is the last one + 1.

    It checks what llama.cpp would: every sequence's positions are contiguous from 0 and its id below n_seq_max.
    """

    VOCAB = 50

    def __init__(self) -> None:
        self.kv: dict[int, list[int]] = {}  # seq id -> tokens in its cache, by position
        self.n_seq_max = 0
        self.logits: dict[int, ctypes.Array] = {}
        self.freed: list[str] = []

    def llama_backend_init(self) -> None:
        pass

    def llama_model_default_params(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(n_gpu_layers=-1)

    def llama_model_load_from_file(self, path: bytes, params: types.SimpleNamespace) -> str:
        assert path.endswith(b".gguf") and params.n_gpu_layers == 0
        return "model"

    def llama_context_default_params(self) -> types.SimpleNamespace:
        return types.SimpleNamespace()

    def llama_init_from_model(self, model: str, params: types.SimpleNamespace) -> str:
        self.n_seq_max = params.n_seq_max
        assert params.n_ctx % params.n_seq_max == 0 and params.n_batch >= params.n_seq_max
        return "ctx"

    def llama_get_memory(self, ctx: str) -> str:
        return "memory"

    def llama_model_get_vocab(self, model: str) -> str:
        return "vocab"

    def llama_vocab_n_tokens(self, vocab: str) -> int:
        return self.VOCAB

    def llama_batch_init(self, n_tokens: int, embd: int, n_seq_max: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(n_tokens=0, token=[0] * n_tokens, pos=[0] * n_tokens, n_seq_id=[0] * n_tokens,
                                     seq_id=[[0] for _ in range(n_tokens)], logits=[0] * n_tokens)

    def llama_decode(self, ctx: str, batch: types.SimpleNamespace) -> int:
        self.logits.clear()
        for i in range(batch.n_tokens):
            seq = batch.seq_id[i][0]
            assert batch.n_seq_id[i] == 1 and 0 <= seq < self.n_seq_max
            cache = self.kv.setdefault(seq, [])
            assert batch.pos[i] == len(cache), (seq, batch.pos[i], len(cache))
            cache.append(batch.token[i])
            if batch.logits[i]:
                row = (ctypes.c_float * self.VOCAB)()
                row[(batch.token[i] + 1) % self.VOCAB] = 1.0
                self.logits[i] = row
        return 0

    def llama_get_logits_ith(self, ctx: str, i: int) -> object:
        return ctypes.cast(self.logits[i], ctypes.POINTER(ctypes.c_float))

    def llama_memory_seq_rm(self, memory: str, seq: int, p0: int, p1: int) -> bool:
        assert (p0, p1) == (-1, -1)
        del self.kv[seq]
        return True

    def llama_batch_free(self, batch: object) -> None:
        self.freed.append("batch")

    def llama_free(self, ctx: str) -> None:
        self.freed.append("ctx")

    def llama_model_free(self, model: str) -> None:
        self.freed.append("model")


def test_llama_cpp_system_batches_sequences_over_the_low_level_api(monkeypatch) -> None:
    """The serving loop against a fake llama_cpp (the real package is not installable here): positions, sequence
    ids, chunked prompts, greedy feedback and freed sequences, as llama.cpp would require them."""
    from toolkit.bench import systems_llamacpp

    fake = FakeLlamaCpp()
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    monkeypatch.setattr(systems_llamacpp, "llama_cpp_available", lambda: True)
    requests = [BenchRequest(i, [(7 * i + j) % 40 for j in range(5 + 9 * i)], 3 + i, 0.0) for i in range(6)]
    cfg = BenchConfig(max_batch_size=4, max_batch_tokens=16, threads=1, warmup=1)
    seen: list[list[int]] = []
    original = fake.llama_memory_seq_rm

    def remember(memory: str, seq: int, p0: int, p1: int) -> bool:
        seen.append(list(fake.kv[seq]))
        return original(memory, seq, p0, p1)

    fake.llama_memory_seq_rm = remember
    run = systems_llamacpp.run_llama_cpp(cfg, requests)
    assert run.error is None and not run.skipped and [r.num_tokens for r in run.records] == [3 + i for i in range(6)]
    assert all(r.done for r in run.records) and max(run.batch_sizes) == 4 and fake.kv == {}
    assert fake.freed == ["batch", "ctx", "model"]
    for request in requests:  # each sequence's cache: its prompt, then its greedy tokens (all but the last)
        prompt, n = request.prompt_ids, request.output_len
        expected = prompt + [(prompt[-1] + k) % FakeLlamaCpp.VOCAB for k in range(1, n)]
        assert expected in seen, request.index
