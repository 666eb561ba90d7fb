"""Custom model factories named by import path ("tests.factories:tiny") in worker tests.

Factory contract (see toolkit.models.load): `factory(device: str, dtype: str) -> (model, tokenizer)`, called with the
resolved device ("cpu", "cuda") and dtype name ("float32", "bfloat16", "float16"). Must be module-level so a spawned
worker can import it.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

from toolkit import models

HANG_AFTER_ENV = "TOOLKIT_TEST_HANG_AFTER_CALLS"
SLEEP_ENV = "TOOLKIT_TEST_SLEEP_S"
POISON_TOKEN = 4242  # poisoned(): a forward whose input holds this id raises
SLIDING_WINDOW = 24  # sliding_window_mistral(): its attention window, in tokens
_kept: list[Any] = []
# a two-layer model of any HF family (grouped-query attention), for tests that compare our layers with HF's
SMALL = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def tiny(device: str, dtype: str) -> tuple[Any, Any]:
    """The tiny test model, through the factory path."""
    return models.load(models.TINY_MODEL, device=device, dtype=dtype)


def with_mp_lock(device: str, dtype: str) -> tuple[Any, Any]:
    """The tiny model, after making a multiprocessing lock in the worker as tqdm does for its first progress bar."""
    import multiprocessing

    _kept.append(multiprocessing.RLock())  # in a spawned child: a named semaphore, registered with the tracker
    return tiny(device, dtype)


def raising(device: str, dtype: str) -> tuple[Any, Any]:
    """A factory that fails, to check the worker reports the user's own error message."""
    raise RuntimeError("factory exploded on purpose")


def hanging_forward(device: str, dtype: str) -> tuple[Any, Any]:
    """The tiny model whose forward never returns (after HANG_AFTER_ENV successful calls, default 0): hang tests."""
    model, tokenizer = tiny(device, dtype)
    allowed = int(os.environ.get(HANG_AFTER_ENV, "0"))
    calls = [0]

    def hang(module: Any, args: Any, kwargs: Any) -> None:
        calls[0] += 1
        while calls[0] > allowed:
            time.sleep(3600)

    model.model.embed_tokens.register_forward_pre_hook(hang, with_kwargs=True)
    return model, tokenizer


def slow_forward(device: str, dtype: str) -> tuple[Any, Any]:
    """The tiny model whose forward number HANG_AFTER_ENV + 1 (default the first) sleeps SLEEP_ENV seconds, once."""
    model, tokenizer = tiny(device, dtype)
    slow_call = int(os.environ.get(HANG_AFTER_ENV, "0")) + 1
    seconds = float(os.environ.get(SLEEP_ENV, "0"))
    calls = [0]

    def sleep(module: Any, args: Any) -> None:
        calls[0] += 1
        if calls[0] == slow_call:
            time.sleep(seconds)  # releases the GIL, as a long torch kernel does

    model.model.embed_tokens.register_forward_pre_hook(sleep)
    return model, tokenizer


def poisoned(device: str, dtype: str) -> tuple[Any, Any]:
    """The tiny model, except that any forward whose input holds POISON_TOKEN raises ValueError."""
    model, tokenizer = tiny(device, dtype)

    def check(module: Any, args: Any) -> None:
        if bool((args[0] == POISON_TOKEN).any()):
            raise ValueError(f"poisoned token {POISON_TOKEN} in the input")

    model.model.embed_tokens.register_forward_pre_hook(check)
    return model, tokenizer


def sliding_window_mistral(device: str, dtype: str) -> tuple[Any, Any]:
    """A 2-layer Mistral (SmolLM2's vocab, seed-0 weights) attending over a window of SLIDING_WINDOW tokens."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, sliding_window=SLIDING_WINDOW, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MistralForCausalLM(config)
    model.generation_config.eos_token_id = 2
    return model, models.load_tokenizer(models.DEFAULT_MODEL)


SPM_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there! Streaming text one token at a time.",
    "Déjà vu: a naïve café, emojis 🧪🚀 and 中文字符.",
    "Numbers 123 and 4567, tabs\tand newlines.",
]


def sentencepiece_tokenizer(directory: Path) -> Any:
    """A Llama-style SentencePiece tokenizer (BPE, byte fallback, adds BOS), trained offline here in ~0.1 s."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_TEXT * 20), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return LlamaTokenizer.from_pretrained(directory, add_bos_token=True)


FAMILIES = ("llama", "qwen2", "qwen3", "mistral")  # the HF families small_model builds (and our layers must run)


def small_model(family: str, **extra: object) -> Any:
    """A SMALL model of `family` (one of FAMILIES; `extra` overrides its config), seeded, in eval mode and frozen
    (as the engine serves a model)."""
    import torch
    import transformers

    name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[family]
    config = getattr(transformers, f"{name}Config")(**{**SMALL, **extra})
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForCausalLM")(config).eval().requires_grad_(False)
