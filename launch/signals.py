"""Stop on a signal at a step boundary that every rank agrees on.

Slurm warns a job `slurm.signal_lead_s` before its time limit with `slurm.signal` (USR2 by
default) and preempts it with SIGTERM. The handler only records the signal; at each step
boundary the loop all-reduces the record (MAX) over all ranks, so every rank stops after the same
step even when only some of them received it. The loop then saves (a collective) and returns
unfinished; `tessera train` exits with PREEMPTED_EXIT_CODE and the Slurm job requeues.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterable
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


# A mistake of the user's (a config key, data, a checkpoint), said in one line by the rank.
USER_ERROR_EXIT_CODE = 2
# EX_TEMPFAIL (sysexits.h): stopped early on a signal after saving; running again resumes.
PREEMPTED_EXIT_CODE = 75
# Ctrl-C: the shell's 128 + SIGINT. Not a preemption: a Slurm job does not requeue on it.
INTERRUPTED_EXIT_CODE = 130


class Interrupted(Exception):
    """Ctrl-C stopped the run at a step boundary, after it saved."""


def parse_signal(name: str) -> signal.Signals:
    """'USR2', 'SIGUSR2' or 'usr2' -> signal.SIGUSR2; ValueError for anything else."""
    upper = name.strip().upper()
    full = upper if upper.startswith("SIG") else "SIG" + upper
    try:
        return signal.Signals[full]
    except KeyError:
        raise ValueError(f"{name!r} is not a signal name (e.g. USR1, USR2, TERM)") from None


class StopSignal:
    """Context manager: while active, the given signals set a flag instead of killing us."""

    def __init__(self, names: Iterable[str]):
        self.signals = list(dict.fromkeys(parse_signal(n) for n in names))
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT == self.received:  # a second Ctrl-C: the user will not wait
            raise KeyboardInterrupt  # for the step boundary (a step that never ends)
        if signum == signal.SIGINT and os.environ.get("RANK", "0") == "0":
            print("tessera: Ctrl-C: saving at the end of this step; press it again to stop now "
                  "without saving", file=sys.stderr, flush=True)
        self.received = signal.Signals(signum)

    def agreed(self, device: torch.device | str = "cpu") -> signal.Signals | None:
        """Collective over the default group: the signal any rank received, or None."""
        import torch  # lazy: `tessera train` prints its first line before torch loads
        import torch.distributed as dist

        flag = torch.tensor([int(self.received or 0)], dtype=torch.int32, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return None
        agreed = signal.Signals(flag.item())
        code = INTERRUPTED_EXIT_CODE if agreed == signal.SIGINT else PREEMPTED_EXIT_CODE
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"tessera: {agreed.name} received: stopping at this step boundary to save and "
                  f"exit (exit code {code}; running again resumes)", flush=True)
        return agreed
