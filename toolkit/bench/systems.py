"""The systems the benchmark knows, and how each runs: in a spawned child process, so its memory is its own and
is all freed before the next one starts, and a crash or a missing feature fails that system, not the run."""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from .config import BenchConfig
from .records import SystemRun
from .systems_hf import run_hf_cb, run_hf_sequential, run_hf_static
from .systems_http import run_toolkit_http
from .systems_llamacpp import run_llama_cpp
from .systems_toolkit import run_toolkit, run_toolkit_inprocess, run_toolkit_no_cache, run_toolkit_ray
from .workloads import BenchRequest

RUNNERS: dict[str, Callable[[BenchConfig, Sequence[BenchRequest]], SystemRun]] = {
    "toolkit": run_toolkit,
    "toolkit-inprocess": run_toolkit_inprocess,
    "toolkit-http": run_toolkit_http,
    "toolkit-ray": run_toolkit_ray,
    "toolkit-no-cache": run_toolkit_no_cache,
    "hf-sequential": run_hf_sequential,
    "hf-static": run_hf_static,
    "hf-cb": run_hf_cb,
    "llama-cpp": run_llama_cpp,
}


def run_system(name: str, cfg: BenchConfig, requests: Sequence[BenchRequest]) -> SystemRun:
    """Run one system; any exception becomes SystemRun.error so the other systems still get measured."""
    try:
        return RUNNERS[name](cfg, requests)
    except Exception as exc:
        return SystemRun(name, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")


def probe_model(cfg: BenchConfig) -> dict[str, Any]:
    """The model's parameter counts (for model FLOPs) and where it runs, without keeping the weights."""
    import torch

    from toolkit import models

    from .roofline import param_counts

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = models.resolve_device(cfg.device)
    model, _ = models.load(cfg.model, device, cfg.dtype)
    num_params, lm_head_params = param_counts(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return {"num_params": num_params, "lm_head_params": lm_head_params, "device": device, "device_name": name,
            "torch_threads": torch.get_num_threads(), "weights_mib": weight_bytes / 2**20,
            "kv_cache_mib": cfg.kv_cache_gib * 1024}


def isolated(cfg: BenchConfig, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a spawned child when cfg.isolate (the result comes back pickled), else right here."""
    if not cfg.isolate:
        return fn(*args)
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, fn, args), name=f"bench-{getattr(fn, '__name__', 'fn')}")
    child.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"benchmark child died without a result (exit code {child.exitcode})") from None
    finally:
        receive.close()
    child.join()
    if isinstance(result, _ChildError):
        raise RuntimeError(result.text)
    return result


class _ChildError:
    def __init__(self, text: str) -> None:
        self.text = text


def _child(send: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        result = fn(*args)
    except BaseException as exc:
        result = _ChildError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
    send.send(result)
    send.close()
