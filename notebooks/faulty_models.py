"""Model factories that fail on purpose, for notebook 07: `Settings(model="faulty_models:hangs_on_token")`.

A factory is `factory(device, dtype) -> (model, tokenizer)` (see toolkit.models.load). The spawned worker imports
this module by name, so it lives beside the notebooks: the kernel's working directory is on the path it passes on.
"""

from __future__ import annotations

import time
from typing import Any

from toolkit import models

HANG_TOKEN = 4242  # a forward whose input holds this token id never returns


def hangs_on_token(device: str, dtype: str) -> tuple[Any, Any]:
    """The tiny model, except that a forward over HANG_TOKEN blocks forever, as a deadlocked kernel would."""
    model, tokenizer = models.load(models.TINY_MODEL, device=device, dtype=dtype)

    def block(module: Any, args: Any) -> None:
        if bool((args[0] == HANG_TOKEN).any()):
            while True:
                time.sleep(3600)  # releases the GIL, as a stuck native call does: the heartbeat thread runs on

    model.model.embed_tokens.register_forward_pre_hook(block)
    return model, tokenizer


def fails_to_load(device: str, dtype: str) -> tuple[Any, Any]:
    """A factory that raises while loading, as one whose weights file is missing would."""
    weights = "checkpoints/my-model/model.safetensors"
    raise FileNotFoundError(f"no weights at {weights}")
