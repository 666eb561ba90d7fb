"""Next-token choice: batched argmax for greedy rows, per-request seeded sampling for the rest.

Each sampling request owns a torch.Generator and draws exactly one uniform per token, so a seeded request gives the
same text whether it runs alone or in a crowded batch (and across preemption and recompute).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from toolkit.worker.messages import MAX_LOGPROBS, SamplingParams, TokenLogprob


def is_greedy(params: SamplingParams) -> bool:
    """temperature 0 (or top_k 1) leaves no choice: argmax."""
    return params.temperature <= 0.0 or params.top_k == 1


@dataclass(slots=True)
class Sampler:
    """Turns the rows of one step's logits into token ids; keeps one generator per sampling request."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    generators: dict[str, torch.Generator] = field(default_factory=dict)

    def sample(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]) -> list[int]:
        """logits [N, V] (any float dtype), one row per request → N token ids."""
        tokens = [0] * len(request_ids)
        greedy = [i for i, p in enumerate(params) if is_greedy(p)]
        if greedy:
            rows = logits if len(greedy) == len(params) else logits[greedy]
            for i, token in zip(greedy, rows.argmax(dim=-1).tolist(), strict=True):
                tokens[i] = token
        for i, p in enumerate(params):
            if not is_greedy(p):
                tokens[i] = sample_row(logits[i], p, self._generator(request_ids[i], p.seed))
        return tokens

    def release(self, request_id: str) -> None:
        """Forget a finished request's generator."""
        self.generators.pop(request_id, None)

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator:
        generator = self.generators.get(request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
            self.generators[request_id] = generator
        return generator


def token_logprobs(logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]) -> list[TokenLogprob | None]:
    """For the rows whose request asked: the chosen token's logprob and the top-k, from the raw logits (vLLM's
    default "raw_logprobs": before temperature, top-k/top-p and min_tokens masking). None for the other rows."""
    out: list[TokenLogprob | None] = [None] * len(tokens)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)
    k = min(max(params[i].logprobs or 0 for i in rows), MAX_LOGPROBS, logprobs.shape[-1])
    top_values, top_ids = torch.topk(logprobs, k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    chosen = logprobs.gather(1, torch.tensor([tokens[i] for i in rows], device=logprobs.device)[:, None])[:, 0]
    for j, i in enumerate(rows):
        n = min(params[i].logprobs or 0, k)
        out[i] = TokenLogprob(float(chosen[j]), top_ids[j, :n].tolist(), top_values[j, :n].tolist())
    return out


def suppress(logits: torch.Tensor, rows: list[tuple[int, list[int]]]) -> None:
    """Set the given token ids of the given rows to -inf in place (min_tokens: no EOS or stop token yet)."""
    for row, token_ids in rows:
        if token_ids:
            logits[row, token_ids] = float("-inf")


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Temperature, then top-k, then top-p, then inverse-CDF sampling with one uniform draw."""
    scaled = logits.float() / params.temperature
    candidates = _top_k(scaled, params.top_k)
    values = scaled if candidates is None else candidates[0]
    probs = torch.softmax(values, dim=-1)
    if params.top_p < 1.0:
        probs, order = torch.sort(probs, descending=True)
        probs = _top_p(probs, params.top_p)
        ids = order if candidates is None else candidates[1][order]
    else:
        ids = None if candidates is None else candidates[1]
    u = torch.rand((1,), generator=generator, device=probs.device, dtype=torch.float32)
    choice = _inverse_cdf(probs, u)
    return int(choice if ids is None else ids[choice])


def _top_k(scaled: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The k largest logits and their ids (sorted descending), or None when k is off or covers the vocabulary."""
    if k <= 0 or k >= scaled.shape[-1]:
        return None
    values, ids = torch.topk(scaled, k)
    return values, ids


def _top_p(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest head of the sorted distribution whose mass reaches top_p (always at least one token)."""
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    return sorted_probs.masked_fill(before >= top_p, 0.0)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> int:
    """Index where the running mass first exceeds u * total; the total renormalises after top-p."""
    cdf = torch.cumsum(probs, dim=-1)
    index = torch.searchsorted(cdf, u * cdf[-1], right=True)
    return min(int(index), probs.shape[-1] - 1)
