from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models

from tessera.data.format import DataError, Manifest, TokenizerInfo, write_manifest
from tessera.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    find_tokenizer,
    load_tokenizer,
    train_bpe,
)

TRICKY_TEXTS = [
    "plain ascii",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "unicode: héllo wörld, 日本語, emoji 🎉👩‍👩‍👧",
    "a literal <|endoftext|> inside a document",
    "nul \x00 and control \x07 chars",
    "",
]


def corpus_texts() -> list[str]:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "naïve", "café"]
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(50)]


@pytest.fixture(scope="module")
def trained() -> HFTokenizer:
    return train_bpe(iter(corpus_texts()), 300)


def test_byte_tokenizer_round_trip_and_info() -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.encode("hé") == [104, 0xC3, 0xA9]
    assert tok.decode(tok.encode("hé") + [tok.eos_id]) == "hé"
    assert tok.decode([0xFF]) == "\ufffd"
    assert tok.encode_batch(["a", ""]) == [[97], []]
    assert tok.info() == TokenizerInfo(kind="bytes", vocab_size=257, eos_id=256)
    for text in TRICKY_TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_train_bpe_is_lossless_and_uses_endoftext_as_eos(trained: HFTokenizer) -> None:
    assert isinstance(trained, Tokenizer)
    assert trained.eos_id == trained.tokenizer.token_to_id("<|endoftext|>")
    assert 257 <= trained.vocab_size <= 300
    for text in TRICKY_TEXTS + corpus_texts()[:3]:
        ids = trained.encode(text)
        assert trained.decode(ids) == text
        assert trained.eos_id not in ids  # special-token text in a document stays text
    assert trained.decode(trained.encode("dog") + [trained.eos_id]) == "dog"
    assert len(trained.encode(corpus_texts()[0])) < len(corpus_texts()[0].encode())  # merges


def test_train_bpe_is_deterministic(trained: HFTokenizer) -> None:
    again = train_bpe(iter(corpus_texts()), 300)
    assert again.to_str() == trained.to_str()


def test_train_bpe_rejects_a_vocab_smaller_than_the_byte_alphabet() -> None:
    with pytest.raises(DataError, match="too small"):
        train_bpe(iter(["abc"]), 100)


def test_save_and_load_tokenizer(tmp_path, trained: HFTokenizer) -> None:
    path = trained.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    info = trained.info()
    assert info == TokenizerInfo(
        kind="hf", vocab_size=trained.vocab_size, eos_id=trained.eos_id, file="tokenizer.json"
    )
    loaded = load_tokenizer(info, tmp_path)
    assert isinstance(loaded, HFTokenizer)
    for text in TRICKY_TEXTS:
        assert loaded.encode(text) == trained.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert isinstance(load_tokenizer(ByteTokenizer().info(), tmp_path), ByteTokenizer)


def test_load_tokenizer_rejects_a_mismatching_manifest(tmp_path, trained: HFTokenizer) -> None:
    trained.save(tmp_path)
    wrong = TokenizerInfo(kind="hf", vocab_size=12, eos_id=0, file="tokenizer.json")
    with pytest.raises(DataError, match="vocab_size=12"):
        load_tokenizer(wrong, tmp_path)
    with pytest.raises(DataError, match="unknown tokenizer kind 'sp'"):
        load_tokenizer(TokenizerInfo(kind="sp", vocab_size=1, eos_id=0), tmp_path)


def test_missing_tokenizer_file_names_the_path(tmp_path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(DataError, match="nope/tokenizer.json: tokenizer file not found"):
        HFTokenizer.from_file(missing)


def test_unparsable_tokenizer_file_names_the_file(tmp_path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text("{ this is not a tokenizer")
    with pytest.raises(DataError, match="broken.json: cannot load tokenizer"):
        HFTokenizer.from_file(bad)


def _word_level(tmp_path, vocab: dict[str, int]) -> str:
    path = tmp_path / "word_level.json"
    RawTokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(path))
    return str(path)


def test_tokenizer_without_eos_is_rejected_naming_the_file(tmp_path) -> None:
    path = _word_level(tmp_path, {"<unk>": 0, "hello": 1})
    with pytest.raises(DataError, match="word_level.json: tokenizer has no EOS token"):
        HFTokenizer.from_file(path)


def test_eos_candidates_are_tried_in_order(tmp_path) -> None:
    path = _word_level(tmp_path, {"<unk>": 0, "<|endoftext|>": 1, "</s>": 2, "<eos>": 3})
    tok = HFTokenizer.from_file(path)
    assert tok.eos_id == 2
    assert tok.vocab_size == 4


def test_eos_token_of_tokenizer_config_wins_over_the_candidates(tmp_path) -> None:
    """A Hugging Face model directory names its EOS (Llama 3 instruct: <|eot_id|>, no candidate)."""
    path = _word_level(tmp_path, {"<unk>": 0, "</s>": 1, "<|eot_id|>": 2})
    config = tmp_path / "tokenizer_config.json"
    config.write_text('{"eos_token": {"content": "<|eot_id|>", "special": true}}')
    assert HFTokenizer.from_file(path).eos_id == 2
    assert HFTokenizer.from_file(path, eos_id=1).eos_id == 1  # a manifest's own choice
    config.write_text('{"eos_token": "<|im_end|>"}')
    with pytest.raises(DataError, match="tokenizer_config.json: eos_token '<|im_end|>' is not"):
        HFTokenizer.from_file(path)


def test_find_tokenizer_reads_every_place_a_tokenizer_lives(tmp_path, trained) -> None:
    step = tmp_path / "run" / "checkpoints" / "step-00000003"
    for directory in ("hf", "prepared", "empty", step / "tokenizer"):
        (tmp_path / directory).mkdir(parents=True)
    # a tokenizer.json, and a Hugging Face model directory holding one
    trained.save(tmp_path / "hf")
    assert find_tokenizer(tmp_path / "hf" / "tokenizer.json").eos_id == trained.eos_id
    assert find_tokenizer(tmp_path / "hf").vocab_size == trained.vocab_size
    # a prepared directory: its manifest's EOS, whatever the candidates say
    prepared = tmp_path / "prepared"
    trained.save(prepared)
    write_manifest(prepared, Manifest(TokenizerInfo("hf", trained.vocab_size, 7,
                                                    "tokenizer.json"), "uint16", ()))
    assert find_tokenizer(prepared).eos_id == 7
    # a checkpoint (tokenizer/ with info.json), its checkpoints/ folder and its run directory
    trained.save(step / "tokenizer")
    info = {"kind": "hf", "vocab_size": trained.vocab_size, "eos_id": 5, "file": "../../x"}
    (step / "tokenizer" / "info.json").write_text(json.dumps(info))
    (step.parent / "latest").write_text("step-00000003\n")
    for path in (step, step.parent, tmp_path / "run"):
        assert find_tokenizer(path).eos_id == 5, path
    (step.parent / "latest").write_text("../../elsewhere")
    with pytest.raises(DataError, match="latest: names '../../elsewhere', not a checkpoint"):
        find_tokenizer(tmp_path / "run")
    with pytest.raises(DataError, match="empty: no tokenizer here"):
        find_tokenizer(tmp_path / "empty")


def test_find_tokenizer_says_a_checkpoint_carries_none(tmp_path) -> None:
    """A checkpoint saved without a tokenizer (an import of a Hugging Face directory without
    tokenizer.json) is named as such, not as a manifest of the wrong format."""
    step = tmp_path / "run" / "checkpoints" / "step-00000000"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text(json.dumps({"format": "tessera-checkpoint", "files": {}}))
    (step.parent / "latest").write_text("step-00000000\n")
    for path in (step, tmp_path / "run"):
        with pytest.raises(DataError) as raised:
            find_tokenizer(path)
        assert str(raised.value) == (
            f"{step} is a Tessera checkpoint that carries no tokenizer (imported from a Hugging "
            f"Face directory without tokenizer.json, or saved by an older Tessera); pass "
            f"--tokenizer a tokenizer.json")
