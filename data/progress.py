"""The progress line of `tessera prepare`: documents/s, tokens/s and an ETA from input bytes."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def human_count(value: float, *, fraction_below_1000: bool = False) -> str:
    """1234567 -> '1.2M'. Below 1000 a whole number; with `fraction_below_1000`, one decimal
    for a value that has a fraction (a rate of 2.5 files/s)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    if fraction_below_1000 and not float(value).is_integer():
        return f"{value:.1f}"
    return f"{value:.0f}"


def _clock_text(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts documents, tokens and input bytes; writes a line every `interval_s` seconds."""

    def __init__(
        self,
        total_bytes: int,
        write: Callable[[str], None],
        *,
        interval_s: float = 1.0,
        done_bytes: int = 0,  # input already covered by shards of an interrupted run
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_bytes = max(1, total_bytes)
        self.write = write
        self.interval_s = interval_s
        self.clock = clock
        self.started = clock()
        self.last_written = self.started
        self.first_bytes = self.done_bytes = done_bytes
        self.docs = 0
        self.tokens = 0

    def update(self, docs: int, tokens: int, done_bytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.done_bytes = max(self.done_bytes, done_bytes)
        now = self.clock()
        if now - self.last_written >= self.interval_s:
            self.last_written = now
            self.write(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (self.clock() if now is None else now) - self.started)
        fraction = min(1.0, self.done_bytes / self.total_bytes)
        byte_rate = (self.done_bytes - self.first_bytes) / elapsed
        remaining = self.total_bytes - self.done_bytes
        eta = _clock_text(remaining / byte_rate) if byte_rate > 0 else "?"
        return (
            f"{100 * fraction:5.1f}%  {self.docs:,} documents ({human_count(self.docs / elapsed)}/s)  "
            f"{human_count(self.tokens)} tokens ({human_count(self.tokens / elapsed)}/s)  ETA {eta}"
        )

    def finish(self) -> None:
        self.done_bytes = self.total_bytes
        self.write(self.line())


def terminal_writer(stream=None) -> tuple[Callable[[str], None], float]:
    """(write, interval_s): one line rewritten in place on a terminal; a line every 10 s in a
    log file."""
    stream = stream or sys.stderr
    if stream.isatty():

        def write(line: str) -> None:
            stream.write("\r" + line + "\x1b[K")
            stream.flush()

        return write, 0.5

    def write_line(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

    return write_line, 10.0
