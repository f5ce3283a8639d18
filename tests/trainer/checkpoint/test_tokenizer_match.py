"""checkpoint.load_from's tokenizer against the data's: the weights' token ids must mean the
same text, however each tokenizer is written down."""

from __future__ import annotations

import importlib

import pytest

from tessera.data.format import TokenizerInfo
from tessera.data.tokenizer import train_bpe
from tessera.trainer.convert import hf

load_module = importlib.import_module("tessera.trainer.checkpoint.load")  # (not its load())
mismatch = load_module._tokenizer_mismatch  # rank 0's part of check_same_tokenizer
BYTES = (TokenizerInfo("bytes", 257, 256), None)
BYTES_AS_JSON = (TokenizerInfo("hf", 257, 256, "tokenizer.json"), hf.byte_tokenizer_json())


def bpe(texts: list[str]) -> tuple[TokenizerInfo, str]:
    tokenizer = train_bpe(texts * 20, vocab_size=270)
    return tokenizer.info(), tokenizer.to_str()


@pytest.mark.parametrize("carried, data", [
    (BYTES, BYTES),
    (BYTES_AS_JSON, BYTES),  # an import whose tokenizer.json is the byte tokenizer
    (None, BYTES),  # an import without a tokenizer is taken on trust
])
def test_the_same_token_ids_load(monkeypatch, carried, data):
    monkeypatch.setattr(load_module, "carried_tokenizer", lambda directory: carried)
    assert mismatch("imported/checkpoints/step-00000000", data) is None


def test_data_prepared_with_another_tokenizer_is_refused(monkeypatch):
    carried = bpe(["the model reads tokens from shards", "the quick brown fox"])
    monkeypatch.setattr(load_module, "carried_tokenizer", lambda directory: carried)
    said = mismatch("imported/checkpoints/step-00000000", BYTES)
    assert said.startswith("checkpoint.load_from: imported/checkpoints/step-00000000 was "
                           "trained with another tokenizer than the one data.shards was "
                           "prepared with (hf, vocabulary 270"), said
    assert "vs bytes, vocabulary 257, EOS 256)" in said
    assert said.endswith("--tokenizer imported/checkpoints/step-00000000`")


def test_two_tokenizers_of_one_vocabulary_size_are_told_apart(monkeypatch):
    carried = bpe(["the model reads tokens from shards", "the quick brown fox"])
    data = bpe(["Größe, naïve café", "東京の天気は晴れ", "def f(x): return x ** 2"])
    assert carried[0].vocab_size == data[0].vocab_size == 270
    monkeypatch.setattr(load_module, "carried_tokenizer", lambda directory: carried)
    assert "another tokenizer" in mismatch("imported", data)
