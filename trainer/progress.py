"""Progress of a long interactive command (prepare, convert, verify): a bar on a terminal, plain
lines otherwise (a log file or a pipe gets a line every `interval_s` seconds and a final one).

    with progress("verify", total=len(files), unit="files") as bar:
        for path in files:
            check(path)
            bar.advance(1, note=path.name)

`advance` costs a clock read when nothing is drawn, so it can be called per item. The bar goes to
stderr, leaving stdout to the command's results.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from tessera.data.progress import human_count

BAR_WIDTH = 24


def _count(value: float) -> str:
    return human_count(value, fraction_below_1000=True)


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Counts work done out of `total` (None: unknown) and shows it."""

    def __init__(
        self,
        label: str,
        total: float | None,
        unit: str = "items",
        *,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.interval_s = (
            interval_s if interval_s is not None else (0.2 if self.interactive else 10.0)
        )
        self.clock = clock
        self.started = clock()
        self.last_drawn = self.started
        self.done = 0.0
        self.note = ""

    def advance(self, amount: float = 1, note: str | None = None) -> None:
        self.done += amount
        if note is not None:
            self.note = note
        now = self.clock()
        if now - self.last_drawn >= self.interval_s:
            self.last_drawn = now
            self._draw(now)

    def line(self, now: float | None = None, final: bool = False) -> str:
        now = self.clock() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        parts = [self.label]
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            if self.interactive:
                filled = round(fraction * BAR_WIDTH)
                parts.append("[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]")
            parts.append(f"{100 * fraction:5.1f}%")
            parts.append(f"{_count(self.done)}/{_count(self.total)} {self.unit}")
        else:
            parts.append(f"{_count(self.done)} {self.unit}")
        parts.append(f"{_count(rate)} {self.unit}/s")
        if final:
            parts.append(f"in {_clock(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        if self.note and not final:
            parts.append(self.note)
        return "  ".join(parts)

    def _draw(self, now: float | None = None, final: bool = False) -> None:
        text = self.line(now, final)
        if self.interactive:
            self.stream.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        self._draw(final=True)


@contextlib.contextmanager
def progress(
    label: str, total: float | None = None, unit: str = "items", **options
) -> Iterator[Progress]:
    """A Progress that draws its final line when the block ends (also on an error, so the
    terminal line is closed before the error message)."""
    bar = Progress(label, total, unit, **options)
    try:
        yield bar
    finally:
        bar.finish()
