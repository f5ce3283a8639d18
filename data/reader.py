"""Reading one shard: its `.tokens` members, opened through webdataset's `gopen`.

Bad data does not stop a run. A sample whose payload is empty, not a whole number of tokens of
the manifest's dtype, or holds ids beyond the vocabulary is skipped; corrupt tar headers are
skipped over (the reader resyncs on the next valid header); a truncated or empty file ends the
shard early. Each case is reported as a `BadSamples` event naming the shard and the member, and
samples the manifest lists but the file no longer holds are counted at the shard's end.

So that every later position in the stream stays where the manifest puts it (exact resume), the
tokens a damaged shard lost are replaced by EOS tokens. A missing shard is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from tessera.data.format import TOKENS_EXT, DataError, decode_tokens, first_line
from tessera.data.sources import ResolvedShard, is_url

TAR_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class BadSamples:
    """`count` samples lost (0: a note about damage, counted at the shard's end)."""

    count: int
    message: str
    filler_tokens: int = 0  # EOS tokens that stand in for what the shard lost


@dataclasses.dataclass(frozen=True)
class Member:
    name: str
    payload: bytes


class _CountingReader:
    """A read-only stream that counts (and optionally hashes) the bytes read through it."""

    def __init__(self, stream: BinaryIO, digest: hashlib._Hash | None = None) -> None:
        self._stream = stream
        self.digest = digest
        self.num_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.num_bytes += len(data)
        if self.digest is not None:
            self.digest.update(data)
        return data

    def close(self) -> None:
        self._stream.close()


def open_shard(location: str) -> BinaryIO:
    """The shard's byte stream (a file, or gopen's stream for a URL); DataError if missing."""
    try:
        if is_url(location):

            return gopen(location, "rb")
        return open(location, "rb")
    except FileNotFoundError:
        raise DataError(f"{location}: shard is missing (listed in its manifest)") from None
    except Exception as e:  # gopen's scheme handlers raise OSError, ValueError, ...
        raise DataError(f"{location}: cannot open shard ({first_line(e)})") from e



def is_tokens_member(name: str) -> bool:
    """WebDataset's naming: `<key>.tokens`, the key being the name up to its first dot."""
    _, suffix = base_plus_ext(name)
    return suffix is not None and suffix.lower() == TOKENS_EXT


def iter_members(stream: _CountingReader, where: str, max_member_bytes: int | None = None
                 ) -> Iterator[Member | BadSamples]:
    """The `.tokens` members of a tar stream, and notes (count 0) about damage found. A member
    whose header declares more than `max_member_bytes` is skipped (counted) before a byte of it
    is decompressed into memory: a small gzip shard can hold a member of gigabytes."""
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", ignore_zeros=True)  # noqa: SIM115
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        if stream.num_bytes == 0 and isinstance(e, OSError):
            raise DataError(f"{where}: shard is missing or unreadable ({first_line(e)})") from e
        what = "empty file" if stream.num_bytes == 0 else f"not a tar file ({first_line(e)})"
        yield BadSamples(0, f"{where}: {what}")
        return
    expected_offset = 0
    last = current = "(start)"
    try:
        for info in tar:
            if info.offset > expected_offset:
                skipped = info.offset - expected_offset
                yield BadSamples(
                    0, f"{where}: corrupt tar data after member {last}: {skipped} bytes skipped"
                )
            expected_offset = info.offset_data + -(-info.size // TAR_BLOCK) * TAR_BLOCK
            if not info.isreg() or not is_tokens_member(info.name):
                continue
            current = info.name
            if max_member_bytes is not None and info.size > max_member_bytes:
                yield BadSamples(1, f"{where}: member {info.name} declares {info.size} bytes, "
                                    f"more than the {max_member_bytes} bytes of tokens the "
                                    f"manifest lists for the whole shard; skipped unread")
                last = current
                continue
            payload = tar.extractfile(info).read()
            tar.members = []  # stream mode: keep memory flat
            yield Member(info.name, payload)
            last = current
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        if stream.num_bytes == 0:
            raise DataError(f"{where}: shard is missing or unreadable ({first_line(e)})") from e
        yield BadSamples(0, f"{where}: truncated in member {current} ({first_line(e)})")


def check_payload(payload: bytes, dtype: str, vocab_size: int) -> str | None:
    """Why a `.tokens` payload is unusable, or None."""
    itemsize = np.dtype(dtype).itemsize
    if not payload:
        return "empty sample (0 bytes)"
    if len(payload) % itemsize:
        return f"{len(payload)} bytes is not a whole number of {dtype} tokens (wrong dtype?)"
    largest = int(decode_tokens(payload, dtype).max())
    if largest >= vocab_size:
        return f"token id {largest} >= vocab size {vocab_size} (wrong dtype?)"
    return None


def read_shard(shard: ResolvedShard) -> Iterator[np.ndarray | BadSamples]:
    """The token arrays of a shard's good samples in order, and `BadSamples` events.

    The shard is read whole first (one read, hashed as it comes) and checked against its
    manifest's sha256. A shard whose hash differs shows damage (corrupt or truncated tar data,
    bad samples: what parses is kept, as below), or else it is not the file that was prepared
    (replaced or altered): then all its samples are skipped. The last event, if the shard is
    damaged, carries the EOS filler count that brings the shard to its manifest token count. An
    undamaged shard whose hash matches but that disagrees with its manifest is an error.
    """
    data, sha256, closed_badly = _read_whole(shard)
    if shard.sha256 is None or sha256 == shard.sha256:
        yield from _parse(shard, data, closed_badly)
        return
    try:
        items = list(_parse(shard, data, closed_badly))
    except DataError:  # holds other counts than its manifest: not the prepared file either
        items = []
    if any(isinstance(item, BadSamples) and (item.count or item.message) for item in items):
        yield from items  # the damage found explains the hash
        return
    yield BadSamples(
        shard.num_samples,
        f"{shard.path}: sha256 differs from its manifest and no damage explains it (the file "
        f"was replaced or altered after `tessera prepare`); all {shard.num_samples} samples "
        f"skipped",
        shard.num_tokens,
    )


def _read_whole(shard: ResolvedShard) -> tuple[bytes, str, bool]:
    """The shard's bytes, their sha256, and whether closing the stream failed (a `pipe:`
    command that exited with an error after writing some output)."""
    stream = hashing_reader(open_shard(shard.path))[0]
    closed_badly = False
    try:
        data = stream.read()
    finally:
        try:
            stream.close()
        except Exception as e:  # a pipe: command that failed
            if stream.num_bytes == 0:
                raise DataError(f"{shard.path}: shard is missing ({first_line(e)})") from e
            closed_badly = True
    return data, stream.digest.hexdigest(), closed_badly


def _parse(shard: ResolvedShard, data: bytes, damaged: bool) -> Iterator[np.ndarray | BadSamples]:
    """The samples of a shard's bytes, with the counts checked against its manifest."""
    stream = _CountingReader(io.BytesIO(data))
    max_member_bytes = shard.num_tokens * np.dtype(shard.dtype).itemsize
    num_good = num_bad = good_tokens = 0
    for item in iter_members(stream, shard.path, max_member_bytes):
        if isinstance(item, BadSamples):
            damaged = True
            num_bad += item.count
            yield item
            continue
        problem = check_payload(item.payload, shard.dtype, shard.vocab_size)
        if problem is not None:
            num_bad += 1
            yield BadSamples(1, f"{shard.path}: member {item.name}: {problem}; skipped")
            continue
        tokens = decode_tokens(item.payload, shard.dtype)
        num_good += 1
        good_tokens += len(tokens)
        if good_tokens > shard.num_tokens:
            raise _changed(shard, f"more than {shard.num_tokens} tokens")
        yield tokens
    lost = shard.num_samples - num_good - num_bad
    if lost < 0:
        raise _changed(shard, f"{num_good + num_bad} samples, not {shard.num_samples},")
    filler = shard.num_tokens - good_tokens
    if filler and not (damaged or num_bad or lost):
        raise _changed(shard, f"{good_tokens} tokens")
    if lost:
        message = (
            f"{shard.path}: {lost} of {shard.num_samples} samples missing (truncated or "
            f"corrupt tar data)"
        )
        yield BadSamples(lost, message, filler)
    elif filler:
        yield BadSamples(0, "", filler)


def _changed(shard: ResolvedShard, holds: str) -> DataError:
    return DataError(
        f"{shard.path}: holds {holds} but its manifest says {shard.num_tokens} tokens in "
        f"{shard.num_samples} samples; the shard changed after `tessera prepare`"
    )


def hashing_reader(stream: BinaryIO) -> tuple[_CountingReader, hashlib._Hash]:
    digest = hashlib.sha256()
    return _CountingReader(stream, digest), digest
