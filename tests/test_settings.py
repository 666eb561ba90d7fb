"""Settings: typed, env-overridable, picklable, and strict about bad values."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from toolkit import Settings


def test_defaults_are_the_documented_ones() -> None:
    s = Settings()
    assert (s.model, s.device, s.dtype) == ("smollm2-135m-instruct", "auto", "auto")
    assert s.max_batch_size == 32 and s.max_batch_tokens == 512


def test_every_field_reads_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLKIT_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("TOOLKIT_DEVICE", "cuda:1")
    monkeypatch.setenv("TOOLKIT_RESTART_ON_HANG", "true")
    s = Settings()
    assert (s.max_batch_size, s.device, s.restart_on_hang) == (7, "cuda:1", True)
    assert Settings(max_batch_size=3).max_batch_size == 3  # explicit beats environment


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", -1),
        ("max_batch_tokens", 0),
        ("block_size", 0),
        ("kv_cache_gib", -0.5),
        ("max_queue_size", 0),
        ("device", "tpu"),
        ("device", "cuda:x"),
        ("dtype", "int3"),
        ("hang_timeout_s", 0),
        ("step_timeout_s", -1.0),
        ("model", ""),
    ],
)
def test_invalid_values_are_rejected_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**{field: value})
    assert field in str(info.value)


def test_invalid_environment_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLKIT_BLOCK_SIZE", "-4")
    with pytest.raises(ValidationError, match="block_size"):
        Settings()


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="max_batch_sise"):
        Settings(max_batch_sise=4)


def test_pickles_and_replaces() -> None:
    s = Settings(model="tiny-random-llama")
    assert pickle.loads(pickle.dumps(s)) == s
    t = s.replace(max_batch_size=2)
    assert (t.max_batch_size, t.model, s.max_batch_size) == (2, "tiny-random-llama", 32)
    with pytest.raises(ValidationError):
        s.replace(max_batch_size=0)
