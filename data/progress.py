"""Progress of a long command (prepare, verify, convert, reshard, generate's loading), and the
human-readable counts and durations of Tessera's lines and reports.

On a terminal a tqdm bar, redrawn in place and closed by a newline (so what the command prints
next starts on a line of its own); in a log file or a pipe a plain line every `interval_s`
seconds (10 by default) and a final one:

    with progress("verify", total=len(files), unit="files") as bar:
        for path in files:
            check(path)
            bar.advance(1, note=path.name)

`advance` may carry named counts shown with their rates (`bar.advance(n_bytes, documents=3,
tokens=1200)`); it costs a clock read when nothing is drawn, so it can be called per item.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 10.0


def human_count(value: float, *, fraction_below_1000: bool = False) -> str:
    """1234567 -> '1.2M'. Below 1000 a whole number; with `fraction_below_1000`, one decimal
    for a value that has a fraction (a rate of 2.5 files/s)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    if fraction_below_1000 and not float(value).is_integer():
        return f"{value:.1f}"
    return f"{value:.0f}"


def counted(count: int, noun: str) -> str:
    """1 -> '1 shard', 1204 -> '1,204 shards' (nouns whose plural adds an s)."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def human_bytes(num_bytes: float) -> str:
    """1536 -> '1.5 KB' (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError


def clock_text(seconds: float) -> str:
    """A duration as H:MM:SS, or M:SS under an hour."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _rate(value: float) -> str:
    return human_count(value, fraction_below_1000=True)


class Progress:
    """Counts work done out of `total` (None: unknown), as a bar or as lines.

    `write`: where plain lines go (default: stderr); `interactive`: a tqdm bar instead (default:
    when the lines would go to a terminal)."""

    def __init__(
        self,
        label: str,
        total: float | None = None,
        unit: str = "items",
        *,
        write: Callable[[str], None] | None = None,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        interval_s: float | None = None,
        done: float = 0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stream = stream or sys.stderr
        self.interactive = (write is None and self.stream.isatty()) if interactive is None \
            else interactive
        self.write = write or self._write_line
        self.label, self.total, self.unit = label, total, unit
        self.interval_s = LOG_INTERVAL_S if interval_s is None else interval_s
        self.clock = clock
        self.started = self.last_drawn = clock()
        self.first_done = self.done = done  # done: already covered (a resumed command)
        self.counts: dict[str, float] = {}
        self.note = ""
        self._bar = self._tqdm() if self.interactive else None

    def _tqdm(self) -> tqdm:
        return tqdm(total=self.total, initial=self.done, desc=self.label, unit=self.unit,
                    unit_scale=self.unit == "B", file=self.stream, leave=True, dynamic_ncols=True,
                    mininterval=min(self.interval_s, 0.2))

    def advance(self, amount: float = 1, note: str | None = None, **counts: float) -> None:
        self.done += amount
        for name, value in counts.items():
            self.counts[name] = self.counts.get(name, 0) + value
        if note is not None:
            self.note = note
        if self._bar is not None:
            self._bar.update(amount)
            if counts or note is not None:
                self._bar.set_postfix_str(self._details(self.clock()), refresh=False)
            return
        now = self.clock()
        if now - self.last_drawn >= self.interval_s:
            self.last_drawn = now
            self.write(self.line(now))

    def line(self, now: float | None = None, final: bool = False) -> str:
        """The plain line: label, share done, counts with their rates, ETA (or total time)."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        rate = (self.done - self.first_done) / elapsed
        parts = [self.label]
        if self.total:
            parts.append(f"{100 * min(self.done / self.total, 1.0):5.1f}%")
            parts.append(f"{_rate(self.done)}/{_rate(self.total)} {self.unit}")
        else:
            parts.append(f"{_rate(self.done)} {self.unit}")
        parts.append(f"{_rate(rate)} {self.unit}/s")
        details = self._details(now)
        if details:
            parts.append(details)
        if final:
            parts.append(f"in {clock_text(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"ETA {clock_text((self.total - self.done) / rate)}")
        if self.note and not final:
            parts.append(self.note)
        return "  ".join(parts)

    def _details(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        return "  ".join(f"{value:,.0f} {name} ({_rate(value / elapsed)}/s)"
                         for name, value in self.counts.items())

    def finish(self, completed: bool = True) -> None:
        """The bar closed by a newline; or, in a log, a last plain line when the work completed
        (a failure's own message says enough)."""
        if self._bar is not None:
            self._bar.set_postfix_str(self._details(self.clock()), refresh=False)
            self._bar.close()
        elif completed:
            self.write(self.line(final=True))

    def _write_line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


@contextlib.contextmanager
def progress(label: str, total: float | None = None, unit: str = "items",
             **options) -> Iterator[Progress]:
    """A Progress that finishes when the block ends (also on an error: a terminal's bar is
    closed before the error message)."""
    bar = Progress(label, total, unit, **options)
    try:
        yield bar
    except BaseException:
        bar.finish(completed=False)
        raise
    bar.finish()
