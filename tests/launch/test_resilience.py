"""Faults under `tessera train` with 2 local ranks: a stopped rank is named within the hang
timeout, every live rank writes its stacks, and the launch restarts from the last checkpoint; a
rank killed with SIGKILL is restarted too and its host gets a strike; either way the run ends with
losses bitwise equal to an uninterrupted one. (The same on the 2-node Slurm cluster, through
`tessera submit`: tests/launch/test_slurm_cluster.py.)"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training import last_losses, losses, rank_pid, read_metrics

from tessera.launch import faults
from tessera.launch.watchdog import FILE_OPS_PER_S, waiting_collective, watch_intervals
from tessera.trainer.status import status_lines

pytestmark = pytest.mark.slow

STEPS = 16
HANG_TIMEOUT_S = 5


def train_args(run_dir: Path, shards: Path, **overrides) -> list[str]:
    values = {
        "run.dir": run_dir, "run.seed": 3, "data.shards": shards, "data.streams": 2,
        "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.ffn_hidden_size": 176, "model.seq_len": 32,
        "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.steps": STEPS,
        "train.grad_clip": 0, "checkpoint.interval": 4, "launch.nproc_per_node": 2,
        "resilience.hang_timeout_s": HANG_TIMEOUT_S, **overrides,
    }
    return [sys.executable, "-m", "tessera", "train", *(f"{k}={v}" for k, v in values.items())]


@pytest.fixture(scope="module")
def straight(byte_shards, tmp_path_factory) -> list[float]:
    """The losses of the same run, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    done = subprocess.run(train_args(run_dir, byte_shards), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return losses(read_metrics(run_dir))



def fault_mid_run(run_dir: Path, shards: Path, log: Path, sig: signal.Signals
                  ) -> tuple[subprocess.CompletedProcess, dict[str, float]]:
    """`tessera train`; `sig` to rank 1 once 6 steps are logged. Returns the finished process
    and seconds from the fault to the hang's summary and to the next step logged."""
    with open(log, "w") as out:
        proc = subprocess.Popen(train_args(run_dir, shards), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    seconds: dict[str, float] = {}
    try:
        wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 6, proc)
        os.kill(rank_pid(run_dir, 1), sig)
        fault = time.monotonic()
        rows = len(metrics.read_text().splitlines())
        hangs = run_dir / faults.HANGS_DIR
        while proc.poll() is None:
            if "named" not in seconds and list(hangs.glob("*/summary.txt")):
                seconds["named"] = time.monotonic() - fault
            if "training" not in seconds and len(metrics.read_text().splitlines()) != rows:
                seconds["training"] = time.monotonic() - fault
            time.sleep(0.05)
            assert time.monotonic() - fault < 300, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"{sig.name}: seconds from the fault: {seconds}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text()), seconds



def wait_for(predicate, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended early"
        time.sleep(0.05)


def test_a_stopped_rank_is_named_its_peers_stacks_written_and_the_run_restarts(
        tmp_path, byte_shards, straight):
    run_dir = tmp_path / "run"
    done, seconds = fault_mid_run(run_dir, byte_shards, tmp_path / "log", signal.SIGSTOP)
    assert done.returncode == 0, done.stdout
    host = socket.gethostname()
    line = next(line for line in done.stdout.splitlines() if "tessera: hang at step" in line)
    assert f"rank 1 on {host} stopped (no heartbeat for" in line, line
    assert seconds["named"] < HANG_TIMEOUT_S + 30
    [hang_dir] = (run_dir / faults.HANGS_DIR).iterdir()
    stacks = (hang_dir / "rank-00000.txt").read_text()
    assert "rank 0 on" in stacks and 'File "' in stacks, stacks  # a Python stack of every thread
    assert not (hang_dir / "rank-00001.txt").exists()  # it was stopped: no stack
    # torch's Flight Recorder: the collective rank 0 waits in (a step's or a save's), unfinished,
    # and the code that called it
    trace = pickle.loads((hang_dir / "flight-recorder" / "rank-00000").read_bytes())
    waiting = trace["entries"][-1]
    assert waiting["profiling_name"].startswith("gloo:") and not waiting["retired"], waiting
    assert any("trainer" in frame["filename"] for frame in waiting["frames"]), waiting
    # ... which the line names too
    assert f"rank 0 waits in {waiting['profiling_name']} #{waiting['collective_seq_id']} " in line
    assert "restart 1 of 3" in done.stdout
    assert last_losses(run_dir) == straight  # bitwise, over the restart
    status = "\n".join(status_lines(run_dir))
    assert "hangs 1" in status and "restarts 1" in status, status


def test_a_killed_rank_restarts_from_the_last_checkpoint_with_a_strike_on_its_host(
        tmp_path, byte_shards, straight):
    run_dir = tmp_path / "run"
    done, _ = fault_mid_run(run_dir, byte_shards, tmp_path / "log", signal.SIGKILL)
    assert done.returncode == 0, done.stdout
    host = socket.gethostname()
    # (rank 0 may be named too: the launcher can kill it before it records its peer's error)
    [line] = [line for line in done.stdout.splitlines() if "killed or crashed without" in line]
    assert f"rank 1 on {host} (" in line, line
    assert "restart 1 of 3" in done.stdout
    assert faults.host_strikes(run_dir)[host]["strikes"] >= 1
    assert last_losses(run_dir) == straight


def test_the_waiting_collective_is_the_oldest_unfinished_one():
    """The Flight Recorder keeps finished collectives too (retired, or completed with NCCL)."""
    def entry(seq: int, retired: bool, state: str = "scheduled") -> dict:
        return {"profiling_name": "nccl:all_reduce", "collective_seq_id": seq,
                "process_group": ("3", "tp"), "retired": retired, "state": state}

    trace = {"entries": [entry(7, True), entry(8, False, "completed"), entry(9, False),
                         entry(10, False)]}
    assert waiting_collective(pickle.dumps(trace)) == "nccl:all_reduce #9 of group tp"
    assert waiting_collective(pickle.dumps({"entries": [entry(7, True)]})) is None
    assert waiting_collective(b"not a trace") is None


@pytest.mark.parametrize("timeout_s, small_job", [(0, (30.0, 1.0)), (5, (0.5, 0.5)),
                                                  (600, (10.0, 1.0))])
def test_the_watchdogs_file_traffic_stays_bounded_at_any_world_size(timeout_s, small_job):
    """Each rank writes a heartbeat (2 operations) every beat_s and looks at 2 files every poll_s;
    a small job keeps the quick intervals, a large one stays within the budget."""
    def ops_per_s(world_size: int) -> float:
        beat_s, poll_s = watch_intervals(timeout_s, world_size)
        return world_size * (2 / beat_s + 2 / poll_s)

    assert watch_intervals(timeout_s, 8) == small_job
    for world_size in (500, 2048, 8192, 65536):
        assert ops_per_s(world_size) <= FILE_OPS_PER_S * 1.0001, world_size
    assert watch_intervals(600, 8192) == (16.384, 16.384)
