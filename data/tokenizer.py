"""Tokenizers for `tessera prepare`: the built-in byte tokenizer and Hugging Face `tokenizers`.

Document text is always data: special-token strings that happen to occur in a document (a
literal "<|endoftext|>" in a web page) are encoded as ordinary text, never as the special id.
EOS is appended by `prepare`, not by the tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tessera.data.format import DataError, TokenizerInfo, first_line

BYTE_VOCAB_SIZE = 257
BYTE_EOS_ID = 256
HF_TOKENIZER_FILE = "tokenizer.json"
# Looked up in this order; the first one in the vocabulary is EOS.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
TRAINED_EOS = "<|endoftext|>"


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def info(self) -> TokenizerInfo: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOS = 256."""

    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_EOS_ID

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def info(self) -> TokenizerInfo:
        return TokenizerInfo(kind="bytes", vocab_size=self.vocab_size, eos_id=self.eos_id)


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (a tokenizer.json) with a known EOS token."""

    def __init__(self, tokenizer: RawTokenizer, source: str = "<in memory>") -> None:
        eos_id = _find_eos_id(tokenizer)
        if eos_id is None:
            names = ", ".join(EOS_CANDIDATES)
            raise DataError(f"{source}: tokenizer has no EOS token (looked for {names})")
        # Not saved in tokenizer.json; see the module docstring.
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.source = source
        self.eos_id: int = eos_id
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: tokenizer file not found")
        if not path.is_file():
            raise DataError(f"{path}: tokenizer path is not a file")
        try:
            raw = RawTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"{path}: cannot load tokenizer ({first_line(e)})") from e
        return cls(raw, source=str(path))

    @classmethod
    def from_str(cls, serialized: str, source: str = "<in memory>") -> HFTokenizer:
        return cls(RawTokenizer.from_str(serialized), source=source)

    def to_str(self) -> str:
        return self.tokenizer.to_str()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def info(self) -> TokenizerInfo:
        return TokenizerInfo(
            kind="hf", vocab_size=self.vocab_size, eos_id=self.eos_id, file=HF_TOKENIZER_FILE
        )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write DIRECTORY/tokenizer.json (via a temp file and rename)."""
        path = Path(directory) / HF_TOKENIZER_FILE
        tmp = path.with_name(path.name + ".tmp")
        self.tokenizer.save(str(tmp))
        os.replace(tmp, path)
        return path


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> HFTokenizer:
    """Train a byte-level BPE (lossless: decode(encode(s)) == s) with "<|endoftext|>" as EOS."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    min_vocab_size = len(alphabet) + 1
    if vocab_size < min_vocab_size:
        raise DataError(
            f"tokenizer vocab size {vocab_size} is too small for byte-level BPE "
            f"(at least {min_vocab_size}: 256 bytes + EOS)"
        )
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[TRAINED_EOS],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(raw, source="<trained byte-level BPE>")


def load_tokenizer(info: TokenizerInfo, directory: str | os.PathLike) -> Tokenizer:
    """Reopen the tokenizer a manifest describes; DIRECTORY is the manifest's directory."""
    tokenizer: Tokenizer
    if info.kind == "bytes":
        tokenizer = ByteTokenizer()
    elif info.kind == "hf":
        tokenizer = HFTokenizer.from_file(Path(directory) / (info.file or HF_TOKENIZER_FILE))
    else:
        raise DataError(f"{directory}: unknown tokenizer kind {info.kind!r} in manifest")
    if (tokenizer.vocab_size, tokenizer.eos_id) != (info.vocab_size, info.eos_id):
        raise DataError(
            f"{directory}: tokenizer has vocab_size={tokenizer.vocab_size}, "
            f"eos_id={tokenizer.eos_id} but the manifest says vocab_size={info.vocab_size}, "
            f"eos_id={info.eos_id}"
        )
    return tokenizer


def _find_eos_id(tokenizer: RawTokenizer) -> int | None:
    for name in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None

