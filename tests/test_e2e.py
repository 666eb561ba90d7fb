"""End to end on the embedded model: text through the worker equals model.generate in-process."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import EMBEDDED, tiny_settings
from toolkit import TokenGeneratorPipeline, models, start_model_worker

pytestmark = pytest.mark.slow

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    "The three primary colours are",
]


@pytest.fixture(scope="module")
def reference():
    return models.load(EMBEDDED, device="cpu", dtype="float32")


def test_greedy_through_the_worker_equals_model_generate(reference) -> None:
    model, tokenizer = reference
    settings = tiny_settings(model=EMBEDDED, num_threads=None)
    with start_model_worker(settings) as worker:
        assert (worker.info.model, worker.info.dtype) == (EMBEDDED, "float32")
        pipe = TokenGeneratorPipeline(worker)
        outs = pipe.generate_batch(PROMPTS, max_new_tokens=24, progress=False)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = pipe.tokenize(prompt)
        with torch.inference_mode():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        assert out.token_ids == ref, f"{prompt!r}: worker {out.token_ids} != generate {ref}"
        assert out.text == tokenizer.decode(ref, skip_special_tokens=True)
