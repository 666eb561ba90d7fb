"""SamplingParams: one request's generation parameters as one object, for per-prompt parameters in a batch.

As vLLM's `LLM.generate(prompts, sampling_params)`, `generate_batch` takes one SamplingParams for every prompt or
a list with one per prompt; the names are the pipeline's keyword parameters (transformers' `max_new_tokens`).
Values are checked where every request is checked: `TokenGeneratorPipeline.build_request`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from toolkit.errors import InvalidRequestError
from toolkit.pipeline.inputs import kind


@dataclass(frozen=True)
class SamplingParams:
    """How to generate for one prompt; the defaults are those of `TokenGeneratorPipeline.generate`."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    ignore_eos: bool = False
    stop_token_ids: Sequence[int] = ()

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword parameters of `generate` / `stream`: `pipe.generate(prompt, **params.as_kwargs())`."""
        return asdict(self)


FIELDS = frozenset(f.name for f in fields(SamplingParams))

PerPrompt = SamplingParams | Mapping[str, Any]


def per_prompt_params(
    num_prompts: int, sampling_params: PerPrompt | Sequence[PerPrompt] | None, common: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The keyword parameters of each prompt: `common` for all, or from `sampling_params` (one, or one per prompt).

    A dict entry is laid over `common`; a SamplingParams entry is complete, so it cannot be mixed with `common`.
    """
    if sampling_params is None:
        return [dict(common)] * num_prompts
    if isinstance(sampling_params, (SamplingParams, Mapping)):
        entries: list[Any] = [sampling_params] * num_prompts
    elif isinstance(sampling_params, Sequence) and not isinstance(sampling_params, str):
        entries = list(sampling_params)
        if len(entries) != num_prompts:
            raise InvalidRequestError(f"sampling_params has {len(entries)} entries for {num_prompts} prompts")
    else:
        raise InvalidRequestError(f"sampling_params must be a SamplingParams, a dict or a list of them, not "
                                  f"{kind(sampling_params)}")
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, SamplingParams):
            if common:
                raise InvalidRequestError(f"keyword parameters {sorted(common)} cannot be combined with SamplingParams "
                                          "objects: set them in the SamplingParams")
            out.append(entry.as_kwargs())
        elif isinstance(entry, Mapping):
            unknown = sorted(set(entry) - FIELDS)
            if unknown:
                raise InvalidRequestError(f"sampling_params[{i}]: unknown parameters {unknown}; use {sorted(FIELDS)}")
            out.append({**common, **entry})
        else:
            raise InvalidRequestError(f"sampling_params[{i}] must be a SamplingParams or a dict, not {kind(entry)}")
    return out
