"""Turning streamed token ids into text: never half a UTF-8 character, and cut exactly at stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


PROMPT_CONTEXT = 5  # prompt tokens the window starts with (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)


class IncrementalDetokenizer:
    """Decodes a growing id list a window at a time (vLLM's prefix/read offsets), holding back text that ends
    in an incomplete character until the next token completes it.

    The window starts on the last prompt tokens, as in vLLM: SentencePiece tokenizers drop the leading space of
    the first token they decode, so without that context the first output word would lose its space.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True, prompt_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_token_ids[max(len(prompt_token_ids) - PROMPT_CONTEXT, 0) :])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: list[int]) -> str:
        """Append ids; return the text they complete (possibly empty)."""
        self.token_ids.extend(new_ids)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """At the end of a stream: whatever is still held back (an incomplete character decodes as U+FFFD)."""
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return full[len(prefix) :]


class StopStringMatcher:
    """Finds the first stop string in streamed text; holds back a possible partial match so no caller ever
    sees text past the cut."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, piece: str, final: bool = False) -> str:
        """Add decoded text; return what is safe to show now. After a stop string, `stopped` is True."""
        if self.stopped:
            return ""
        start = max(0, len(self.text) - self.holdback)
        self.text += piece
        cut = min((i for s in self.stops if (i := self.text.find(s, start)) >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
            final = True
        safe = len(self.text) if final else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted : safe]
        self.emitted = safe
        return out
