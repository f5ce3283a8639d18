"""The global batch of each step: constant, or ramped up (`train.batch_size_ramp`).

Megatron's rule (--rampup-batch-size START INCREMENT SAMPLES): with n = (FINAL - START) /
INCREMENT increments, a step after `consumed` samples has START + i * INCREMENT sequences,
i = min(n, floor(consumed * n / SAMPLES)). The steps of each size follow in closed form (one
phase per size), so the samples before any step, and with them every stream's window there, are
a formula: a run resumed mid-ramp reads no earlier data, at any data-parallel size.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math


@dataclasses.dataclass(frozen=True)
class BatchSizes:
    final: int  # train.global_batch_size
    start: int | None = None  # None: `final` from the first step
    increment: int = 0
    samples: int = 0  # the ramp ends once this many samples are consumed

    @functools.cached_property
    def _phases(self) -> tuple[tuple[int, int, int], ...]:
        """(first step, samples before it, batch) of each size, in order."""
        if self.start is None or self.start >= self.final:
            return ((0, 0, self.final),)
        increments = (self.final - self.start) // self.increment
        phases, step, consumed = [], 0, 0
        while True:
            index = min(increments, consumed * increments // self.samples) if self.samples else \
                increments
            batch = self.start + index * self.increment
            phases.append((step, consumed, batch))
            if index == increments:
                return tuple(phases)
            next_index_at = math.ceil((index + 1) * self.samples / increments)  # samples
            steps = math.ceil((next_index_at - consumed) / batch)
            step, consumed = step + steps, consumed + steps * batch

    def sizes(self) -> list[int]:
        """Every global batch a step has, the final one last."""
        return [batch for _, _, batch in self._phases]

    def _phase(self, step: int) -> tuple[int, int, int]:
        return self._phases[bisect.bisect_right([p[0] for p in self._phases], step) - 1]

    def batch_at(self, step: int) -> int:
        """The global batch of optimizer step `step` (0-based)."""
        return self._phase(step)[2]

    def samples_before(self, step: int) -> int:
        first, consumed, batch = self._phase(step)
        return consumed + (step - first) * batch

    def to_json(self) -> dict | None:
        """What a checkpoint records of the ramp (None: none): resuming needs the same."""
        if self.start is None:
            return None
        return {"start": self.start, "increment": self.increment, "samples": self.samples}
