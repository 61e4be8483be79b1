"""Byte-level BPE training and the teacher/student tokenizer check."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from foundry_kernel._models import check_tokenizers as check_tokenizer_pair
from foundry_kernel.data._tokenizer import (
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    PAD_TOKEN,
    train_bpe_tokenizer,
)
from foundry_kernel.errors import ConfigError, DataError, ModelError

CORPUS = [
    "The list object has an append() method that adds an item to the end of the list.",
    "To open a file, call open() with the file name and a mode such as 'r' or 'w'.",
    "An exception is raised when an error occurs; handle it with try and except.",
    "Dictionaries map keys to values; iterate over items() to get both at once.",
] * 5
OTHER_CORPUS = ["Completely different words: zebra, quartz, jukebox, fjord, nymph."] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, 320)


def test_special_tokens(tok):
    assert tok.eos_token == tok.bos_token == tok.unk_token == EOS_TOKEN
    assert tok.pad_token == PAD_TOKEN
    assert tok.eos_token_id != tok.pad_token_id
    assert {tok.eos_token_id, tok.pad_token_id} == {0, 1}
    assert len(tok) <= 320


def test_encoding_adds_no_special_tokens(tok):
    ids = tok("The list object", add_special_tokens=True)["input_ids"]
    assert tok.eos_token_id not in ids
    assert tok.pad_token_id not in ids


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain ascii",
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines\r\n and ,punctuation .",
        "Ünïcödé: café, naïve, 日本語, 한국어, עברית, emoji 🙂👍🏽",
        "\x00\x01 control bytes \x7f",
        f"literal {EOS_TOKEN} in text",
    ],
)
def test_round_trip_examples(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_training_is_deterministic():
    a = train_bpe_tokenizer(CORPUS, 320)
    b = train_bpe_tokenizer(iter(CORPUS), 320)  # a one-shot iterator works too
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_reaches_requested_vocab_size_on_enough_text():
    text = [" ".join(f"word{i} token{i * 7} item{i % 13}" for i in range(400))]
    tok = train_bpe_tokenizer(text, 400)
    assert len(tok) == 400


def test_vocab_too_small_is_a_config_error():
    with pytest.raises(ConfigError, match=str(MIN_VOCAB_SIZE)):
        train_bpe_tokenizer(CORPUS, 100)


def test_empty_corpus_is_a_data_error():
    with pytest.raises(DataError, match="empty corpus"):
        train_bpe_tokenizer([], 300)


def test_save_and_reload_keeps_behaviour(tok, tmp_path: Path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Ünïcödé  spaces , here."
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(
        text, add_special_tokens=False
    )
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    assert loaded.pad_token == PAD_TOKEN
    check_tokenizer_pair(tok, loaded)


def test_pair_check_accepts_identical(tok):
    check_tokenizer_pair(tok, train_bpe_tokenizer(CORPUS, 320))


def test_pair_check_names_first_differing_token(tok):
    other = train_bpe_tokenizer(OTHER_CORPUS, 320)
    with pytest.raises(ModelError, match="first differing id") as info:
        check_tokenizer_pair(tok, other)
    message = str(info.value)
    assert "teacher" in message
    assert "student" in message


def test_pair_check_catches_special_token_mismatch(tok, tmp_path: Path):
    tok.save_pretrained(tmp_path)
    changed = AutoTokenizer.from_pretrained(tmp_path, pad_token=EOS_TOKEN)
    with pytest.raises(ModelError, match="pad_token"):
        check_tokenizer_pair(tok, changed)
