"""ModelRunner: a ragged batch of prefill chunks and decodes over the paged cache gives plain-HF logits."""

from __future__ import annotations

import copy
import random
from collections import OrderedDict

import pytest
import torch
from transformers import AttentionInterface

from tests.factories import SMALL, small_model
from toolkit.engine.block_manager import BlockManager
from toolkit.engine.request import Sequence
from toolkit.engine.runner import ModelRunner
from toolkit.engine.scheduler import ScheduledSequence
from toolkit.layers.attention import ATTN_IMPLEMENTATION, paged_attention
from toolkit.layers.kv_cache import num_blocks_for_budget
from toolkit.models import build_tiny_llama
from toolkit.worker.messages import GenerateRequest

BLOCK = 4


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return build_tiny_llama().eval()


def _seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence.from_request(GenerateRequest(rid, tokens, max_new_tokens=8))


def _schedule(blocks: BlockManager, seq: Sequence, n: int) -> ScheduledSequence:
    blocks.allocate(seq, n)
    return ScheduledSequence(seq, seq.num_computed_tokens, n)


def _reference_logits(model: torch.nn.Module, seq: Sequence, end: int) -> torch.Tensor:
    """Plain HF forward of the sequence alone: logits of the token at position end - 1."""
    ids = torch.tensor([seq.token_ids[:end]], device=model.device)
    return model(input_ids=ids).logits[0, -1].float()


def _run_step(runner: ModelRunner, step: list[ScheduledSequence]) -> dict[str, torch.Tensor]:
    """Logits per sampling sequence, keyed by request id; then advance computed tokens as the scheduler would."""
    with torch.inference_mode():
        inputs = runner.prepare(step)
        logits = runner.forward(inputs)
    for s in step:
        s.seq.num_computed_tokens += s.num_tokens
    return {s.seq.request_id: logits[i].float() for i, s in enumerate(inputs.sampling)}


def _check_mixed_steps(model: torch.nn.Module, vocab: int, atol: float) -> None:
    """Step 1: whole prompts + a first chunk + a 1-token-short chunk. Step 2: decodes of contexts 3..14 (two decode
    groups), a last 1-token prompt chunk, and a chunk over a cached prefix."""
    rng = random.Random(0)
    blocks = BlockManager(64, BLOCK)
    order = list(blocks.free_queue)
    rng.shuffle(order)
    blocks.free_queue = OrderedDict.fromkeys(order)  # non-contiguous block tables
    reference = copy.deepcopy(model)  # plain HF: the runner switches `model` to its attention for good
    runner = ModelRunner(model, num_blocks=64, block_size=BLOCK, device=model.device, dtype=torch.float32)
    prompts = {"a": 7, "b": 13, "c": 22, "d": 9, "e": 2}
    seqs = {k: _seq(k, [rng.randrange(vocab) for _ in range(n)]) for k, n in prompts.items()}
    step1 = [_schedule(blocks, seqs["a"], 7), _schedule(blocks, seqs["b"], 13), _schedule(blocks, seqs["c"], 10),
             _schedule(blocks, seqs["d"], 8), _schedule(blocks, seqs["e"], 2)]
    got = _run_step(runner, step1)
    assert sorted(got) == ["a", "b", "e"]
    for k in ("a", "b", "e"):
        seqs[k].token_ids.append(int(got[k].argmax()))
    step2 = [_schedule(blocks, seqs["e"], 1), _schedule(blocks, seqs["a"], 1), _schedule(blocks, seqs["b"], 1),
             _schedule(blocks, seqs["d"], 1), _schedule(blocks, seqs["c"], 12)]
    assert [len(g.blocks) for g in runner.prepare(step2).batch.decodes] == [4 * 3, 1]  # ctx 14, 9, 8 | ctx 3
    got.update(_run_step(runner, step2))
    ends = {"a": 8, "b": 14, "c": 22, "d": 9, "e": 3}
    for k, end in ends.items():
        torch.testing.assert_close(got[k], _reference_logits(reference, seqs[k], end), atol=atol, rtol=0)


def test_ragged_batch_matches_plain_forward(llama: torch.nn.Module) -> None:
    with torch.inference_mode():
        _check_mixed_steps(llama, llama.config.vocab_size, atol=1e-4)


@pytest.mark.parametrize(
    ("family", "extra"),
    [("qwen2", {}), ("qwen3", {"head_dim": 16}), ("mistral", {"sliding_window": 128}),
     ("llama", {"num_key_value_heads": 4})],
    ids=["qwen2", "qwen3", "mistral", "llama-mha"],
)
def test_other_families_run_unchanged(family: str, extra: dict[str, object]) -> None:
    with torch.inference_mode():
        _check_mixed_steps(small_model(family, **extra), SMALL["vocab_size"], atol=1e-4)


def test_attention_is_set_once_and_hf_generate_still_works(llama: torch.nn.Module) -> None:
    """The runner switches the model's attention when built, not per forward; generate falls back to SDPA."""
    blocks = BlockManager(16, BLOCK)
    runner = ModelRunner(llama, num_blocks=16, block_size=BLOCK)
    assert llama.config._attn_implementation == ATTN_IMPLEMENTATION
    seq = _seq("x", [5, 6, 7, 8, 9])
    out_tokens = []
    for _ in range(4):
        n = seq.num_tokens - seq.num_computed_tokens
        scheduled = _schedule(blocks, seq, n)
        sampled = runner.execute(_output([scheduled]))
        seq.num_computed_tokens += n
        seq.token_ids.append(sampled["x"])
        out_tokens.append(sampled["x"])
    assert llama.config._attn_implementation == ATTN_IMPLEMENTATION
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        expected = build_tiny_llama().eval().generate(prompt, max_new_tokens=4, do_sample=False)[0, 5:].tolist()
        after = llama.generate(prompt, max_new_tokens=4, do_sample=False)[0, 5:].tolist()
    assert out_tokens == expected == after


def test_hf_builds_no_mask_and_sliding_window_is_guarded(llama: torch.nn.Module) -> None:
    masks: list[object] = []

    def spy(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: object,
            **kwargs: object) -> tuple[torch.Tensor, None]:
        masks.append(mask)
        return paged_attention(module, q, k, v, mask, **kwargs)

    AttentionInterface.register(ATTN_IMPLEMENTATION, spy)
    try:
        _check_mixed_steps(llama, llama.config.vocab_size, atol=1e-4)
        with pytest.raises(NotImplementedError, match="sliding window"):
            mistral = small_model("mistral", sliding_window=8)
            _check_mixed_steps(mistral, SMALL["vocab_size"], 1e-4)
    finally:
        AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    assert masks and all(m is None for m in masks)


def test_bfloat16_close_to_float32(llama: torch.nn.Module) -> None:
    model = build_tiny_llama().eval().to(torch.bfloat16)
    blocks = BlockManager(16, BLOCK)
    runner = ModelRunner(model, num_blocks=16, block_size=BLOCK, dtype="bfloat16")
    seq = _seq("x", list(range(10, 30)))
    assert _run_step(runner, [_schedule(blocks, seq, 12)]) == {}  # a first chunk samples nothing
    prefill = _run_step(runner, [_schedule(blocks, seq, 8)])["x"]
    seq.token_ids.append(int(prefill.argmax()))
    decode = _run_step(runner, [_schedule(blocks, seq, 1)])["x"]
    with torch.inference_mode():
        torch.testing.assert_close(prefill, _reference_logits(llama, seq, 20), atol=0.05, rtol=0.05)
        torch.testing.assert_close(decode, _reference_logits(llama, seq, 21), atol=0.05, rtol=0.05)
    assert runner.cache.key[0].dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ragged_batch_on_cuda() -> None:
    with torch.inference_mode():
        _check_mixed_steps(build_tiny_llama().eval().cuda(), 49152, atol=1e-3)
        qwen3 = small_model("qwen3", head_dim=16).cuda()
        _check_mixed_steps(qwen3, SMALL["vocab_size"], atol=1e-3)


def test_num_blocks_for_budget(llama: torch.nn.Module) -> None:
    # 2 layers x (K, V) x 2 kv heads x 16 head dim x 16 tokens x 4 bytes = 8 KiB a block
    assert num_blocks_for_budget(llama.config, 16, torch.float32, 1 / 1024) == 128
    assert num_blocks_for_budget(llama.config, 16, "bfloat16", 1 / 1024) == 256


def _output(scheduled: list[ScheduledSequence]) -> object:
    from toolkit.engine.scheduler import SchedulerOutput

    return SchedulerOutput(scheduled, [], sum(s.num_tokens for s in scheduled), 0)
