"""Which source each window of a stream comes from, as a pure function of the position.

A stream's windows are split between sources by a binary tree over the sources (sorted by name):
at each node, the m-th window reaching it goes left iff floor((m+1)p + b) > floor(m p + b), with
p the left subtree's share of the weight and b a seeded phase in [0, 1). So the number of windows
of each source among a stream's first n is a closed form (no scan over earlier windows): resume
at any step costs a few multiplications, and every source's count stays within one window per
tree level of n * weight / total (deterministic, low-discrepancy sampling by weight).

A run whose weights were changed on resume (`data.allow_mixture_change`) keeps the old schedule
up to the step of the change and the new one after it: the history is a list of segments.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

# Distinct first words of the generator seeds used by the loader.
PERM_TAG, PHASE_TAG, SHARD_ORDER_TAG = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Segment:
    """From `start_step` on (until the next segment), sources are drawn with `weights`."""

    start_step: int
    weights: Mapping[str, float]

    def to_json(self) -> dict:
        return {"start_step": self.start_step, "weights": dict(sorted(self.weights.items()))}

    @classmethod
    def from_json(cls, raw: dict) -> Segment:
        return cls(int(raw["start_step"]), {str(k): float(v) for k, v in raw["weights"].items()})


class Schedule:
    """The source of each window of one stream within one segment (see the module doc)."""

    def __init__(self, weights: Mapping[str, float], phases_seed: Sequence[int]) -> None:
        self.names = sorted(name for name, w in weights.items() if w > 0)
        assert self.names, "a segment needs a source of positive weight"
        values = [float(weights[name]) for name in self.names]
        self._nodes: list[tuple[int, int, int, float]] = []  # (lo, mid, hi, left share)
        self._add_nodes(values, 0, len(values))
        self._phases = np.random.default_rng(list(phases_seed)).random(max(1, len(self._nodes)))

    def _add_nodes(self, values: list[float], lo: int, hi: int) -> None:
        if hi - lo <= 1:
            return
        mid = (lo + hi) // 2
        left, right = math.fsum(values[lo:mid]), math.fsum(values[mid:hi])
        self._nodes.append((lo, mid, hi, left / (left + right)))
        self._add_nodes(values, lo, mid)
        self._add_nodes(values, mid, hi)

    def counts(self, n: np.ndarray | int) -> np.ndarray:
        """Windows of each source (columns, in `names` order) among the first `n` (rows)."""
        n = np.atleast_1d(np.asarray(n, dtype=np.int64))
        out = np.zeros((len(n), len(self.names)), dtype=np.int64)
        self._split(0, 0, len(self.names), n, out)
        return out

    def _split(self, node: int, lo: int, hi: int, m: np.ndarray, out: np.ndarray) -> int:
        """Distribute the node-local counts `m`; returns the next unused node index (preorder)."""
        if hi - lo == 1:
            out[:, lo] = m
            return node
        _, mid, _, share = self._nodes[node]
        phase = self._phases[node]
        left = (np.floor(m * share + phase) - math.floor(phase)).astype(np.int64)
        next_node = self._split(node + 1, lo, mid, left, out)
        return self._split(next_node, mid, hi, m - left, out)

    def sources(self, start: int, count: int) -> np.ndarray:
        """The source index (into `names`) of windows start .. start + count - 1."""
        cumulative = self.counts(np.arange(start, start + count + 1))
        return np.argmax(np.diff(cumulative, axis=0), axis=1)

    def count_dict(self, n: int) -> dict[str, int]:
        return dict(zip(self.names, (int(c) for c in self.counts(n)[0])))


def block_permutation(seed: int, stream: int, segment: int, block: int, size: int) -> np.ndarray:
    """The order in which a shuffle block's windows are emitted."""
    return np.random.default_rng([seed, PERM_TAG, stream, segment, block]).permutation(size)


def add_counts(into: dict[str, int], more: Mapping[str, int]) -> None:
    for name, count in more.items():
        into[name] = into.get(name, 0) + int(count)


class StreamPlan:
    """One stream's schedule over the whole segment history.

    `read_base` (windows taken from each source before the last segment started) and
    `emitted_base` (windows handed out) differ by the windows of a shuffle block that was cut
    short by a mixture change: they were read, never emitted, and are not read again.
    """

    def __init__(
        self,
        stream: int,
        segments: Sequence[Segment],
        segment_starts: Sequence[int],  # the stream's window at each segment's first step
        block_size: int,  # windows per shuffle block; 0 = no sample shuffling
        seed: int,
    ) -> None:
        self.stream = stream
        self.block_size = block_size
        self.seed = seed
        self.schedules = [
            Schedule(s.weights, [seed, PHASE_TAG, stream, index])
            for index, s in enumerate(segments)
        ]
        self.starts = list(segment_starts)
        self.read_base: dict[str, int] = {}
        self.emitted_base: dict[str, int] = {}
        for index in range(len(segments) - 1):
            length = self.starts[index + 1] - self.starts[index]
            read_length = length
            if block_size:
                read_length = -(-length // block_size) * block_size
            add_counts(self.read_base, self.schedules[index].count_dict(read_length))
            add_counts(self.emitted_base, self._emitted_in(index, length))

    @property
    def segment(self) -> int:
        return len(self.schedules) - 1

    @property
    def schedule(self) -> Schedule:
        return self.schedules[-1]

    @property
    def start_window(self) -> int:
        return self.starts[-1]

    def _emitted_in(self, segment: int, length: int) -> dict[str, int]:
        schedule = self.schedules[segment]
        if not self.block_size:
            return schedule.count_dict(length)
        full_blocks, partial = divmod(length, self.block_size)
        counts = schedule.count_dict(full_blocks * self.block_size)
        if partial:
            block_start = full_blocks * self.block_size
            sources = schedule.sources(block_start, self.block_size)
            order = block_permutation(self.seed, self.stream, segment, full_blocks, self.block_size)
            taken = np.bincount(sources[order[:partial]], minlength=len(schedule.names))
            add_counts(counts, dict(zip(schedule.names, taken)))
        return counts

    def emitted(self, window: int) -> dict[str, int]:
        """Windows of each source this stream has handed out before its window `window`."""
        assert window >= self.start_window
        counts = dict(self.emitted_base)
        add_counts(counts, self._emitted_in(self.segment, window - self.start_window))
        return counts

    def read_position(self, relative_window: int) -> dict[str, int]:
        """Windows read from each source before the last segment's window `relative_window`."""
        counts = dict(self.read_base)
        add_counts(counts, self.schedule.count_dict(relative_window))
        return counts
