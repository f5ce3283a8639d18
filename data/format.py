"""The on-disk format of prepared data: WebDataset tar shards plus one manifest.

A prepared directory holds:

    manifest.json           this file's `Manifest`, written last (its presence means "complete")
    tokenizer.json          the Hugging Face tokenizer (none for the built-in byte tokenizer)
    shard-000000.tar ...    WebDataset shards

Each sample in a shard is one document:

    <key>.tokens     the token ids, raw little-endian integers of the manifest's dtype, EOS included
    <key>.json       metadata: {"source": input file, "doc": document index in that file}

Keys are "%09d" of the document's index within its shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "tessera-shards"
FORMAT_VERSION = 1
TOKENS_EXT = "tokens"
META_EXT = "json"


class DataError(ValueError):
    """Bad data or a bad data path given by the user (names the file)."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): what a
    one-line report quotes of a dependency's error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def short_repr(value: object, limit: int = 60) -> str:
    """repr() of a value read from a user's file, cut at `limit` characters: what a one-line
    report quotes of it, however long it is."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    kind: str  # "bytes" (built-in) or "hf" (tokenizer.json beside the manifest)
    vocab_size: int
    eos_id: int
    file: str | None = None  # relative to the manifest's directory


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the manifest's directory
    num_tokens: int
    num_samples: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    tokenizer: TokenizerInfo
    dtype: str  # "uint16" or "uint32"
    shards: tuple[ShardInfo, ...]
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["num_tokens"] = self.num_tokens
        out["num_samples"] = self.num_samples
        return out


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def encode_tokens(ids: np.ndarray, dtype: str) -> bytes:
    return np.asarray(ids, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def decode_tokens(payload: bytes, dtype: str) -> np.ndarray:
    return np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder("<"))


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> Path:
    """Write the manifest atomically (temp file, fsync, rename): it is the 'complete' marker."""
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest.to_json(), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | os.PathLike) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: no manifest; is this a directory written by `tessera prepare`?")
    return parse_manifest(path.read_text(), str(path))


def parse_manifest(text: str, where: str) -> Manifest:
    """A manifest from its JSON text; `where` (a path or URL) names it in errors."""
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            found = raw.get("format") if isinstance(raw, dict) else None
            raise DataError(f"{where}: not a Tessera manifest (format={found!r})")
        return Manifest(
            tokenizer=TokenizerInfo(**raw["tokenizer"]),
            dtype=raw["dtype"],
            shards=tuple(ShardInfo(**s) for s in raw["shards"]),
            format=raw["format"],
            version=raw["version"],
        )
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{where}: malformed manifest ({e})") from e
