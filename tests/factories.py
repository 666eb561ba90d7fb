"""Custom model factories named by import path ("tests.factories:tiny") in worker tests.

Factory contract (see toolkit.models.load): `factory(device: str, dtype: str) -> (model, tokenizer)`, called with the
resolved device ("cpu", "cuda") and dtype name ("float32", "bfloat16", "float16"). Must be module-level so a spawned
worker can import it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from toolkit import models

HANG_AFTER_ENV = "TOOLKIT_TEST_HANG_AFTER_CALLS"


def tiny(device: str, dtype: str) -> tuple[Any, Any]:
    """The tiny test model, through the factory path."""
    return models.load(models.TINY_MODEL, device=device, dtype=dtype)


def raising(device: str, dtype: str) -> tuple[Any, Any]:
    """A factory that fails, to check the worker reports the user's own error message."""
    raise RuntimeError("factory exploded on purpose")


def hanging_forward(device: str, dtype: str) -> tuple[Any, Any]:
    """The tiny model whose forward never returns (after HANG_AFTER_ENV successful calls, default 0): hang tests."""
    model, tokenizer = tiny(device, dtype)
    allowed = int(os.environ.get(HANG_AFTER_ENV, "0"))
    calls = [0]

    def hang(module: Any, args: Any, kwargs: Any) -> None:
        calls[0] += 1
        while calls[0] > allowed:
            time.sleep(3600)

    model.model.embed_tokens.register_forward_pre_hook(hang, with_kwargs=True)
    return model, tokenizer
