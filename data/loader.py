"""The streaming training loader: packed token windows, exact resume, any data-parallel size.

The data is read through a fixed number L of streams (`data.streams`), independent of the
data-parallel size D. Global batch k is stream 0's G/L windows for step k, then stream 1's, ...
Rank r of D owns the rows of streams [r*L/D, (r+1)*L/D), so the global batch does not depend on
D, and ranks read disjoint shards.

Each source (one for `data.shards`; several weighted `data.sources`) is split into lanes: in
epoch e, lane j of a source with L_s lanes reads the shards perm_e[j::L_s] (perm_e: the source's
shards permuted by a generator seeded with (seed, source, e)). A lane is the endless concatenation
of its epochs, cut into windows of seq_len + 1 tokens across document, shard and epoch boundaries.
L_s is the largest divisor of L not above the source's shard count; stream l takes the windows
l // L_s, l // L_s + L/L_s, ... of lane l % L_s (every window of it when L_s = L).

Stream l's n-th window comes from the source `mixture.Schedule` assigns it (always the one source
without a mixture). With `data.shuffle_buffer` B > 0, a stream's windows are emitted in blocks of
B, each block in the order of a permutation seeded by (seed, stream, block).

Everything is a pure function of the step: resuming at step k starts each stream at window
k*G/L, the schedule's closed-form counts give each source's window there, and the manifest token
counts locate the epoch, shard and offset of that window in its lane without reading earlier data
(at most one shuffle block is read again).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import multiprocessing
import signal
import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tessera.data.format import DataError
from tessera.data.mixture import SHARD_ORDER_TAG, Segment, StreamPlan, block_permutation
from tessera.data.ramp import BatchSizes
from tessera.data.reader import BadSamples, read_shard
from tessera.data.sources import (
    DEFAULT_SOURCE,
    ResolvedShard,
    ShardsSpec,
    Source,
    resolve_data,
    resolve_shards,
    schedule_steps,
    shards_fingerprint,
)

__all__ = [
    "DataError",
    "ResolvedShard",
    "Source",
    "TrainLoader",
    "choose_num_streams",
    "default_num_streams",
    "resolve_data",
    "resolve_shards",
    "shards_fingerprint",
]

STATE_FIELDS = ("num_streams", "seq_len", "global_batch_size", "seed", "shuffle", "shuffle_buffer")
DEFAULT_MAX_CONSECUTIVE_ERRORS = 100
DEFAULT_SHUFFLE_BUFFER = 32  # windows per stream shuffled together

log = logging.getLogger("tessera.data")


# ---------------------------------------------------------------------------------------------
# Lanes: one source's shards, read in a seeded order per epoch


def epoch_shard_order(num_shards: int, epoch: int, seed: int, shuffle: bool, key: int = 0
                      ) -> np.ndarray:
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng([seed, SHARD_ORDER_TAG, key, epoch]).permutation(num_shards)


def lanes_for(num_streams: int, num_shards: int) -> int:
    """The largest divisor of num_streams that is at most num_shards."""
    return max(d for d in range(1, min(num_streams, num_shards) + 1) if num_streams % d == 0)


@dataclasses.dataclass(frozen=True)
class Lane:
    source: Source
    index: int
    num_lanes: int
    seed: int
    shuffle: bool

    def shard_indices(self, epoch: int) -> np.ndarray:
        order = epoch_shard_order(
            len(self.source.shards), epoch, self.seed, self.shuffle, self.source.key
        )
        return order[self.index :: self.num_lanes]

    def locate(self, token_offset: int) -> tuple[int, int, int]:
        """(epoch, position in that epoch's shard list, tokens to skip in that shard)."""
        shards = self.source.shards
        epoch = 0
        if not self.shuffle:  # every epoch is the same size
            epoch_tokens = sum(shards[i].num_tokens for i in self.shard_indices(0))
            epoch, token_offset = divmod(token_offset, epoch_tokens)
        while True:
            for position, index in enumerate(self.shard_indices(epoch)):
                num_tokens = shards[index].num_tokens
                if token_offset < num_tokens:
                    return epoch, position, token_offset
                token_offset -= num_tokens
            epoch += 1

    def items(
        self, start_token: int, max_consecutive_errors: int
    ) -> Iterator[np.ndarray | BadSamples]:
        """The lane's token arrays from `start_token` on, with BadSamples events at their place
        (none before `start_token`); EOS filler stands in for what a damaged shard lost.

        A whole epoch of the lane without one readable sample (its only shard empty, say) is a
        DataError, raised before that epoch's last filler: the streams reading the lane would
        see EOS alone. An epoch entered partway (a resume) is not judged."""
        epoch, position, skip_tokens = self.locate(start_token)
        consecutive = 0
        while True:
            indices = self.shard_indices(epoch)
            readable = position > 0  # whether this epoch gave a good sample (or is not judged)
            for place, index in enumerate(indices[position:], position):
                shard = self.source.shards[index]
                seen = 0  # tokens of this shard passed so far
                for item in read_shard(shard):
                    if isinstance(item, BadSamples):
                        consecutive += item.count
                        if consecutive > max_consecutive_errors:
                            raise DataError(
                                f"{item.message or shard.path}: more than "
                                f"{max_consecutive_errors} bad samples in a row "
                                f"(data.max_consecutive_errors); stopping"
                            )
                        if seen >= skip_tokens and (item.count or item.message):
                            yield item
                        if not item.filler_tokens:
                            continue
                        if not readable and place == len(indices) - 1:
                            raise _unreadable_epoch(shard, len(indices))
                        item = np.full(item.filler_tokens, shard.eos_id, dtype=shard.dtype)
                    else:
                        consecutive = 0
                        readable = True
                    end = seen + len(item)
                    if end > skip_tokens:
                        yield item[max(0, skip_tokens - seen) :]
                    seen = end
                skip_tokens = 0
            if not readable:  # (its last shard left no filler to stop before: it held nothing)
                raise _unreadable_epoch(self.source.shards[indices[-1]], len(indices))
            position = 0
            epoch += 1


def _unreadable_epoch(last: ResolvedShard, num_shards: int) -> DataError:
    """The error for an epoch of a lane (`num_shards` shards, `last` read last) in which not one
    sample could be read."""
    others = num_shards - 1
    where = last.path if not others else \
        f"{last.path} and the {others} other shard{'s' * (others > 1)} a data stream reads with it"
    return DataError(
        f"{where}: not one readable sample (empty or not a tar file, or every sample bad; "
        f"`tessera prepare --verify` names the damage): training would see EOS filler only; "
        f"stopping"
    )


class _LaneCutter:
    """Cuts this stream's windows out of a lane: every `stride`-th window, from `offset` on."""

    def __init__(
        self,
        lane: Lane,
        first_window: int,  # this stream's index (in its own windows of this source) to start at
        stride: int,
        offset: int,
        window_tokens: int,
        max_consecutive_errors: int,
        on_bad,
    ) -> None:
        self._stride = stride
        self._offset = offset
        self._window_tokens = window_tokens
        self._pos = (first_window * stride + offset) * window_tokens  # lane token position
        self._items = lane.items(self._pos, max_consecutive_errors)
        self._dtype = np.dtype(lane.source.shards[0].dtype)
        self._head = np.empty(0, dtype=self._dtype)
        self._head_pos = 0
        self._on_bad = on_bad

    def _refill(self) -> None:
        while True:
            item = next(self._items)
            if isinstance(item, BadSamples):
                # Counted once, by the stream that owns the window the event falls in.
                if (self._pos // self._window_tokens) % self._stride == self._offset:
                    self._on_bad(item)
                continue
            if len(item):
                self._head, self._head_pos = item, 0
                return

    def _copy(self, out: np.ndarray | None, count: int) -> None:
        filled = 0
        while filled < count:
            if self._head_pos == len(self._head):
                self._refill()
            n = min(count - filled, len(self._head) - self._head_pos)
            if out is not None:
                out[filled : filled + n] = self._head[self._head_pos : self._head_pos + n]
            filled += n
            self._head_pos += n
            self._pos += n

    def take_into(self, block: np.ndarray, rows: np.ndarray) -> None:
        """Cut the next len(rows) windows of this stream into block[rows[0]], block[rows[1]], ..."""
        for row in rows:
            self._copy(block[row], self._window_tokens)
            if self._stride > 1:
                self._copy(None, (self._stride - 1) * self._window_tokens)


# ---------------------------------------------------------------------------------------------
# Streams


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """What every stream shares; plain values, so that it pickles into DataLoader workers."""

    sources: tuple[Source, ...]
    segments: tuple[Segment, ...]
    num_streams: int
    window_tokens: int
    batch_sizes: BatchSizes
    seed: int
    shuffle: bool
    shuffle_buffer: int
    max_consecutive_errors: int
    warn: bool

    @property
    def block_size(self) -> int:
        return self.shuffle_buffer if self.shuffle and self.shuffle_buffer > 1 else 0

    def rows_at(self, step: int) -> int:
        """Windows each stream gives step `step`."""
        return self.batch_sizes.batch_at(step) // self.num_streams

    def window_at(self, step: int) -> int:
        """Each stream's position (windows handed out) before step `step`."""
        return self.batch_sizes.samples_before(step) // self.num_streams

    def plan(self, stream: int) -> StreamPlan:
        starts = [self.window_at(s.start_step) for s in self.segments]
        return StreamPlan(stream, self.segments, starts, self.block_size, self.seed)


class _Stream:
    """One stream's windows from `start_window` on, in blocks, with the bad samples it counted."""

    def __init__(self, config: StreamConfig, stream: int, start_window: int) -> None:
        self._config = config
        self._stream = stream
        self._plan = config.plan(stream)
        self._sources = {s.name: s for s in config.sources}
        self._cutters: dict[str, _LaneCutter] = {}
        self._dtype = np.dtype(config.sources[0].shards[0].dtype)
        self.skipped = 0  # bad samples counted by this stream so far
        relative = start_window - self._plan.start_window
        assert relative >= 0, "a loader starts at or after the last mixture change"
        block = config.block_size
        self._next_relative = relative - relative % block if block else relative
        self._read = self._plan.read_position(self._next_relative)
        self._block = np.empty((0, config.window_tokens), dtype=self._dtype)
        self._block_pos = 0
        if block and relative % block:
            # Resume inside a block: read it again; its bad samples were counted before.
            before = self.skipped
            self._fill()
            self.skipped = before
            self._block_pos = relative % block

    def _cutter(self, name: str) -> _LaneCutter:
        if name not in self._cutters:
            source = self._sources.get(name)
            if source is None:
                raise DataError(f"source {name!r} of the data mixture is not in data.sources")
            config = self._config
            num_lanes = lanes_for(config.num_streams, len(source.shards))
            lane = Lane(source, self._stream % num_lanes, num_lanes, config.seed, config.shuffle)
            self._cutters[name] = _LaneCutter(
                lane,
                first_window=self._read.get(name, 0),
                stride=config.num_streams // num_lanes,
                offset=self._stream // num_lanes,
                window_tokens=config.window_tokens,
                max_consecutive_errors=config.max_consecutive_errors,
                on_bad=self._on_bad,
            )
        return self._cutters[name]

    def _on_bad(self, event: BadSamples) -> None:
        self.skipped += event.count
        if self._config.warn and event.message:
            log.warning("tessera data: warning: %s", event.message)

    def _fill(self) -> None:
        config = self._config
        size = config.block_size or config.rows_at(0) or 1  # unshuffled: any size reads alike
        schedule = self._plan.schedule
        sources = schedule.sources(self._next_relative, size)
        # Window i of the block is emitted at position emitted_at[i] (identity without shuffle):
        # each window is copied once, straight to where it is emitted.
        emitted_at = np.arange(size)
        if config.block_size:
            number = self._next_relative // config.block_size
            order = block_permutation(config.seed, self._stream, self._plan.segment, number, size)
            emitted_at[order] = np.arange(size)
        block = np.empty((size, config.window_tokens), dtype=self._dtype)
        for index, name in enumerate(schedule.names):
            rows = np.flatnonzero(sources == index)
            if len(rows):
                self._cutter(name).take_into(block, emitted_at[rows])
        self._block, self._block_pos = block, 0
        self._next_relative += size

    def take(self, num_windows: int) -> np.ndarray:
        parts = []
        while num_windows:
            if self._block_pos == len(self._block):
                self._fill()
            n = min(num_windows, len(self._block) - self._block_pos)
            parts.append(self._block[self._block_pos : self._block_pos + n])
            self._block_pos += n
            num_windows -= n
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One worker's rows for one step (its streams' rows, stacked in stream order), the bad
    samples counted while reading them, or the error that stopped a stream (a one-line message,
    raised by the main process)."""

    rows: np.ndarray | None  # [streams * rows per stream, seq_len + 1], the shards' dtype
    skipped: int = 0
    error: str | None = None


def _worker_streams(num_streams: int, worker: int, num_workers: int) -> range:
    """The local streams (indices) DataLoader worker `worker` of `num_workers` reads, in the order
    its Chunk stacks their rows."""
    return range(worker, num_streams, num_workers)


class _StreamChunks(IterableDataset):
    """Per step, one Chunk with the rows of this worker's streams.

    Worker w of W takes the local streams i with i % W == w; the DataLoader's round-robin over
    workers then hands the chunks to the main process in worker order. One item per worker and
    step: handing an item between processes costs far more than its bytes.
    """

    def __init__(self, config: StreamConfig, streams: Sequence[int], start_step: int) -> None:
        self._config = config
        self._streams = tuple(streams)
        self._start_step = start_step

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        try:
            start_window = self._config.window_at(self._start_step)
            streams = [
                _Stream(self._config, self._streams[i], start_window)
                for i in _worker_streams(len(self._streams), worker, num_workers)
            ]
            step = self._start_step
            while True:
                rows, skipped, per_stream = [], 0, self._config.rows_at(step)
                for stream in streams:
                    before = stream.skipped
                    rows.append(stream.take(per_stream))
                    skipped += stream.skipped - before
                yield Chunk(np.concatenate(rows), skipped)
                step += 1
        except DataError as e:
            yield Chunk(None, 0, str(e))


# ---------------------------------------------------------------------------------------------
# The loader


MIN_STREAMS = 8  # the default keeps resumes at data-parallel sizes up to this open


def default_num_streams(num_shards: int, global_batch_size: int, dp_size: int) -> int:
    """The largest L <= num_shards dividing global_batch_size that is a multiple of dp_size, and
    at least MIN_STREAMS where the batch allows it: with fewer shards (a small corpus in one
    shard) the streams share them (each reads its lane whole and keeps its own windows), so any
    prepared data trains at any data-parallel size and resumes at 1, 2, 4 or 8."""
    fitting = [streams for streams in range(dp_size, global_batch_size + 1, dp_size)
               if global_batch_size % streams == 0]
    if not fitting:
        raise DataError(
            f"data-parallel size {dp_size} does not divide the global batch size "
            f"{global_batch_size}: no data.streams fits (it must divide the global batch and be a "
            f"multiple of the data-parallel size)"
        )
    within = [streams for streams in fitting if streams <= num_shards]
    enough = min([streams for streams in fitting if streams >= MIN_STREAMS], default=fitting[-1])
    return max(max(within, default=0), enough)


def choose_num_streams(sources: Sequence[Source], global_batch_size: int, dp_size: int) -> int:
    """default_num_streams for the largest source (smaller sources share lanes)."""
    largest = max(len(s.shards) for s in sources)
    if len(sources) > 1:
        largest = max(largest, dp_size)
    return default_num_streams(largest, global_batch_size, dp_size)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise DataError(f"{name} must be >= 1, got {value}")


def _as_sources(shards: ShardsSpec | Sequence[Source]) -> list[Source]:
    if isinstance(shards, Sequence) and not isinstance(shards, str) and shards:
        if all(isinstance(s, Source) for s in shards):
            return list(shards)
        if all(isinstance(s, ResolvedShard) for s in shards):
            return [Source(DEFAULT_SOURCE, 1.0, tuple(shards))]
    return resolve_data(shards, None)


class TrainLoader:
    """Endless (input_ids, labels) micro-batches of data-parallel rank `dp_rank`.

    Each step is `micro_batches_per_step` micro-batches of int64 [micro_batch_size, seq_len].
    Every `iter()` starts again at `start_step` (after `check_resume`, at the saved cursor).
    `shards` is a `data.shards` spec, a list of ResolvedShard, or a list of Source.
    """

    def __init__(
        self,
        shards: ShardsSpec | Sequence[ResolvedShard] | Sequence[Source],
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
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        start_step: int = 0,
        max_consecutive_errors: int = DEFAULT_MAX_CONSECUTIVE_ERRORS,
        allow_mixture_change: bool = False,
        batch_sizes: BatchSizes | None = None,
        warn: bool = True,
    ) -> None:
        """`batch_sizes`: the global batch of each step (a ramp up to global_batch_size);
        None: global_batch_size throughout."""
        sources = _as_sources(shards)
        _check_positive(
            seq_len=seq_len,
            micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size,
            dp_size=dp_size,
        )
        batch_sizes = batch_sizes or BatchSizes(global_batch_size)
        if num_streams is None:
            num_streams = choose_num_streams(sources, math.gcd(*batch_sizes.sizes()), dp_size)
        _check_positive(**{"data.streams": num_streams})
        for batch in batch_sizes.sizes():
            self._check_layout(
                sources, batch, micro_batch_size, dp_rank, dp_size, num_streams, num_workers
            )
        for name, value in (
            ("data.seed", seed),
            ("start_step", start_step),
            ("data.shuffle_buffer", shuffle_buffer),
            ("data.max_consecutive_errors", max_consecutive_errors),
        ):
            if value < 0:
                raise DataError(f"{name} must be >= 0, got {value}")

        self.sources = tuple(sources)
        self.shards = tuple(s for source in sources for s in source.shards)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_streams = num_streams
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.start_step = start_step
        self.max_consecutive_errors = max_consecutive_errors
        self.allow_mixture_change = allow_mixture_change
        self.warn = warn
        self.batch_sizes = batch_sizes
        local = num_streams // dp_size
        self.local_streams = range(dp_rank * local, (dp_rank + 1) * local)
        # the mixture schedule the config declares, and the segments in effect so far (the
        # history a checkpoint carries: a planned switch is entered when its step is drawn)
        self.plan: tuple[Segment, ...] = planned_segments(self.sources)
        self.segments: tuple[Segment, ...] = (self.plan[0],)
        self.skipped_samples = 0  # over all data-parallel ranks when read through `steps()`
        self.read_done_at = 0.0  # perf_counter() when `steps()` last finished its own reading
        self._plans: list[StreamPlan] = []  # for consumed_tokens, built for `_plans_for`
        self._plans_for: tuple[Segment, ...] | None = None
        self.fingerprint = shards_fingerprint(self.shards)

    @staticmethod
    def _check_layout(
        sources, global_batch_size, micro_batch_size, dp_rank, dp_size, num_streams, num_workers
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if num_workers < 0:
            raise DataError(f"data.num_workers must be >= 0, got {num_workers}")
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

    @property
    def weights(self) -> dict[str, float]:
        """The weights of the loader's first step."""
        return self.weights_at(self.start_step)

    def weights_at(self, step: int) -> dict[str, float]:
        return {s.name: s.weight_at(step) for s in self.sources}

    @property
    def eos_id(self) -> int:
        """The EOS id of the data's tokenizer (every source shares it), where documents end."""
        return self.shards[0].eos_id

    @property
    def micro_batches_per_step(self) -> int:
        """This rank's micro-batches at the loader's first step (`micro_batches_at`)."""
        return self.micro_batches_at(self.start_step)

    def micro_batches_at(self, step: int) -> int:
        return self.batch_sizes.batch_at(step) // (self.dp_size * self.micro_batch_size)

    def stream_config(self) -> StreamConfig:
        return StreamConfig(
            sources=self.sources,
            segments=self.segments,
            num_streams=self.num_streams,
            window_tokens=self.seq_len + 1,
            batch_sizes=self.batch_sizes,
            seed=self.seed,
            shuffle=self.shuffle,
            shuffle_buffer=self.shuffle_buffer,
            max_consecutive_errors=self.max_consecutive_errors,
            warn=self.warn,
        )

    def _dataloader(self, step: int) -> DataLoader:
        dataset = _StreamChunks(self.stream_config(), streams=self.local_streams, start_step=step)
        return DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_keep_chunk,
            worker_init_fn=leave_stop_signals_to_the_trainer if self.num_workers else None,
        )

    def _local_steps(self) -> Iterator[tuple[list[tuple[torch.Tensor, torch.Tensor]], int]]:
        """Per step, this rank's micro-batches and the bad samples its streams counted.
        Raises DataError (one line) when a stream stopped. At the step of a planned mixture
        switch the streams start again there, as a resume at that step would."""
        step, chunks = self.start_step, None
        num_streams, num_workers = len(self.local_streams), max(1, self.num_workers)
        while True:
            if self._enter_planned_segment(step) or chunks is None:
                chunks = iter(self._dataloader(step))
            per_stream = self.batch_sizes.batch_at(step) // self.num_streams
            num_rows = num_streams * per_stream
            step += 1
            inputs = torch.empty((num_rows, self.seq_len), dtype=torch.int64)
            labels = torch.empty((num_rows, self.seq_len), dtype=torch.int64)
            inputs_np, labels_np = inputs.numpy(), labels.numpy()  # views: written in place
            skipped = 0
            for worker in range(num_workers):
                chunk = next(chunks)
                if chunk.error is not None:
                    raise DataError(chunk.error)
                skipped += chunk.skipped
                for k, stream in enumerate(_worker_streams(num_streams, worker, num_workers)):
                    rows = chunk.rows[k * per_stream : (k + 1) * per_stream]
                    at = slice(stream * per_stream, (stream + 1) * per_stream)
                    inputs_np[at] = rows[:, :-1]  # widened to int64 as copied
                    labels_np[at] = rows[:, 1:]
            micro_batches = [
                (inputs[start : start + self.micro_batch_size],
                 labels[start : start + self.micro_batch_size])
                for start in range(0, num_rows, self.micro_batch_size)
            ]
            yield micro_batches, skipped

    def _enter_planned_segment(self, step: int) -> bool:
        """True when a segment of the mixture schedule starts at `step` (now in `segments`)."""
        starts = {segment.start_step: segment for segment in self.plan}
        if step not in starts or self.segments[-1].start_step >= step:
            return False
        self.segments = (*self.segments, Segment(step, starts[step].weights))
        return True

    def _history_at(self, step: int) -> tuple[Segment, ...]:
        """The segments in effect before `step`: those entered, and the planned ones that
        drawing up to `step` enters (a switch at `step` itself is entered when it is drawn)."""
        last = self.segments[-1].start_step
        return self.segments + tuple(s for s in self.plan if last < s.start_step < step)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches, without talking to other ranks (see `steps`)."""
        for micro_batches, skipped in self._local_steps():
            self.skipped_samples += skipped
            yield from micro_batches

    def steps(self, device: torch.device | str | None = None) -> Iterator[list]:
        """Each step's micro-batches, as a list, read before any of them is handed out.

        Under torch.distributed this is collective: every rank (whatever its tp/pp position)
        must draw every step. The ranks agree, in one all-reduce per step, whether any of them
        hit a data error (then every rank raises the same DataError, naming the rank: no rank is
        left waiting in a collective) and on the bad samples skipped over all data-parallel ranks.
        """
        local = self._local_steps()
        while True:
            error, micro_batches, skipped = None, [], 0
            try:
                micro_batches, skipped = next(local)
            except DataError as e:
                error = str(e)
            self.read_done_at = time.perf_counter()  # own work done; the agreement may wait
            if not (dist.is_available() and dist.is_initialized()):
                if error is not None:
                    raise DataError(error)
                self.skipped_samples += skipped
                yield micro_batches
                continue
            flags = torch.tensor(
                [int(error is not None), skipped], dtype=torch.int64, device=device
            )
            dist.all_reduce(flags)
            if int(flags[0]):
                errors: list = [None] * dist.get_world_size()
                dist.all_gather_object(errors, error)
                rank = next(r for r, e in enumerate(errors) if e is not None)
                raise DataError(f"rank {rank}: {errors[rank]}")
            # Every rank of a data-parallel replica (its tp x pp ranks) read the same data.
            self.skipped_samples += int(flags[1]) // (dist.get_world_size() // self.dp_size)
            yield micro_batches

    # -- metrics and the checkpointed cursor ----------------------------------------------

    def consumed_tokens(self, step: int) -> dict[str, int]:
        """Training tokens (seq_len per sequence) each source supplied before `step`, over all
        data-parallel ranks (computed, not counted: the same on every rank)."""
        segments = self._history_at(step)
        if len(self.sources) == 1 and len(segments) == 1:
            return {self.sources[0].name: self.batch_sizes.samples_before(step) * self.seq_len}
        if self._plans_for != segments:
            config = dataclasses.replace(self.stream_config(), segments=segments)
            self._plans = [config.plan(stream) for stream in range(self.num_streams)]
            self._plans_for = segments
        totals: dict[str, int] = {}
        window = self.batch_sizes.samples_before(step) // self.num_streams
        for plan in self._plans:
            for name, windows in plan.emitted(window).items():
                totals[name] = totals.get(name, 0) + windows * self.seq_len
        return totals

    def metrics(self, step: int) -> dict[str, int]:
        """Entries for the metrics row after `step` steps."""
        row = {"data/skipped_samples": self.skipped_samples}
        consumed = self.consumed_tokens(step)
        for name in sorted(s.name for s in self.sources):  # a source still at weight 0 too
            row[f"data/tokens/{name}"] = consumed.get(name, 0)
        return row

    def state_dict(self, step: int) -> dict:
        """The data cursor to checkpoint after `step` optimizer steps (plain JSON values)."""
        return {
            "step": step,
            "num_streams": self.num_streams,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "sources": {s.name: s.fingerprint for s in self.sources},
            "segments": [s.to_json() for s in self._history_at(step)],
            "mixture_schedule": [s.to_json() for s in self.plan],
            "batch_size_ramp": self.batch_sizes.to_json(),
            "skipped_samples": self.skipped_samples,
        }

    def check_resume(self, state: dict) -> None:
        """Adopt a checkpointed cursor, or raise DataError if it would change the sample order.

        The data-parallel size and the workers may change. Changed source weights are refused
        unless `allow_mixture_change`: then the new weights apply from this step on.
        """
        if state.get("step") != self.start_step:
            raise DataError(
                f"cannot resume the data stream: the checkpoint's cursor is at step "
                f"{state.get('step')!r}, the loader starts at step {self.start_step}"
            )
        current = self.state_dict(self.start_step)
        for field in STATE_FIELDS:
            if state.get(field) != current[field]:
                raise DataError(
                    f"cannot resume the data stream: {field} was {state.get(field)!r} in the "
                    f"checkpoint, now {current[field]!r}"
                )
        if state.get("batch_size_ramp") != current["batch_size_ramp"]:
            raise DataError(
                f"cannot resume the data stream: train.batch_size_ramp was "
                f"{state.get('batch_size_ramp')!r} in the checkpoint, now "
                f"{current['batch_size_ramp']!r} (it places every step's data)"
            )
        saved_sources: Mapping[str, str] = state.get("sources") or {}
        for name, fingerprint in current["sources"].items():
            if name in saved_sources and saved_sources[name] != fingerprint:
                raise DataError(
                    f"cannot resume the data stream: the shards of source {name!r} changed "
                    f"(shards_fingerprint differs from the checkpoint's)"
                )
        segments = tuple(Segment.from_json(s) for s in state.get("segments") or ())
        if not segments:
            raise DataError("cannot resume the data stream: the checkpoint has no mixture history")
        # A checkpoint from before mixture schedules: the weights it last drew with, throughout.
        saved = tuple(Segment.from_json(s) for s in state.get("mixture_schedule") or ()) or (
            Segment(0, segments[-1].weights),)
        if saved != self.plan:
            if not self.allow_mixture_change:
                raise DataError(
                    f"cannot resume the data stream: the data mixture changed (weights "
                    f"{describe_plan(saved)} in the checkpoint, now {describe_plan(self.plan)}); "
                    f"set data.allow_mixture_change=true to continue with the new weights from "
                    f"step {self.start_step} on"
                )
            log.warning(
                "tessera data: warning: data mixture changed at step %d: %s -> %s",
                self.start_step, describe_plan(saved), describe_plan(self.plan),
            )
            now = self.weights_at(self.start_step)
            if dict(segments[-1].weights) != now:
                segments = (*segments, Segment(self.start_step, now))
        self.segments = segments
        self.skipped_samples = int(state.get("skipped_samples", 0))

    load_state_dict = check_resume


def planned_segments(sources: Sequence[Source]) -> tuple[Segment, ...]:
    """The mixture schedule of `data.sources`: a segment from each step where a weight is set."""
    return tuple(Segment(step, {s.name: s.weight_at(step) for s in sources})
                 for step in schedule_steps(sources))


def describe_plan(plan: Sequence[Segment]) -> str:
    """{name: weight} for constant weights, else {step: {name: weight}, ...}."""
    if len(plan) == 1:
        return str(dict(plan[0].weights))
    return str({segment.start_step: dict(segment.weights) for segment in plan})


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A loader worker ignores the signals that stop a run. Slurm's preemption, time limit and
    `scancel --full` signal every process of the job, and Ctrl-C the whole process group: a
    worker that died of it would crash the trainer ("DataLoader worker exited unexpectedly")
    before its agreed save. The worker still ends with the trainer (torch's watch on it)."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)


@atexit.register  # (after multiprocessing's own exit handler, so it runs before it)
def _end_workers_at_exit() -> None:
    """Multiprocessing ends a process's daemonic children at exit with SIGTERM, then waits for
    them. Loader workers ignore SIGTERM (above): a trainer that exits with its loader still open
    (an error nobody caught keeps the loader's frames alive) would wait forever. SIGKILL them
    first; they hold nothing to save (and leave torch's SIGCHLD handler out: it would raise
    "worker killed" over the error being reported)."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for worker in workers:
            worker.kill()


def _keep_chunk(chunk: Chunk) -> Chunk:
    return chunk
