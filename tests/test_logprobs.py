"""Engine pieces the OpenAI API needs: per-token logprobs and min_tokens, checked against the model itself."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import torch

from toolkit import models
from toolkit.engine.core import Engine
from toolkit.engine.sampling import token_logprobs
from toolkit.settings import Settings
from toolkit.worker.messages import GenerateRequest, SamplingParams, TokenDelta, TokenLogprob

PROMPT = [5, 17, 42, 99, 7, 3]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return models.load(models.TINY_MODEL, device="cpu", dtype="float32")


@pytest.fixture
def engine(tiny: tuple[Any, Any]) -> Engine:
    model, tokenizer = tiny
    settings = Settings(model=models.TINY_MODEL, device="cpu", dtype="float32", num_kv_blocks=64, block_size=8)
    return Engine(settings, model=model, tokenizer=tokenizer)


def _run(engine: Engine, *requests: GenerateRequest) -> dict[str, list[TokenDelta]]:
    out: dict[str, list[TokenDelta]] = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add(r)
    while engine.has_work:
        deltas, _ = engine.step()
        for d in deltas:
            out[d.request_id].append(d)
    return out


def test_logprobs_match_log_softmax_of_the_model(engine: Engine, tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    asks = GenerateRequest("a", PROMPT, 4, SamplingParams(logprobs=5))
    plain = GenerateRequest("b", PROMPT, 4)
    out = _run(engine, asks, plain)
    assert all(d.logprobs is None for d in out["b"])
    tokens = [t for d in out["a"] for t in d.token_ids]
    lps = [lp for d in out["a"] for lp in d.logprobs or []]
    assert len(lps) == len(tokens) == 4
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([PROMPT + tokens[:-1]])).logits[0, len(PROMPT) - 1 :].float()
    want = torch.log_softmax(logits, dim=-1)
    for i, (token, lp) in enumerate(zip(tokens, lps, strict=True)):
        assert lp.top_ids[0] == token  # greedy: the chosen token is the top-1
        assert lp.logprob == pytest.approx(float(want[i, token]), abs=1e-4)
        assert lp.top_ids == torch.topk(want[i], 5).indices.tolist()
        assert lp.top_logprobs == pytest.approx(torch.topk(want[i], 5).values.tolist(), abs=1e-4)
        assert sum(torch.tensor(lp.top_logprobs).exp().tolist()) <= 1.0 + 1e-6


def test_logprobs_zero_gives_the_chosen_token_only() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    out = token_logprobs(logits, [2, 0], [SamplingParams(logprobs=0), SamplingParams()])
    assert out[1] is None
    assert out[0] == TokenLogprob(float(torch.log_softmax(logits[0], -1)[2]), [], [])


def test_min_tokens_suppresses_eos_until_reached(engine: Engine) -> None:
    """Make the first greedy token an EOS; min_tokens=3 must produce 3 tokens, none of them EOS, before stopping."""
    probe = _run(engine, GenerateRequest("p", PROMPT, 1))["p"]
    first = probe[0].token_ids[0]
    engine.scheduler.eos_token_ids = frozenset({first})
    engine.runner.eos_token_ids = [first]
    stopped = _run(engine, GenerateRequest("s", PROMPT, 8))["s"]
    assert [t for d in stopped for t in d.token_ids] == [first] and stopped[-1].finish_reason == "stop"
    held = _run(engine, GenerateRequest("m", PROMPT, 8, min_tokens=3))["m"]
    tokens = [t for d in held for t in d.token_ids]
    assert len(tokens) >= 3 and first not in tokens[:3]


def test_min_tokens_also_holds_back_stop_token_ids(engine: Engine) -> None:
    first = _run(engine, GenerateRequest("p", PROMPT, 1))["p"][0].token_ids[0]
    out = _run(engine, GenerateRequest("m", PROMPT, 6, stop_token_ids=[first], min_tokens=2))["m"]
    tokens = [t for d in out for t in d.token_ids]
    assert len(tokens) >= 2 and first not in tokens[:2]


def test_logprobs_travel_in_token_deltas() -> None:
    delta = TokenDelta("r", [7], None, [TokenLogprob(-0.5, [7, 3], [-0.5, -1.5])])
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(delta), type=TokenDelta)
    assert back == delta
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(TokenDelta("r", [7])), type=TokenDelta).logprobs is None
