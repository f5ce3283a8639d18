"""Tokenizers for `tessera prepare`: the built-in byte tokenizer and Hugging Face `tokenizers`.

Document text is always data: special-token strings that happen to occur in a document (a
literal "<|endoftext|>" in a web page) are encoded as ordinary text, never as the special id.
A document is framed the way the tokenizer's model was trained: what the tokenizer's own
post-processor adds (Llama 3's and Mistral's BOS; nothing for Qwen's), then its EOS, appended by
`prepare` unless the post-processor already ends with it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tessera.data.format import (
    MANIFEST_NAME,
    DataError,
    TokenizerInfo,
    file_in,
    first_line,
    read_manifest,
)

BYTE_VOCAB_SIZE = 257
BYTE_EOS_ID = 256
HF_TOKENIZER_FILE = "tokenizer.json"
# Beside a Hugging Face tokenizer.json: its eos_token, the one the model was trained with
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
# What a folder of a checkpoint's carried tokenizer holds beside tokenizer.json: a TokenizerInfo
CARRIED_INFO_FILE = "info.json"
CARRIED_DIR = "tokenizer"
# The format of a checkpoint's manifest.json (tessera.trainer.checkpoint names it from here)
CHECKPOINT_FORMAT = "tessera-checkpoint"
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

    def __init__(self, tokenizer: RawTokenizer, source: str = "<in memory>",
                 eos_id: int | None = None) -> None:
        """`eos_id` None: the first of EOS_CANDIDATES in the vocabulary."""
        eos_id = _find_eos_id(tokenizer) if eos_id is None else eos_id
        if eos_id is None:
            names = ", ".join(EOS_CANDIDATES)
            raise DataError(f"{source}: tokenizer has no EOS token (looked for {names})")
        if tokenizer.id_to_token(eos_id) is None:
            raise DataError(f"{source}: EOS id {eos_id} is not in the tokenizer's vocabulary")
        # Not saved in tokenizer.json; see the module docstring.
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.source = source
        self.eos_id: int = eos_id
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike, eos_id: int | None = None) -> HFTokenizer:
        """A tokenizer.json; EOS is `eos_id`, else the eos_token of a tokenizer_config.json
        beside it (a Hugging Face model's directory), else the first of EOS_CANDIDATES."""
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: tokenizer file not found")
        if not path.is_file():
            raise DataError(f"{path}: tokenizer path is not a file")
        try:
            raw = RawTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"{path}: cannot load tokenizer ({first_line(e)})") from e
        if eos_id is None:
            eos_id = _configured_eos_id(raw, path.with_name(HF_TOKENIZER_CONFIG))
        return cls(raw, source=str(path), eos_id=eos_id)

    @classmethod
    def from_str(cls, serialized: str, source: str = "<in memory>",
                 eos_id: int | None = None) -> HFTokenizer:
        return cls(RawTokenizer.from_str(serialized), source=source, eos_id=eos_id)

    def to_str(self) -> str:
        return self.tokenizer.to_str()

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids with what the post-processor adds (a BOS, for Llama 3); [] for ''."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        return [e.ids if text else [] for text, e in zip(texts, encodings)]

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


def json_text(tokenizer: Tokenizer) -> str | None:
    """The tokenizer.json text of a Hugging Face tokenizer; None for the byte tokenizer, which
    has no file (its TokenizerInfo says it all)."""
    return tokenizer.to_str() if isinstance(tokenizer, HFTokenizer) else None


def load_tokenizer(info: TokenizerInfo, directory: str | os.PathLike) -> Tokenizer:
    """Reopen the tokenizer a manifest describes; DIRECTORY is the manifest's directory, and the
    tokenizer's file one of its own (a plain name, no link out of it)."""
    tokenizer: Tokenizer
    if info.kind == "bytes":
        tokenizer = ByteTokenizer()
    elif info.kind == "hf":
        manifest = Path(directory) / MANIFEST_NAME  # (a checkpoint's tokenizer/ has info.json)
        entry = f"{manifest}: key 'tokenizer.file'" if manifest.exists() else \
            f"{directory}: its tokenizer file"
        path = file_in(directory, info.file or HF_TOKENIZER_FILE, entry)
        tokenizer = HFTokenizer.from_file(path, eos_id=info.eos_id)
    else:
        raise DataError(f"{directory}: unknown tokenizer kind {info.kind!r} in manifest")
    if (tokenizer.vocab_size, tokenizer.eos_id) != (info.vocab_size, info.eos_id):
        raise DataError(
            f"{directory}: tokenizer has vocab_size={tokenizer.vocab_size}, "
            f"eos_id={tokenizer.eos_id} but the manifest says vocab_size={info.vocab_size}, "
            f"eos_id={info.eos_id}"
        )
    return tokenizer


def find_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """What a user's --tokenizer PATH names: a tokenizer.json; or a directory: a Hugging Face
    model's (tokenizer.json, EOS from tokenizer_config.json), a prepared data directory (its
    manifest), or a Tessera checkpoint (the tokenizer it carries, from-hf's included; a run
    directory or its checkpoints/ stands for the newest)."""
    path = Path(path)
    if not path.is_dir():
        return HFTokenizer.from_file(path)
    path = _newest_checkpoint(path) or path
    carried_info = path / CARRIED_DIR / CARRIED_INFO_FILE
    if carried_info.is_file():
        return load_tokenizer(_carried_info(carried_info), path / CARRIED_DIR)
    if (path / MANIFEST_NAME).is_file():
        if _is_checkpoint(path):
            raise DataError(f"{path} is a Tessera checkpoint that carries no tokenizer (imported "
                            f"from a Hugging Face directory without tokenizer.json, or saved by "
                            f"an older Tessera); pass --tokenizer a tokenizer.json")
        return load_tokenizer(read_manifest(path).tokenizer, path)
    if (path / HF_TOKENIZER_FILE).is_file():
        return HFTokenizer.from_file(path / HF_TOKENIZER_FILE)
    raise DataError(f"{path}: no tokenizer here (a tokenizer.json, a Hugging Face model "
                    f"directory, a prepared data directory or a Tessera checkpoint)")


def _newest_checkpoint(path: Path) -> Path | None:
    """The checkpoint step directory that the `latest` file of a run directory's checkpoints/
    (or of that folder itself) names; None for any other directory."""
    for root in (path / "checkpoints", path):
        latest = root / "latest"
        if latest.is_file():
            name = latest.read_text().strip()
            if re.fullmatch(r"step-\d+", name) is None:
                raise DataError(f"{latest}: names {name!r}, not a checkpoint step")
            return root / name
    return None


def _is_checkpoint(path: Path) -> bool:
    """Whether the manifest.json in `path` is a checkpoint's (not a prepared directory's)."""
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
    except (OSError, ValueError, RecursionError):
        return False  # read_manifest says what is wrong with it
    return isinstance(manifest, dict) and manifest.get("format") == CHECKPOINT_FORMAT


def _carried_info(path: Path) -> TokenizerInfo:
    try:
        info = TokenizerInfo(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"{path}: unreadable ({e})") from e
    # The file is always the folder's own, whatever info.json names.
    return TokenizerInfo(info.kind, info.vocab_size, info.eos_id,
                         HF_TOKENIZER_FILE if info.kind == "hf" else None)


def _configured_eos_id(tokenizer: RawTokenizer, config_path: Path) -> int | None:
    """The id of tokenizer_config.json's eos_token (a string or {"content": ...}); None when
    there is no such file or key."""
    if not config_path.is_file():
        return None
    try:
        eos = json.loads(config_path.read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(f"{config_path}: unreadable ({first_line(e)})") from e
    if isinstance(eos, dict):
        eos = eos.get("content")
    if eos is None:
        return None
    token_id = tokenizer.token_to_id(eos) if isinstance(eos, str) else None
    if token_id is None:
        raise DataError(f"{config_path}: eos_token {eos!r} is not in the tokenizer's vocabulary")
    return token_id


def _find_eos_id(tokenizer: RawTokenizer) -> int | None:
    for name in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None

