"""Model loading: one place that turns a model name into (model, tokenizer), for the worker and for references."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import InvalidRequestError, ModelNotFoundError
from toolkit.models.registry import DEFAULT_MODEL, ModelSpec, resolve

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    """'auto' picks CUDA when torch sees it; an explicit CUDA request without CUDA fails here, not mid-load."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequestError(f"device {device!r} requested but torch.cuda.is_available() is False")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' never picks a type the device would emulate: float32 on CPU and MPS (the exact reference, even where
    the CPU has native bfloat16: that stays an explicit choice); on CUDA bfloat16 where the GPU does it natively
    (compute capability 8.0+), else float16 where native, else float32."""
    from toolkit.engine import hardware

    if dtype == "auto":
        resolved = resolve_device(device)
        if not resolved.startswith("cuda"):
            return torch.float32
        return next((t for t in (torch.bfloat16, torch.float16) if hardware.native_dtype(t, resolved)), torch.float32)
    if dtype not in _DTYPES:
        raise InvalidRequestError(f"unknown dtype {dtype!r}: use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load(name: str, device: str = "cpu", dtype: str = "float32", cache_dir: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer): eval mode, no grads, on device/dtype; the same weights the worker serves."""
    spec = resolve(name)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if spec.kind == "factory":
        model, tokenizer = _load_factory(spec, device, str(torch_dtype).removeprefix("torch."))
    elif spec.kind == "gguf":
        model, tokenizer = _load_gguf(spec, cache_dir)
    elif spec.kind == "tiny":
        model, tokenizer = build_tiny_llama(), load_tokenizer(DEFAULT_MODEL, cache_dir)
    else:
        model, tokenizer = _load_pretrained(spec, torch_dtype)
    model = model.to(device=device, dtype=torch_dtype).eval().requires_grad_(False)
    return model, tokenizer


def load_tokenizer(name: str, cache_dir: str | None = None) -> Any:
    """Only the tokenizer (no weights): what the parent process needs to encode prompts and decode tokens."""
    from transformers import AutoTokenizer

    spec = resolve(name)
    if spec.kind == "factory":
        return _load_factory(spec, "cpu", "float32")[1]
    if spec.kind in ("gguf", "tiny"):
        cached = _cache_path(DEFAULT_MODEL, cache_dir)
        if _cache_valid(cached, Path(spec.source)):
            return AutoTokenizer.from_pretrained(cached)
        gguf = Path(spec.source)
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return _wrap_hub_errors(spec, lambda: AutoTokenizer.from_pretrained(spec.source, **_hub_kwargs(spec)))


def build_tiny_llama() -> Any:
    """A 2-layer GQA Llama with SmolLM2's vocab and seed-0 weights: identical on every load, built in about a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.1, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    return model


# ---- loaders -------------------------------------------------------------------------------------


def _load_factory(spec: ModelSpec, device: str, dtype: str) -> tuple[Any, Any]:
    """Call the user's factory; its own exceptions propagate untouched so the user sees their message."""
    module, _, attr = spec.source.partition(":")
    factory: Callable[..., Any] | None = getattr(importlib.import_module(module), attr, None)
    if not callable(factory):
        raise ModelNotFoundError(f"factory {spec.source!r}: {module} has no callable {attr!r}")
    result = factory(device, dtype)
    if isinstance(result, (ModelSpec, str)):
        name = result.name if isinstance(result, ModelSpec) else result
        return load(name, device, dtype)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ModelNotFoundError(f"factory {spec.source!r} must return (model, tokenizer), got {type(result).__name__}")
    return result


def _load_pretrained(spec: ModelSpec, torch_dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    auto = AutoModel if spec.task == "embed" else AutoModelForCausalLM
    kwargs = _hub_kwargs(spec)
    return _wrap_hub_errors(spec, lambda: (
        auto.from_pretrained(spec.source, dtype=torch_dtype, **kwargs),
        AutoTokenizer.from_pretrained(spec.source, **kwargs),
    ))


def _hub_kwargs(spec: ModelSpec) -> dict[str, Any]:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")
    return {"local_files_only": True} if spec.kind == "hub" and offline else {}


def _wrap_hub_errors(spec: ModelSpec, fn: Callable[[], Any]) -> Any:
    """Hub and file failures become one clear ModelNotFoundError (offline: nothing is fetched, nothing hangs)."""
    try:
        return fn()
    except (OSError, ValueError, KeyError) as exc:
        where = "the Hugging Face Hub (needs internet, or a cached copy with HF_HUB_OFFLINE=1)"
        where = where if spec.kind == "hub" else f"local directory {spec.source}"
        raise ModelNotFoundError(f"could not load {spec.name!r} from {where}: {exc}") from exc


# ---- the converted-GGUF cache ----------------------------------------------------------------------


def _cache_path(name: str, cache_dir: str | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "toolkit"
    return root / name


def _stamp(gguf: Path) -> dict[str, Any]:
    stat = gguf.stat()
    return {"source": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cache_valid(cached: Path, gguf: Path) -> bool:
    """The rename is atomic, so a dir with a matching stamp is complete; a changed GGUF makes it stale."""
    try:
        return json.loads((cached / "toolkit-source.json").read_text()) == _stamp(gguf)
    except (OSError, ValueError):
        return False


def _load_gguf(spec: ModelSpec, cache_dir: str | None) -> tuple[Any, Any]:
    """Load the float copy from the cache; convert the GGUF (slow, once) when there is none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, cached = Path(spec.source), _cache_path(spec.name, cache_dir)
    if _cache_valid(cached, gguf):
        return AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32), AutoTokenizer.from_pretrained(cached)
    model, tokenizer = _convert_gguf(gguf)
    _write_cache(model, tokenizer, cached, gguf)
    return model, tokenizer


def _convert_gguf(gguf: Path) -> tuple[Any, Any]:
    """Dequantize, then copy the weights into a plain model: a GGUF-quantized model refuses save_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def _write_cache(model: Any, tokenizer: Any, cached: Path, gguf: Path) -> None:
    """Write to a temp dir and rename: two workers converting at once never leave a half-written copy."""
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", dir=cached.parent))
        tmp.chmod(0o755)
    except OSError:
        return  # unwritable cache: serve the converted model, convert again next time
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "toolkit-source.json").write_text(json.dumps(_stamp(gguf)))
        if cached.exists() and not _cache_valid(cached, gguf):
            shutil.rmtree(cached, ignore_errors=True)
        os.rename(tmp, cached)
    except OSError:
        pass  # another process won the rename (or the disk is full): its copy, or none, is used next time
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
