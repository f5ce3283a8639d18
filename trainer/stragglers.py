"""Stragglers: a rank slower than its peers, named with its host.

In synchronous training every rank's step takes as long as the slowest rank's: the others wait
for it in the step's collectives. What differs is a rank's own time, the work it does before it
first waits on a peer: its data phase and its forward passes. Each rank sums its own time over the
steps since the last log step; at each log step one all-gather of one number per rank shares them
(no wait beyond the all-gather itself). A rank above `resilience.straggler_factor` times the
median of the other ranks for STREAK log steps in a row is named on the console (and in
run.dir/resilience/events.jsonl); `straggler/slowest_rank` and `straggler/ratio` go into every
metrics row.

The forward is a rank's own work where it holds no collective: tensor parallel 1, ZeRO below 3,
one pipeline stage. Elsewhere (the pipeline engine runs its own schedule) own time is the data
phase alone, and with tensor parallelism a slow rank slows its whole tensor-parallel group's
forward: the group is named, with the slowest member first.

Test hook: TESSERA_TEST_STRAGGLER=RANK:SECONDS makes that rank's data phase SECONDS longer in every
step (off when unset).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from tessera.launch import faults

STREAK = 3  # log steps in a row above the factor before a rank is named
TEST_HOOK_VARIABLE = "TESSERA_TEST_STRAGGLER"


class ForwardClock:
    """Time in forward passes, without a host sync: CUDA events read at the next log step (the
    step's loss has synchronized by then), wall time on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.cpu_s = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        if not self.cuda:
            started = time.perf_counter()
            yield
            self.cpu_s += time.perf_counter() - started
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.events.append((start, end))

    def take_s(self) -> float:
        """Seconds since the last call."""
        total = self.cpu_s + sum(start.elapsed_time(end) for start, end in self.events) / 1000
        self.cpu_s, self.events = 0.0, []
        return total


def injected_delay_s(rank: int) -> float:
    """The test hook's delay for this rank (0 when unset or another rank)."""
    value = os.environ.get(TEST_HOOK_VARIABLE, "")
    if not value:
        return 0.0
    try:
        target, seconds = value.split(":")
        return float(seconds) if int(target) == rank else 0.0
    except ValueError:
        raise ValueError(f"{TEST_HOOK_VARIABLE}={value!r}: expected RANK:SECONDS") from None


class Stragglers:
    def __init__(self, factor: float, rank: int, world_size: int, device: torch.device,
                 run_dir: str):
        self.factor = factor
        self.rank = rank
        self.device = device
        self.run_dir = run_dir
        self.own_s = 0.0
        self.steps = 0
        self.streak = [0] * world_size
        self.hosts = [faults.host_name()] * world_size
        if factor and world_size > 1:
            dist.all_gather_object(self.hosts, faults.host_name())

    def add(self, own_s: float) -> None:
        self.own_s += own_s
        self.steps += 1

    def check(self, step: int) -> dict:
        """Collective at a log step: the metrics entries; names a rank slow STREAK times."""
        if not self.factor or len(self.streak) == 1:
            return {}
        mine = torch.tensor([self.own_s / max(self.steps, 1)], dtype=torch.float64,
                            device=self.device)
        gathered = [torch.empty_like(mine) for _ in self.streak]
        dist.all_gather(gathered, mine)
        self.own_s, self.steps = 0.0, 0
        times = [t.item() for t in gathered]
        ratios = [_ratio_to_the_others(times, rank) for rank in range(len(times))]
        slowest = max(range(len(times)), key=ratios.__getitem__)
        for rank, ratio in enumerate(ratios):
            self.streak[rank] = self.streak[rank] + 1 if ratio > self.factor else 0
        named = [r for r in range(len(times)) if self.streak[r] == STREAK]
        if named and self.rank == 0:
            self._name(step, sorted(named, key=ratios.__getitem__, reverse=True), times, ratios)
        return {"straggler/slowest_rank": slowest, "straggler/ratio": round(ratios[slowest], 3)}

    def _name(self, step: int, ranks: list[int], times: list[float], ratios: list[float]
              ) -> None:
        named = ", ".join(f"rank {r} on {self.hosts[r]} ({ratios[r]:.1f}x, "
                          f"{times[r] * 1000:.0f} ms)" for r in ranks[:4])
        print(f"tessera: straggler at step {step}: {named} the median own time (data and "
              f"forward per step) of the other ranks, {STREAK} log steps in a row "
              f"(resilience.straggler_factor={self.factor:g})", file=sys.stderr, flush=True)
        faults.record_event(self.run_dir, "straggler", step=step, ranks=ranks,
                            hosts=sorted({self.hosts[r] for r in ranks}),
                            ratio=round(ratios[ranks[0]], 3))


def _ratio_to_the_others(times: list[float], rank: int) -> float:
    """A rank's own time over the median of the other ranks' (a slow rank does not raise the
    median it is compared with: with 2 ranks, it is compared with its peer)."""
    median = statistics.median(times[:rank] + times[rank + 1:])
    return times[rank] / median if median > 0 else 1.0
