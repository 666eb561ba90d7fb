"""Incremental detokenization and stop strings, against the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit import models
from toolkit.pipeline.detokenizer import REPLACEMENT, IncrementalDetokenizer, StopStringMatcher


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer("smollm2-135m-instruct")


TEXTS = [
    "Hello, world! Plain ASCII text.",
    "Émojis 🧪🚀 and accents: déjà vu, naïve, Ærø",
    "中文字符和日本語のテキスト",
    "🏳️‍🌈👩‍👩‍👧‍👦 zero-width joiners",
    "tabs\tand\nnewlines  double  spaces",
]


def stream_text(tokenizer, text: str) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [detok.add([i]) for i in ids]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_rebuilds_the_text_without_half_characters(tokenizer, text: str) -> None:
    pieces = stream_text(tokenizer, text)
    assert "".join(pieces) == text
    assert not any(REPLACEMENT in p for p in pieces)
    assert sum(1 for p in pieces if p) > 1  # really incremental


@settings(max_examples=40, deadline=None)
@given(st.text(min_size=1, max_size=60))
def test_any_text_round_trips_and_is_valid_utf8(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    expected = tokenizer.decode(ids)
    pieces = stream_text(tokenizer, text)
    assert "".join(pieces) == expected
    for p in pieces:
        p.encode("utf-8")  # no lone surrogates ever leave the detokenizer


def test_stop_string_across_chunks_is_cut_exactly() -> None:
    matcher = StopStringMatcher(["STOP"])
    shown = [matcher.feed(p) for p in ["abc S", "T", "OP tail"]]
    assert "".join(shown) == "abc "
    assert matcher.stopped
    assert all("S" not in s for s in shown)


def test_stop_string_at_the_very_start() -> None:
    matcher = StopStringMatcher(["\n", "###"])
    assert matcher.feed("###rest") == ""
    assert matcher.stopped and matcher.text == ""


def test_holdback_is_released_at_the_end() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abcST") == "ab"
    assert matcher.feed("", final=True) == "cST"
    assert not matcher.stopped


def test_earliest_of_several_stop_strings_wins() -> None:
    matcher = StopStringMatcher(["world", "lo"])
    assert matcher.feed("hello world", final=False) + matcher.feed("", final=True) == "hel"


# ---- SentencePiece: the first output token keeps its leading space --------------------------------------------


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory):
    from tests.factories import sentencepiece_tokenizer

    return sentencepiece_tokenizer(tmp_path_factory.mktemp("spm"))


def split_at_words(tokenizer, text: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, output ids) for every cut just before a word-initial piece ('▁...')."""
    ids = tokenizer(text).input_ids  # with BOS, as a prompt would be encoded
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return [(ids[:k], ids[k:]) for k in range(2, len(ids)) if pieces[k].startswith("▁")]


@pytest.mark.parametrize("text", ["Hello world, hello there!", "The quick brown fox: déjà vu 🧪 café."])
def test_sentencepiece_stream_keeps_the_first_space(spm, text: str) -> None:
    cuts = split_at_words(spm, text)
    assert len(cuts) >= 3
    for prompt, output in cuts:
        detok = IncrementalDetokenizer(spm, prompt_token_ids=prompt)
        streamed = "".join(detok.add([i]) for i in output) + detok.flush()
        whole = spm.decode(prompt + output, skip_special_tokens=True)
        head = spm.decode(prompt, skip_special_tokens=True)
        assert whole.startswith(head)
        assert streamed == whole[len(head) :]  # the continuation exactly as the whole text reads
        assert streamed.startswith(" ") and streamed[1:] == spm.decode(output)
        unseeded = IncrementalDetokenizer(spm)
        assert "".join(unseeded.add([i]) for i in output) + unseeded.flush() == spm.decode(output)  # loses it


def test_a_short_prompt_seeds_all_it_has(spm) -> None:
    prompt = spm("Hi").input_ids
    detok = IncrementalDetokenizer(spm, prompt_token_ids=prompt)
    assert detok.token_ids == prompt and detok.read_offset == len(prompt)
    out = spm(" there", add_special_tokens=False).input_ids
    assert "".join(detok.add([i]) for i in out) + detok.flush() == " there"


def test_seeding_changes_nothing_for_byte_level_bpe(tokenizer) -> None:
    prompt = tokenizer.encode("Once upon a time", add_special_tokens=False)
    output = tokenizer.encode(" there was a café 🧪.", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt)
    assert "".join(detok.add([i]) for i in output) + detok.flush() == tokenizer.decode(output)
