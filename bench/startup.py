"""Start-up: how long a person waits, measured as they would see it, command by command.

- `tessera --help`: to its exit (no torch import).
- `tessera train --config configs/demo.yaml` (2 ranks, tp=2; a few steps on byte-level shards of
  a few standard-library files): to its first line, to the first step's line, and from the
  summary line to the process's exit.
- `tessera generate` on the checkpoint that run saved, in a pseudo-terminal as from a shell: to
  its first line, and to its output (one new token: the first token).

Each command runs twice, on a warm machine (the second run's figures are reported: the page cache
and Python's bytecode are warm as they are for a user's second command). Targets (issue 20):
first line within 2 s, first step under 15 s, first token under 10 s, exit within 2 s.

Run: .venv/bin/python bench/startup.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from common import write_json

TARGETS_S = {"help": 1.0, "train_first_line": 2.0, "train_first_step": 15.0, "train_exit": 2.0,
             "generate_first_line": 2.0, "generate_first_token": 10.0}


def timed_lines(argv: list[str], marks: dict[str, str], terminal: bool = False
                ) -> dict[str, float]:
    """Seconds from the start of `argv` to its first output line ("first_line"), to the first line
    containing each of `marks`' texts, and to its exit ("exit"). `terminal`: its output goes to
    a pseudo-terminal, as in a person's shell (some lines are for a person only)."""
    started = time.perf_counter()
    if terminal:
        leader, follower = pty.openpty()
        proc = subprocess.Popen(argv, stdout=follower, stderr=follower)
        os.close(follower)
        lines = _pty_lines(leader)
    else:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        lines = proc.stdout
    seen: dict[str, float] = {}
    output = []
    for line in lines:
        now = time.perf_counter() - started
        output.append(line)
        if line.strip() and "warn" not in line.lower():
            seen.setdefault("first_line", now)
        for name, text in marks.items():
            if text in line:
                seen.setdefault(name, now)
    proc.wait()
    seen["exit"] = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{''.join(output)[-3000:]}")
    return seen


def _pty_lines(fd: int):
    """Lines read from a pseudo-terminal's leader side until the follower closes."""
    with os.fdopen(fd, "r", errors="replace") as stream:
        try:
            yield from stream
        except OSError:  # EIO: the command ended
            return


def prepare_data(directory: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [str(p) for p in sorted(stdlib.glob("*.py"))[:40]]
    output = directory / "data"
    subprocess.run([sys.executable, "-m", "tessera", "prepare", *files, "--output", str(output),
                    "--shard-bytes", "262144"], check=True, capture_output=True)
    return output


def measure(directory: Path) -> dict[str, float]:
    data = prepare_data(directory)
    tessera = [sys.executable, "-m", "tessera"]
    figures: dict[str, float] = {}
    for attempt in range(2):  # the second, warm, run counts
        run_dir = directory / f"run{attempt}"
        started = time.perf_counter()
        subprocess.run([*tessera, "--help"], check=True, capture_output=True)
        figures["help"] = time.perf_counter() - started
        train = timed_lines([*tessera, "train", "--config", "configs/demo.yaml",
                             f"data.shards={data}", f"run.dir={run_dir}", "train.steps=3",
                             "log.interval=1", "checkpoint.interval=0", "train.warmup_steps=1"],
                            {"first_step": "step 1/3", "summary": "tessera: finished"})
        figures["train_first_line"] = train["first_line"]
        figures["train_first_step"] = train["first_step"]
        figures["train_exit"] = train["exit"] - train["summary"]
        generate = timed_lines([*tessera, "generate", str(run_dir), "--prompt", "def ",
                                "--max-new-tokens", "1"], {"output": "def "}, terminal=True)
        figures["generate_first_line"] = generate["first_line"]
        figures["generate_first_token"] = generate["output"]
    return {name: round(value, 2) for name, value in figures.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(Path(tmp))
    rows = [{"figure": name, "seconds": seconds, "target_s": TARGETS_S[name],
             "ratio": round(TARGETS_S[name] / seconds, 2) if seconds else None}
            for name, seconds in figures.items()]
    for row in rows:
        print(f"{row['figure']:<22} {row['seconds']:6.2f} s  (target under {row['target_s']} s)")
    print(json.dumps(rows))
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
