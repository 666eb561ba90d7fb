"""The request rules both sides of the process boundary apply, written once (pure Python, no torch).

The pipeline checks a request against the worker's `Ready` before sending it, so bad input fails in the caller;
the engine and its scheduler check it again on receipt, because anything can reach the worker's socket. Both
use these functions, so the two sides cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable

from toolkit.errors import InvalidRequestError


def max_sequence_tokens(max_model_len: int, kv_cache_tokens: int) -> int:
    """The longest a sequence (prompt + outputs) may grow.

    Every token but the newest needs a KV slot (the newest is sampled, not yet fed back), so a cache of
    `kv_cache_tokens` slots holds a sequence of one token more; `max_model_len` bounds it as well.
    """
    return min(max_model_len, kv_cache_tokens + 1)


def check_prompt_length(
    num_tokens: int, *, max_model_len: int, kv_cache_tokens: int, request_id: str | None = None
) -> None:
    """The one prompt-length rule: the prompt plus at least one new token must fit `max_sequence_tokens`."""
    where = f"request {request_id!r}: " if request_id is not None else ""
    if num_tokens < 1:
        raise InvalidRequestError(f"{where}the prompt is empty")
    if num_tokens + 1 > max_model_len:
        raise InvalidRequestError(
            f"{where}a prompt of {num_tokens} tokens leaves no room for a new token in max_model_len={max_model_len}"
        )
    if num_tokens + 1 > max_sequence_tokens(max_model_len, kv_cache_tokens):
        raise InvalidRequestError(
            f"{where}a prompt of {num_tokens} tokens does not fit: the KV cache holds {kv_cache_tokens} tokens in all"
        )


def check_token_ids(token_ids: Iterable[int], vocab_size: int, request_id: str | None = None) -> None:
    """Every id must index the model's embedding table; an id outside it would fail mid-forward for everyone."""
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        where = f"request {request_id!r}: " if request_id is not None else ""
        raise InvalidRequestError(f"{where}token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
