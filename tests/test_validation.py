"""One prompt-length rule: the pipeline (before sending) and the scheduler (on receipt) accept the same prompts,
and a prompt at the limit really gets its one new token."""

from __future__ import annotations

import pytest

from toolkit.engine.block_manager import BlockManager
from toolkit.engine.scheduler import TokenGenerationScheduler
from toolkit.errors import InvalidRequestError
from toolkit.validation import check_prompt_length, check_token_ids, max_sequence_tokens
from toolkit.worker.messages import GenerateRequest


def accepted(n: int, max_model_len: int, kv_cache_tokens: int) -> bool:
    try:
        check_prompt_length(n, max_model_len=max_model_len, kv_cache_tokens=kv_cache_tokens)
    except InvalidRequestError:
        return False
    return True


def scheduler(num_blocks: int, block_size: int, max_model_len: int) -> TokenGenerationScheduler:
    return TokenGenerationScheduler(BlockManager(num_blocks, block_size), max_batch_size=4, max_batch_tokens=64,
                                    max_model_len=max_model_len, eos_token_ids=[])


def run(sched: TokenGenerationScheduler, prompt_len: int) -> list[int]:
    """Add one request, step it to the end with token 7 sampled each time; its output tokens."""
    seq = sched.add(GenerateRequest("r", list(range(1, prompt_len + 1)), max_new_tokens=1000))
    while sched.has_work:
        out = sched.schedule()
        sched.update(out, {s.seq.request_id: 7 for s in out.scheduled if s.samples})
    return seq.output_token_ids


@pytest.mark.parametrize(("max_model_len", "num_blocks", "block_size"), [(16, 8, 4), (100, 2, 4), (9, 2, 4)],
                         ids=["model-limit", "cache-limit", "equal"])
def test_pipeline_and_scheduler_accept_the_same_prompts(max_model_len: int, num_blocks: int, block_size: int) -> None:
    kv = num_blocks * block_size
    for n in range(0, max(max_model_len, kv) + 3):
        sched = scheduler(num_blocks, block_size, max_model_len)
        try:
            sched.add(GenerateRequest("r", list(range(1, n + 1)), max_new_tokens=4))
            scheduler_accepts = True
        except InvalidRequestError:
            scheduler_accepts = False
        assert scheduler_accepts == accepted(n, max_model_len, kv), n


@pytest.mark.parametrize(("max_model_len", "num_blocks", "block_size"), [(16, 8, 4), (100, 2, 4)],
                         ids=["model-limit", "cache-limit"])
def test_the_longest_accepted_prompt_gets_exactly_one_token(max_model_len: int, num_blocks: int,
                                                             block_size: int) -> None:
    kv = num_blocks * block_size
    longest = max(n for n in range(1, max_model_len + kv) if accepted(n, max_model_len, kv))
    assert longest + 1 == max_sequence_tokens(max_model_len, kv)
    assert run(scheduler(num_blocks, block_size, max_model_len), longest) == [7]
    shorter = run(scheduler(num_blocks, block_size, max_model_len), longest - 3)
    assert len(shorter) == 4  # every request stops at the same limit


@pytest.mark.parametrize(
    ("n", "message"),
    [(0, "the prompt is empty"), (16, "no room for a new token in max_model_len=16"),
     (9, "the KV cache holds 8 tokens in all")],
)
def test_refusals_name_the_limit(n: int, message: str) -> None:
    limit = 16 if n != 9 else 100
    with pytest.raises(InvalidRequestError, match=message):
        check_prompt_length(n, max_model_len=limit, kv_cache_tokens=8, request_id="r-1")


def test_token_ids_must_index_the_vocabulary() -> None:
    check_token_ids([0, 5, 99], 100)
    for bad in ([100], [-1], [3, 10**9]):
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            check_token_ids(bad, 100)
