"""Checks on what a caller passes in, before anything is tokenized or sent to the worker."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from toolkit.errors import InvalidRequestError

ROLES = {"system", "user", "assistant", "tool"}


def is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool)


def kind(x: object) -> str:
    if isinstance(x, (list, tuple)) and x:
        return f"{type(x).__name__} of {type(x[0]).__name__}"
    return repr(x) if x is None or x == [] else type(x).__name__


def check_encodable(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"text is not valid Unicode (lone surrogate at {exc.start})") from None


def check_messages(messages: Sequence[dict[str, Any]]) -> None:
    for i, msg in enumerate(messages):
        if "role" not in msg or "content" not in msg:
            raise InvalidRequestError(f"message {i} must have 'role' and 'content' (got keys {sorted(msg)})")
        if msg["role"] not in ROLES:
            raise InvalidRequestError(f"message {i} has unknown role {msg['role']!r}; use one of {sorted(ROLES)}")
        if not isinstance(msg["content"], str):
            raise InvalidRequestError(f"message {i} content must be a str, not {type(msg['content']).__name__}")
        check_encodable(msg["content"])
    if not any(msg["content"].strip() for msg in messages):
        raise InvalidRequestError("every message is empty")


def check_stop(stop: str | Sequence[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequestError(f"stop must be a non-empty str or a list of them, not {stop!r}")
    return stops
