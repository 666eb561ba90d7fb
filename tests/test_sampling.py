"""Sampler: greedy is argmax, top-k / top-p restrict the support, and a seed fixes the draws whatever the batch."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from toolkit.engine.sampling import Sampler, is_greedy
from toolkit.worker.messages import SamplingParams

GREEDY = SamplingParams()


def _draws(params: SamplingParams, logits: torch.Tensor, n: int, request_id: str = "r") -> list[int]:
    sampler = Sampler()
    return [sampler.sample(logits[None], [request_id], [params])[0] for _ in range(n)]


def _logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


def test_greedy_rows_are_argmax() -> None:
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0))
    params = [GREEDY, SamplingParams(temperature=0.7, top_k=1), GREEDY, GREEDY, GREEDY, GREEDY]
    assert all(is_greedy(p) for p in params)
    got = Sampler().sample(logits, [f"r{i}" for i in range(6)], params)
    assert got == logits.argmax(dim=-1).tolist()


def test_greedy_rows_mixed_with_sampled_rows() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    params = [GREEDY, SamplingParams(temperature=1.0, seed=3), GREEDY]
    got = Sampler().sample(logits, ["a", "b", "c"], params)
    assert got[0] == int(logits[0].argmax()) and got[2] == int(logits[2].argmax())
    assert 0 <= got[1] < 50


def test_temperature_sampling_follows_the_distribution() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    counts = Counter(_draws(SamplingParams(temperature=1.0, seed=0), _logits_of(probs), 4000))
    for token, p in enumerate(probs):
        assert abs(counts[token] / 4000 - p) < 0.03, counts


def test_low_temperature_concentrates_on_the_top_token() -> None:
    logits = _logits_of([0.4, 0.35, 0.25])
    assert Counter(_draws(SamplingParams(temperature=0.01, seed=0), logits, 300))[0] == 300
    assert Counter(_draws(SamplingParams(temperature=1.0, seed=0), logits, 300))[0] < 200


def test_top_k_restricts_support() -> None:
    logits = torch.randn(500, generator=torch.Generator().manual_seed(2))
    top3 = set(torch.topk(logits, 3).indices.tolist())
    seen = set(_draws(SamplingParams(temperature=5.0, top_k=3, seed=1), logits, 300))
    assert seen == top3


@pytest.mark.parametrize(("top_p", "support"), [(0.7, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (0.4, {0})])
def test_top_p_keeps_the_smallest_head_reaching_p(top_p: float, support: set[int]) -> None:
    logits = _logits_of([0.5, 0.3, 0.15, 0.05])[[2, 0, 3, 1]]  # shuffled: ids 1, 3, 0, 2 hold .5, .3, .15, .05
    remap = {1: 0, 3: 1, 0: 2, 2: 3}
    seen = {remap[t] for t in _draws(SamplingParams(temperature=1.0, top_p=top_p, seed=4), logits, 400)}
    assert seen == support


def test_top_k_and_top_p_together() -> None:
    logits = _logits_of([0.4, 0.3, 0.2, 0.1])
    seen = set(_draws(SamplingParams(temperature=1.0, top_k=3, top_p=0.6, seed=5), logits, 300))
    assert seen == {0, 1}


def test_same_seed_same_tokens_alone_and_in_a_batch() -> None:
    gen = torch.Generator().manual_seed(6)
    steps = [torch.randn(5, 300, generator=gen) for _ in range(30)]
    mine = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    others = [GREEDY, SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.3), GREEDY]
    alone, crowded = Sampler(), Sampler()
    got_alone = [alone.sample(s[2:3], ["mine"], [mine])[0] for s in steps]
    ids = ["g", "s1", "mine", "rand", "g2"]
    params = [others[0], others[1], mine, others[2], others[3]]
    got_crowded = [crowded.sample(s, ids, params)[2] for s in steps]
    assert got_alone == got_crowded
    assert len(set(got_alone)) > 5  # it really sampled


def test_different_seeds_and_unseeded_requests_differ() -> None:
    logits = torch.zeros(1000)
    a = _draws(SamplingParams(temperature=1.0, seed=1), logits, 20)
    b = _draws(SamplingParams(temperature=1.0, seed=2), logits, 20)
    c = _draws(SamplingParams(temperature=1.0), logits, 20)
    d = _draws(SamplingParams(temperature=1.0), logits, 20)
    assert a == _draws(SamplingParams(temperature=1.0, seed=1), logits, 20)
    assert len({tuple(a), tuple(b), tuple(c), tuple(d)}) == 4


def test_generators_are_released() -> None:
    sampler = Sampler()
    sampler.sample(torch.zeros(2, 10), ["a", "b"], [SamplingParams(temperature=1.0, seed=1), GREEDY])
    assert set(sampler.generators) == {"a"}
    sampler.release("a")
    sampler.release("never-seen")
    assert sampler.generators == {}


def test_bfloat16_logits() -> None:
    logits = torch.randn(2, 100, generator=torch.Generator().manual_seed(7)).bfloat16()
    got = Sampler().sample(logits, ["a", "b"], [GREEDY, SamplingParams(temperature=1.0, top_k=5, seed=0)])
    assert got[0] == int(logits[0].float().argmax())
    assert got[1] in set(torch.topk(logits[1].float(), 5).indices.tolist())
