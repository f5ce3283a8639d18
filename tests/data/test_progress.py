"""The one progress helper: a tqdm bar on a terminal (closed by a newline), plain lines in a
log; and the human-readable counts and durations."""

from __future__ import annotations

import io

import pytest

from tessera.data.progress import (
    Progress,
    clock_text,
    counted,
    human_bytes,
    human_count,
    progress,
)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_closed_by_a_newline():
    stream = Terminal()
    with progress("verify", total=40, unit="files", stream=stream) as bar:
        for _ in range(40):
            bar.advance(1, note="shard-000001.tar")
    text = stream.getvalue()
    assert text.endswith("\n") and "\r" in text  # redrawn in place, then closed
    final = text.rstrip("\n").split("\r")[-1]
    assert final.startswith("verify: 100%") and "40/40" in final and "files" in final


def test_a_log_gets_a_plain_line_every_interval():
    lines, clock = [], Clock()
    bar = Progress("convert", total=None, unit="tensors", write=lines.append, interval_s=10.0,
                   clock=clock)
    for _ in range(25):
        clock.now += 1.0
        bar.advance(2)
    bar.finish()
    assert lines == [
        "convert  20 tensors  2 tensors/s",
        "convert  40 tensors  2 tensors/s",
        "convert  50 tensors  2 tensors/s  in 0:25",
    ]


def test_lines_show_named_counts_with_rates_and_an_eta():
    lines, clock = [], Clock()
    bar = Progress("prepare", total=1000, unit="B", write=lines.append, interval_s=1.0,
                   clock=clock, done=100)  # a resumed run: 100 bytes were done before
    clock.now = 2.0
    bar.advance(300, documents=4, tokens=1500)
    assert lines == ["prepare   40.0%  400/1.0k B  150 B/s  4 documents (2/s)  1,500 tokens "
                     "(750/s)  ETA 0:04"]


def test_the_final_line_is_drawn_when_the_work_fails():
    stream = Terminal()
    with pytest.raises(RuntimeError), progress("prepare", 10, stream=stream) as bar:
        bar.advance(3)
        raise RuntimeError("disk full")
    assert stream.getvalue().endswith("\n") and "3/10" in stream.getvalue()


def test_counts_and_durations_read_as_people_write_them():
    assert (human_count(1_234_567), human_count(999), human_count(2.5)) == ("1.2M", "999", "2")
    assert human_count(2.5, fraction_below_1000=True) == "2.5"
    assert (human_bytes(512), human_bytes(1536), human_bytes(3 * 2**30)) == \
        ("512 B", "1.5 KB", "3.0 GB")
    assert (clock_text(65), clock_text(3725)) == ("1:05", "1:02:05")


def test_counted_says_one_in_the_singular():
    assert [counted(n, "shard") for n in (0, 1, 2, 1204)] == [
        "0 shards", "1 shard", "2 shards", "1,204 shards"]
