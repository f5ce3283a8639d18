"""The on-disk format of prepared data: WebDataset tar shards plus one manifest.

A prepared directory holds:

    manifest.json           this file's `Manifest`, written last (its presence means "complete")
    tokenizer.json          the Hugging Face tokenizer (none for the built-in byte tokenizer)
    shard-000000.tar ...    WebDataset shards

Each sample in a shard is one document:

    <key>.tokens     the token ids, raw little-endian integers of the manifest's dtype, EOS included
    <key>.json       metadata: {"source": input file, "doc": document index in that file}

Keys are "%09d" of the document's index within its shard.

A manifest names its files (each shard's `path`, the tokenizer's `file`) by plain file names in
its own directory: letters, digits and `._+-`, not starting with `.` or `-`. No folder part, so
no `..` or absolute path; no character a shell reads specially, so that a name can take the
place of the manifest's in a `pipe:` command. The tokenizer file, which every checkpoint copies,
must be a regular file in the directory: a symbolic link is followed only to a file beside it
(`file_in`). A shard may be a link to anywhere (a Hugging Face cache links its files to blobs/):
it is only read, as tokens, and a shard resolves without a file-system call per shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from pathlib import Path

import numpy as np

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "tessera-shards"
FORMAT_VERSION = 1
TOKENS_EXT = "tokens"
META_EXT = "json"
TOKEN_DTYPES = ("uint16", "uint32")
TOKENIZER_KINDS = ("bytes", "hf")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DataError(ValueError):
    """Bad data or a bad data path given by the user (names the file)."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): what a
    one-line report quotes of a dependency's error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_count(value: object, least: int = 0) -> bool:
    """An int (not a bool, which Python counts as one) of at least `least`: what every count
    read from a user's JSON must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


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
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({first_line(e)})") from e
    return parse_manifest(text, str(path))


def parse_manifest(text: str, where: str) -> Manifest:
    """A manifest from its JSON text; `where` (a path or URL) names it in errors, with the key."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{where}: malformed manifest ({first_line(e)})") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise DataError(f"{where}: not a Tessera manifest (format={short_repr(found)})")
    _check_keys(raw, where, "", ("format", "version", "tokenizer", "dtype", "shards"), None)
    if _count(raw, where, "version", 1) != FORMAT_VERSION:
        raise _key_error(where, "version", f"is {raw['version']}; this Tessera reads version "
                                           f"{FORMAT_VERSION}")
    dtype = _choice(raw, where, "dtype", TOKEN_DTYPES)
    for total in ("num_tokens", "num_samples"):  # written for people; recomputed from the shards
        if total in raw:
            _count(raw, where, total)
    tokenizer = _tokenizer_info(raw["tokenizer"], where, dtype)
    shards = raw["shards"]
    if not isinstance(shards, list):
        raise _key_error(where, "shards", f"must be a list, got {short_repr(shards)}")
    infos = tuple(_shard_info(s, where, f"shards[{i}]") for i, s in enumerate(shards))
    _check_unique_paths(infos, where)
    return Manifest(tokenizer=tokenizer, dtype=dtype, shards=infos, version=FORMAT_VERSION)


def file_in(directory: str | os.PathLike, name: str, what: str) -> Path:
    """DIRECTORY/NAME, the tokenizer file a manifest names (what a checkpoint copies); `what`
    names the entry in errors (e.g. "DIR/manifest.json: key 'tokenizer.file'"). DataError unless
    NAME is a plain file name (see the module doc) and, symbolic links followed, a regular file
    in DIRECTORY; a file that does not exist passes (its caller says "missing" in its words)."""
    if not is_file_name(name):
        raise DataError(f"{what}: {short_repr(name)} is not a plain file name in the manifest's "
                        f"directory")
    path = Path(directory) / name
    problem = link_out_problem(path)
    if problem:
        raise DataError(f"{what}: {problem}")
    return path


def link_out_problem(path: Path) -> str | None:
    """Why the file at `path` (a name in its directory) is not one of that directory's regular
    files, or None; a path that does not exist has no problem. One lstat for a plain file: only
    a link is resolved, and it must lead to a file beside it."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{path} cannot be read ({first_line(e)})"
    if stat.S_ISREG(mode):
        return None
    if not stat.S_ISLNK(mode):
        return f"{path} is not a regular file (a directory or device)"
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        return None
    except (OSError, RuntimeError) as e:  # a link loop
        return f"{path} cannot be followed ({first_line(e)})"
    if target.parent != path.parent.resolve():
        return f"{path} leads outside its directory (a link to {target})"
    if not target.is_file():
        return f"{path} is not a regular file (a directory or device)"
    return None


def is_file_name(name: object) -> bool:
    """Whether `name` is what a manifest may name: a plain file name (see the module doc)."""
    return isinstance(name, str) and _FILE_NAME.fullmatch(name) is not None


def _key_error(where: str, key: str, problem: str) -> DataError:
    return DataError(f"{where}: key '{key}' {problem}")


def _check_keys(raw: dict, where: str, prefix: str, required: tuple[str, ...],
                optional: tuple[str, ...] | None = ()) -> None:
    """`raw` has every required key; with `optional` not None, no key beyond both."""
    for key in required:
        if key not in raw:
            raise _key_error(where, prefix + key, "is missing")
    if optional is None:
        return
    unknown = sorted(set(raw) - set(required) - set(optional), key=str)
    if unknown:
        keys = ", ".join((*required, *optional))
        raise _key_error(where, f"{prefix}{unknown[0]}", f"is not a manifest key (keys: {keys})")


def _count(raw: dict, where: str, key: str, minimum: int = 0, name: str | None = None) -> int:
    """raw[name or key], an integer >= minimum; errors name `key`."""
    value = raw[name or key]
    if not is_count(value, minimum):
        kind = "a non-negative integer" if minimum == 0 else f"an integer >= {minimum}"
        raise _key_error(where, key, f"must be {kind}, got {short_repr(value)}")
    return value


def _choice(raw: dict, where: str, key: str, choices: tuple[str, ...],
            name: str | None = None) -> str:
    value = raw[name or key]
    if not isinstance(value, str) or value not in choices:
        raise _key_error(where, key,
                         f"must be one of {', '.join(choices)}, got {short_repr(value)}")
    return value


def _tokenizer_info(raw: object, where: str, dtype: str) -> TokenizerInfo:
    if not isinstance(raw, dict):
        raise _key_error(where, "tokenizer", f"must be an object, got {short_repr(raw)}")
    _check_keys(raw, where, "tokenizer.", ("kind", "vocab_size", "eos_id"), ("file",))
    kind = _choice(raw, where, "tokenizer.kind", TOKENIZER_KINDS, "kind")
    vocab_size = _count(raw, where, "tokenizer.vocab_size", 1, "vocab_size")
    if vocab_size > 2 ** (8 * np.dtype(dtype).itemsize):
        raise _key_error(where, "tokenizer.vocab_size", f"{vocab_size} does not fit dtype {dtype}")
    eos_id = _count(raw, where, "tokenizer.eos_id", 0, "eos_id")
    if eos_id >= vocab_size:
        raise _key_error(where, "tokenizer.eos_id", f"{eos_id} is not below tokenizer.vocab_size "
                                                    f"{vocab_size}")
    file = raw.get("file")
    if file is not None and not is_file_name(file):
        raise _key_error(where, "tokenizer.file", f"must be a plain file name in the manifest's "
                                                  f"directory, got {short_repr(file)}")
    return TokenizerInfo(kind=kind, vocab_size=vocab_size, eos_id=eos_id, file=file)


def _shard_info(raw: object, where: str, key: str) -> ShardInfo:
    if not isinstance(raw, dict):
        raise _key_error(where, key, f"must be an object, got {short_repr(raw)}")
    _check_keys(raw, where, f"{key}.", ("path", "num_tokens", "num_samples", "sha256"))
    path = raw["path"]
    if not is_file_name(path) or path == MANIFEST_NAME:
        raise _key_error(where, f"{key}.path", f"must be a plain file name in the manifest's "
                                               f"directory, got {short_repr(path)}")
    sha256 = raw["sha256"]
    if not isinstance(sha256, str) or _SHA256.fullmatch(sha256) is None:
        raise _key_error(where, f"{key}.sha256", f"must be 64 lowercase hex digits, got "
                                                 f"{short_repr(sha256)}")
    return ShardInfo(
        path=path,
        num_tokens=_count(raw, where, f"{key}.num_tokens", 0, "num_tokens"),
        num_samples=_count(raw, where, f"{key}.num_samples", 0, "num_samples"),
        sha256=sha256,
    )


def _check_unique_paths(shards: tuple[ShardInfo, ...], where: str) -> None:
    seen: set[str] = set()
    for index, shard in enumerate(shards):
        if shard.path in seen:
            raise _key_error(where, f"shards[{index}].path", f"{shard.path!r} is listed twice")
        seen.add(shard.path)
