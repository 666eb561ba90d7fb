"""Command line: `python -m toolkit demo | serve | bench`."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

from toolkit.settings import Settings

DEMO_PROMPTS = [
    "In two sentences, what is continuous batching in LLM serving?",
    "Write a haiku about a worker process.",
    "Name three things a KV cache stores.",
]


def demo(args: argparse.Namespace) -> int:
    """Start the worker on the embedded model, stream three chat answers at once, label chunks as they arrive."""
    from toolkit.pipeline import TokenGeneratorPipeline
    from toolkit.worker.client import start_model_worker

    settings = Settings(model=args.model, max_batch_size=8)
    print(f"starting a model worker for {settings.model!r} ...", flush=True)
    with start_model_worker(settings) as worker:
        info = worker.info
        print(f"worker ready: pid {worker.pid} (main pid {os.getpid()}), {info.device}/{info.dtype}, "
              f"{info.num_kv_blocks} KV blocks of {info.block_size}, loaded in {info.load_time_s:.1f} s\n")
        pipe = TokenGeneratorPipeline(worker)
        streams = [pipe.stream([{"role": "user", "content": p}], max_new_tokens=args.max_new_tokens)
                   for p in DEMO_PROMPTS]
        started = time.perf_counter()
        lock = threading.Lock()

        def consume(i: int) -> None:
            for chunk in streams[i]:
                if chunk.text:
                    with lock:
                        print(f"[{i}] {chunk.text!r}", flush=True)

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(streams))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        print()
        for i, (prompt, s) in enumerate(zip(DEMO_PROMPTS, streams, strict=True)):
            print(f"[{i}] {prompt}\n    -> {s.text.strip()}\n    ({len(s.token_ids)} tokens, {s.finish_reason})")
        tokens = sum(len(s.token_ids) for s in streams)
        print(f"\nmain pid {os.getpid()}, worker pid {worker.pid}: {tokens} tokens in {elapsed:.2f} s "
              f"= {tokens / elapsed:.1f} tokens/s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="stream three chat answers from the embedded model")
    p_demo.add_argument("--model", default=Settings().model)
    p_demo.add_argument("--max-new-tokens", type=int, default=64)
    p_demo.set_defaults(func=demo)
    from toolkit.api.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    sub.add_parser("bench", help="benchmark the toolkit beside transformers (see `bench --help`)", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from toolkit.bench import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
