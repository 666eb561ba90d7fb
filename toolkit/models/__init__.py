"""Models: the registry (torch-free: names, tasks, where files are) and loading (weights and tokenizers).

The loading names are imported on first use, so `toolkit.models.resolve` works without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from toolkit.models.registry import DEFAULT_MODEL, EMBED_MODEL, KNOWN_MODELS, TINY_MODEL, ModelSpec, resolve

_LOADING = ("build_tiny_llama", "load", "load_tokenizer", "resolve_device", "resolve_dtype")

__all__ = ["DEFAULT_MODEL", "EMBED_MODEL", "KNOWN_MODELS", "TINY_MODEL", "ModelSpec", "resolve", *_LOADING]


def __getattr__(name: str) -> Any:
    if name in _LOADING:
        return getattr(importlib.import_module("toolkit.models.loading"), name)
    raise AttributeError(f"module 'toolkit.models' has no attribute {name!r}")
