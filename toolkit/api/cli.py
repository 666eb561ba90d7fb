"""`python -m toolkit serve`: start the worker(s), wait for Ready, serve the OpenAI API until Ctrl-C or SIGTERM,
then shut the workers down cleanly. Every Settings field is also a flag (`--max-batch-size 8`). With `--replicas N`
the API fronts a pool of N model-worker replicas on Ray (toolkit.pool), a private local Ray unless `--ray-address`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import types
import typing
from typing import Any

from toolkit.settings import Settings

NOT_FLAGS = {"model", "ipc_dir"}  # model has its own flag; ipc_dir is set by start_model_worker


def _flag_type(annotation: Any) -> dict[str, Any]:
    """argparse keywords for one Settings field's type."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
        args = list(typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": args, "type": type(args[0])}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": annotation if annotation in (int, float) else str}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="generation model (default: Settings / TOOLKIT_MODEL)")
    p.add_argument("--embeddings-model", default=None, help="also serve /v1/embeddings from this model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $TOOLKIT_API_KEY)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--restart-on-crash", action=argparse.BooleanOptionalAction, default=True,
                   help="restart a worker that died")
    p.add_argument("--engine", choices=["worker", "inprocess"], default="worker",
                   help="inprocess: step the engine on the server's own event loop (for comparison only)")
    p.add_argument("--replicas", type=int, default=None,
                   help="serve a pool of N model-worker replicas on Ray (toolkit.pool) instead of one worker")
    p.add_argument("--ray-address", default=None,
                   help="with --replicas: join this Ray cluster ('auto' or host:port); default: a private local Ray")
    p.add_argument("--threads-per-replica", type=int, default=None,
                   help="with --replicas: CPUs each replica reserves and torch threads it runs (default: split evenly)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    p.add_argument("--max-n", type=int, default=8, help="largest n per request")
    p.add_argument("--max-prompts", type=int, default=64, help="most prompts (or embedding inputs) per request")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    p.add_argument("--allow-origin", action="append", default=None, help="enable CORS for this origin (repeat)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True)
    group = p.add_argument_group("worker settings (default: TOOLKIT_<FIELD> or the Settings default)")
    for name, field in Settings.model_fields.items():
        if name not in NOT_FLAGS:
            group.add_argument(f"--{name.replace('_', '-')}", dest=f"setting_{name}", default=None,
                               metavar=name.upper(), help=field.description, **_flag_type(field.annotation))
    p.set_defaults(func=serve)


def _settings(args: argparse.Namespace, model: str | None) -> Settings:
    given = {k.removeprefix("setting_"): v for k, v in vars(args).items() if k.startswith("setting_") and v is not None}
    return Settings(**given, **({"model": model} if model else {}))


def serve(args: argparse.Namespace) -> int:
    from toolkit.api.app import Limits, create_app
    from toolkit.api.server import BackgroundServer, CrashWatcher, check_bind
    from toolkit.errors import ToolkitError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.api_key = args.api_key or os.environ.get("TOOLKIT_API_KEY") or None
    try:
        check_bind(args.host, args.api_key, args.insecure)
        _check_pool_flags(args)
        settings = _settings(args, args.model)
    except (ToolkitError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    serving = False

    def on_signal(signum: int, _: Any) -> None:
        if not serving:  # still loading: unwind now, the `with` blocks stop what has started
            raise KeyboardInterrupt
        stop.set()

    def install_handlers() -> None:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    install_handlers()
    with contextlib.ExitStack() as stack:
        try:
            worker = stack.enter_context(_start(settings, args))
            install_handlers()  # ray.init replaces the SIGTERM handler with one that exits at once
            embedder = None
            if args.embeddings_model:
                embedder = stack.enter_context(_start(_settings(args, args.embeddings_model)))
            app = create_app(worker, embedder, api_key=args.api_key, model_name=args.served_model_name,
                             limits=Limits(args.max_n, args.max_prompts, args.max_body_bytes),
                             allow_origins=args.allow_origin)
            server = stack.enter_context(BackgroundServer(app, args.host, args.port, access_log=args.access_log,
                                                          log_level="info"))
        except KeyboardInterrupt:
            return 130
        except ToolkitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if args.restart_on_crash:
            for handle in (worker, embedder):
                if handle is not None:
                    stack.callback(CrashWatcher(handle).start().stop)  # stopped before the workers shut down
        info = worker.info
        where = (f"{args.replicas} replicas on Ray, pids {worker.pids}" if args.replicas
                 else f"worker pid {info.pid}")
        print(f"serving {info.model} ({info.device}/{info.dtype}) at {server.url}/v1 ({where}); Ctrl-C to stop",
              flush=True)
        serving = True
        while not stop.wait(0.5):  # a timeout keeps the main thread responsive to signals
            pass
        print("shutting down", flush=True)
    return 0


def _check_pool_flags(args: argparse.Namespace) -> None:
    from toolkit.errors import InvalidRequestError

    if args.replicas is None:
        if args.ray_address or args.threads_per_replica:
            raise InvalidRequestError("--ray-address and --threads-per-replica need --replicas N")
        return
    if args.replicas < 1:
        raise InvalidRequestError(f"--replicas must be at least 1, not {args.replicas}")
    if args.engine != "worker":
        raise InvalidRequestError("--replicas serves worker replicas: it does not go with --engine inprocess")


def _start(settings: Settings, args: argparse.Namespace | None = None) -> Any:
    """A started handle (one worker, a pool of replicas, or the in-process engine); its context manager shuts it
    down. Without `args`: one worker (the embeddings model)."""
    if args is not None and args.engine == "inprocess":
        from toolkit.api.inprocess import InProcessWorker

        return InProcessWorker(settings).start()
    if args is not None and args.replicas is not None:
        from toolkit.pool.client import start_worker_pool

        return start_worker_pool(settings, args.replicas, ray_address=args.ray_address,
                                 num_cpus_per_replica=args.threads_per_replica)
    from toolkit.worker.client import start_model_worker

    return start_model_worker(settings)
