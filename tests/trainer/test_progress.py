"""The shared progress helper: a bar redrawn in place on a terminal, plain lines in a log."""

from __future__ import annotations

import io

import pytest
from tessera.trainer.progress import Progress, progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_terminal_gets_one_bar_redrawn_in_place():
    stream, clock = io.StringIO(), Clock()
    with progress(
        "verify",
        total=40,
        unit="files",
        stream=stream,
        interactive=True,
        interval_s=0.25,
        clock=clock,
    ) as bar:
        for _ in range(40):
            clock.now += 0.125
            bar.advance(1, note="shard-000001.tar")
    text = stream.getvalue()
    assert "\n" not in text.rstrip("\n") and text.endswith("\n")  # one line, closed at the end
    frames = text.strip("\n").split("\r")[1:]
    assert len(frames) == 21  # every 0.25 s, plus the final frame
    assert frames[9].startswith(
        "verify  [############------------]   50.0%  20/40 files  8 files/s"
    )
    assert "ETA 0:02" in frames[9] and "shard-000001.tar" in frames[9]
    assert frames[-1].startswith("verify  [########################]  100.0%  40/40 files")
    assert "in 0:05" in frames[-1]


def test_log_gets_a_plain_line_every_interval():
    stream, clock = io.StringIO(), Clock()
    bar = Progress(
        "convert",
        total=None,
        unit="tensors",
        stream=stream,
        interactive=False,
        interval_s=10.0,
        clock=clock,
    )
    for _ in range(25):
        clock.now += 1.0
        bar.advance(2)
    bar.finish()
    lines = stream.getvalue().splitlines()
    assert lines == [
        "convert  20 tensors  2 tensors/s",
        "convert  40 tensors  2 tensors/s",
        "convert  50 tensors  2 tensors/s  in 0:25",
    ]
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_final_line_is_drawn_when_the_work_fails():
    stream = io.StringIO()
    with (
        pytest.raises(RuntimeError),
        progress("prepare", 10, stream=stream, interactive=True) as bar,
    ):
        bar.advance(3)
        raise RuntimeError("disk full")
    assert stream.getvalue().endswith("\n") and "3/10 items" in stream.getvalue()
