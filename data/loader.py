"""The streaming training loader: packed token windows, exact resume, any data-parallel size.

The shards are read through a fixed number L of streams (`data.streams`), independent of the
data-parallel size D. In epoch e, stream l reads the shards perm_e[l::L] (perm_e: the shard list
permuted by a generator seeded with (seed, e); the identity without shuffling), each shard's
documents in order; a stream is the endless concatenation of its epochs, cut into windows of
seq_len + 1 tokens across document, shard and epoch boundaries.

Global batch k is stream 0's windows for step k, then stream 1's, ... (G / L rows per stream).
Rank r of D owns the contiguous rows of streams [r*L/D, (r+1)*L/D), so the global batch does not
depend on D and ranks read disjoint shards. Resuming at step k starts every stream at window
k*G/L: the manifest token counts locate the epoch, shard and offset without reading earlier data.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import braceexpand
import numpy as np
import torch
from tessera.data.format import (
    MANIFEST_NAME,
    TOKENS_EXT,
    DataError,
    Manifest,
    TokenizerInfo,
    decode_tokens,
    read_manifest,
)
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

ShardsSpec = str | os.PathLike | Sequence[str | os.PathLike]

STATE_FIELDS = ("num_streams", "seq_len", "global_batch_size", "seed", "shuffle")


@dataclasses.dataclass(frozen=True)
class ResolvedShard:
    path: str  # absolute path of the tar file
    num_tokens: int  # from the manifest of the shard's directory
    num_samples: int
    dtype: str

    @property
    def url(self) -> str:
        return self.path


# ---------------------------------------------------------------------------------------------
# Resolving `data.shards`


def _has_glob_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _manifest_shards(directory: str, manifest: Manifest) -> list[ResolvedShard]:
    return [
        ResolvedShard(
            path=os.path.abspath(os.path.join(directory, s.path)),
            num_tokens=s.num_tokens,
            num_samples=s.num_samples,
            dtype=manifest.dtype,
        )
        for s in manifest.shards
    ]


def _tokenizer_identity(directory: str, info: TokenizerInfo) -> tuple:
    """What must agree across manifests: ids mean the same tokens (hf: same tokenizer file)."""
    file_sha256 = None
    if info.kind == "hf" and info.file is not None:
        path = Path(directory) / info.file
        if path.is_file():
            file_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return (info.kind, info.vocab_size, info.eos_id, file_sha256)


class _ManifestCache:
    def __init__(self) -> None:
        self._by_dir: dict[str, tuple[Manifest, dict[str, ResolvedShard]]] = {}

    def get(self, directory: str) -> tuple[Manifest, dict[str, ResolvedShard]]:
        directory = os.path.abspath(directory)
        if directory not in self._by_dir:
            manifest = read_manifest(directory)
            by_path = {s.path: s for s in _manifest_shards(directory, manifest)}
            self._by_dir[directory] = (manifest, by_path)
        return self._by_dir[directory]

    def items(self) -> list[tuple[str, Manifest]]:
        return [(d, m) for d, (m, _) in self._by_dir.items()]


def _resolve_directory(directory: str, cache: _ManifestCache) -> list[ResolvedShard]:
    _, by_path = cache.get(directory)
    if not by_path:
        raise DataError(f"{os.path.join(directory, MANIFEST_NAME)}: the manifest lists no shards")
    for shard in by_path.values():
        if not os.path.isfile(shard.path):
            raise DataError(f"{shard.path}: shard listed in its manifest is missing on disk")
    return list(by_path.values())


def _resolve_file(path: str, cache: _ManifestCache) -> ResolvedShard:
    path = os.path.abspath(path)
    _, by_path = cache.get(os.path.dirname(path))
    if path not in by_path:
        manifest_path = os.path.join(os.path.dirname(path), MANIFEST_NAME)
        raise DataError(f"{path}: shard is not listed in {manifest_path}")
    return by_path[path]


def _resolve_pattern(pattern: str, cache: _ManifestCache) -> list[ResolvedShard]:
    shards: list[ResolvedShard] = []
    for expanded in braceexpand.braceexpand(pattern):
        if _has_glob_magic(expanded):
            matches = sorted(glob.glob(expanded))
            if not matches:
                raise DataError(f"data.shards: {expanded!r} matched nothing")
        elif os.path.exists(expanded):
            matches = [expanded]
        else:
            raise DataError(f"{expanded}: no such shard or directory (data.shards)")
        for match in matches:
            if os.path.isdir(match):
                shards.extend(_resolve_directory(match, cache))
            else:
                shards.append(_resolve_file(match, cache))
    return shards


def _check_consistent(cache: _ManifestCache) -> None:
    items = cache.items()
    first_dir, first = items[0]
    first_tokenizer = _tokenizer_identity(first_dir, first.tokenizer)
    for directory, manifest in items[1:]:
        if manifest.dtype != first.dtype:
            raise DataError(
                f"{directory}: token dtype {manifest.dtype} differs from {first.dtype} "
                f"of {first_dir} (data.shards mixes prepared directories)"
            )
        if _tokenizer_identity(directory, manifest.tokenizer) != first_tokenizer:
            raise DataError(
                f"{directory}: tokenizer differs from the one of {first_dir} "
                f"(data.shards mixes prepared directories)"
            )


def resolve_shards(spec: ShardsSpec) -> list[ResolvedShard]:
    """The shards named by `data.shards`, in order.

    `spec` is a prepared directory (all its shards in manifest order), a glob and/or brace
    pattern of shard files, or a list of those. Every shard must be listed in the manifest of its
    own directory, which gives its token count.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    cache = _ManifestCache()
    shards: list[ResolvedShard] = []
    for item in items:
        shards.extend(_resolve_pattern(os.fspath(item), cache))
    if not shards:
        raise DataError(f"data.shards: {spec!r} matched nothing")
    seen: set[str] = set()
    for shard in shards:
        if shard.path in seen:
            raise DataError(f"{shard.path}: shard named twice by data.shards")
        seen.add(shard.path)
    _check_consistent(cache)
    return shards


def shards_fingerprint(shards: Sequence[ResolvedShard]) -> str:
    """Identifies the shard list for resume checks; basenames only, so the data may move."""
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(f"{os.path.basename(shard.path)}\t{shard.num_tokens}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading one stream


def read_shard_tokens(path: str, dtype: str) -> Iterator[np.ndarray]:
    """The token arrays of a shard's documents, in order (streamed with webdataset)."""
    try:
        with open(path, "rb") as stream:
            files = tar_file_expander(
                [{"url": path, "stream": stream}],
                select_files=lambda name: name.endswith("." + TOKENS_EXT),
            )
            for sample in group_by_keys(files):
                if TOKENS_EXT not in sample:
                    raise DataError(f"{path}: sample {sample['__key__']} has no .{TOKENS_EXT}")
                yield decode_tokens(sample[TOKENS_EXT], dtype)
    except DataError:
        raise
    except (OSError, tarfile.TarError, ValueError) as e:
        raise DataError(f"{path}: unreadable shard ({e})") from e


def _shard_tokens(shard: ResolvedShard, skip_tokens: int) -> Iterator[np.ndarray]:
    """A shard's tokens from `skip_tokens` on; checks the manifest's count once read through."""
    num_tokens_seen = 0
    for tokens in read_shard_tokens(shard.path, shard.dtype):
        start = num_tokens_seen
        num_tokens_seen += len(tokens)
        if num_tokens_seen > skip_tokens:
            yield tokens[max(0, skip_tokens - start) :]
    if num_tokens_seen != shard.num_tokens:
        raise DataError(
            f"{shard.path}: holds {num_tokens_seen} tokens but its manifest says "
            f"{shard.num_tokens}; the shard changed after `tessera prepare`"
        )


def epoch_shard_order(num_shards: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    shards: tuple[ResolvedShard, ...]
    num_streams: int
    seed: int
    shuffle: bool

    def shard_indices(self, stream: int, epoch: int) -> np.ndarray:
        order = epoch_shard_order(len(self.shards), epoch, self.seed, self.shuffle)
        return order[stream :: self.num_streams]

    def locate(self, stream: int, token_offset: int) -> tuple[int, int, int]:
        """(epoch, position in that epoch's shard list, tokens to skip in that shard)."""
        epoch = 0
        if not self.shuffle:  # every epoch is the same size
            epoch_tokens = sum(self.shards[i].num_tokens for i in self.shard_indices(stream, 0))
            epoch, token_offset = divmod(token_offset, epoch_tokens)
        while True:
            for position, index in enumerate(self.shard_indices(stream, epoch)):
                num_tokens = self.shards[index].num_tokens
                if token_offset < num_tokens:
                    return epoch, position, token_offset
                token_offset -= num_tokens
            epoch += 1

    def tokens(self, stream: int, start_token: int) -> Iterator[np.ndarray]:
        """Stream `stream`'s endless token sequence from token `start_token` on."""
        epoch, position, skip_tokens = self.locate(stream, start_token)
        while True:
            for index in self.shard_indices(stream, epoch)[position:]:
                yield from _shard_tokens(self.shards[index], skip_tokens)
                skip_tokens = 0
            position = 0
            epoch += 1


class _WindowCutter:
    """Cuts a token stream into consecutive windows, copying each token once."""

    def __init__(self, tokens: Iterator[np.ndarray], window_tokens: int) -> None:
        self._tokens = tokens
        self._window_tokens = window_tokens
        self._head = np.empty(0, dtype=np.int64)
        self._head_pos = 0

    def take(self, num_windows: int) -> np.ndarray:
        out = np.empty(num_windows * self._window_tokens, dtype=np.int64)
        filled = 0
        while filled < len(out):
            if self._head_pos == len(self._head):
                self._head, self._head_pos = next(self._tokens), 0
            count = min(len(out) - filled, len(self._head) - self._head_pos)
            out[filled : filled + count] = self._head[self._head_pos : self._head_pos + count]
            filled += count
            self._head_pos += count
        return out.reshape(num_windows, self._window_tokens)


class _StreamChunks(IterableDataset):
    """Per step, one [rows_per_stream, seq_len + 1] chunk for each of this worker's streams.

    Worker w of W takes the local streams i with i % W == w; the DataLoader's round-robin over
    workers then hands the chunks to the main process in local-stream order.
    """

    def __init__(
        self,
        spec: StreamSpec,
        streams: Sequence[int],
        window_tokens: int,
        rows_per_stream: int,
        start_window: int,
    ) -> None:
        self._spec = spec
        self._streams = tuple(streams)
        self._window_tokens = window_tokens
        self._rows_per_stream = rows_per_stream
        self._start_window = start_window

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        start_token = self._start_window * self._window_tokens
        cutters = [
            _WindowCutter(self._spec.tokens(stream, start_token), self._window_tokens)
            for stream in self._streams[worker::num_workers]
        ]
        while True:
            for cutter in cutters:
                yield torch.from_numpy(cutter.take(self._rows_per_stream))


# ---------------------------------------------------------------------------------------------
# The loader


def default_num_streams(num_shards: int, global_batch_size: int, dp_size: int) -> int:
    """The largest L <= num_shards dividing global_batch_size that is a multiple of dp_size."""
    for num_streams in range(min(num_shards, global_batch_size), 0, -1):
        if global_batch_size % num_streams == 0 and num_streams % dp_size == 0:
            return num_streams
    raise DataError(
        f"no data.streams fits {num_shards} shards, global_batch_size {global_batch_size} and "
        f"data-parallel size {dp_size} (it must be <= the shard count, divide the global batch "
        f"and be a multiple of the data-parallel size); prepare more, smaller shards"
    )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise DataError(f"{name} must be >= 1, got {value}")


class TrainLoader:
    """Endless (input_ids, labels) micro-batches of data-parallel rank `dp_rank`.

    Each step is `micro_batches_per_step` micro-batches of int64 [micro_batch_size, seq_len].
    Every `iter()` starts again at `start_step`.
    """

    def __init__(
        self,
        shards: ShardsSpec | Sequence[ResolvedShard],
        *,
        seq_len: int,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_streams: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        start_step: int = 0,
    ) -> None:
        resolved = (
            list(shards)
            if isinstance(shards, Sequence) and shards and isinstance(shards[0], ResolvedShard)
            else resolve_shards(shards)  # type: ignore[arg-type]
        )
        _check_positive(
            seq_len=seq_len,
            micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size,
            dp_size=dp_size,
        )
        if num_streams is None:
            num_streams = default_num_streams(len(resolved), global_batch_size, dp_size)
        _check_positive(**{"data.streams": num_streams})
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if num_workers < 0:
            raise DataError(f"data.num_workers must be >= 0, got {num_workers}")
        if seed < 0:
            raise DataError(f"data.seed must be >= 0, got {seed}")
        if start_step < 0:
            raise DataError(f"start_step must be >= 0, got {start_step}")
        if num_streams > len(resolved):
            raise DataError(
                f"data.streams {num_streams} exceeds the {len(resolved)} shards: lower "
                f"data.streams or prepare more, smaller shards"
            )
        if global_batch_size % num_streams:
            raise DataError(
                f"data.streams {num_streams} must divide global_batch_size {global_batch_size}"
            )
        if num_streams % dp_size:
            raise DataError(
                f"data.streams {num_streams} must be a multiple of the data-parallel size {dp_size}"
            )
        rows_per_rank = global_batch_size // dp_size
        if rows_per_rank % micro_batch_size:
            raise DataError(
                f"micro_batch_size {micro_batch_size} must divide the {rows_per_rank} rows per "
                f"data-parallel rank (global_batch_size {global_batch_size} / dp {dp_size})"
            )
        local_streams = num_streams // dp_size
        if num_workers and local_streams % num_workers:
            raise DataError(
                f"data.num_workers {num_workers} must divide the {local_streams} streams per "
                f"data-parallel rank (data.streams {num_streams} / dp {dp_size})"
            )
        for shard in resolved:
            if shard.num_tokens == 0:
                raise DataError(f"{shard.path}: shard holds no tokens")

        self.shards = tuple(resolved)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_streams = num_streams
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.start_step = start_step
        self.rows_per_stream = global_batch_size // num_streams
        self.local_streams = range(dp_rank * local_streams, (dp_rank + 1) * local_streams)
        self.fingerprint = shards_fingerprint(self.shards)

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch_size // (self.dp_size * self.micro_batch_size)

    def _dataloader(self) -> DataLoader:
        dataset = _StreamChunks(
            StreamSpec(self.shards, self.num_streams, self.seed, self.shuffle),
            streams=self.local_streams,
            window_tokens=self.seq_len + 1,
            rows_per_stream=self.rows_per_stream,
            start_window=self.start_step * self.rows_per_stream,
        )
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        chunks = iter(self._dataloader())
        while True:
            windows = torch.cat([next(chunks) for _ in self.local_streams])
            for start in range(0, len(windows), self.micro_batch_size):
                batch = windows[start : start + self.micro_batch_size]
                yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self, step: int) -> dict:
        """The data cursor to checkpoint after `step` optimizer steps."""
        return {
            "step": step,
            "num_streams": self.num_streams,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shards_fingerprint": self.fingerprint,
        }

    def check_resume(self, state: dict) -> None:
        """Raise DataError if `state` was saved by a loader whose sample order differs."""
        current = self.state_dict(self.start_step)
        for field in (*STATE_FIELDS, "shards_fingerprint"):
            if state.get(field) != current[field]:
                hint = " (the shard list changed)" if field == "shards_fingerprint" else ""
                raise DataError(
                    f"cannot resume the data stream: {field} was {state.get(field)!r} in the "
                    f"checkpoint, now {current[field]!r}{hint}"
                )
