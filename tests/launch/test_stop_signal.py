"""A signal to one rank stops every rank after the same step, saved; the rerun resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from multiproc import run_ranks
from training import losses, read_metrics, tiny_config

from tessera.launch.signals import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE
from tessera.trainer import checkpoint


def _signal_self_after(metrics_file: Path, lines: int, sig: signal.Signals) -> None:
    """From a thread: send `sig` to this process once rank 0 has logged `lines` steps."""
    def watch() -> None:
        while not metrics_file.is_file() or len(metrics_file.read_text().splitlines()) < lines:
            time.sleep(0.005)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, daemon=True).start()


def straight_then_interrupted(straight, interrupted) -> dict:
    """Rank body: an uninterrupted run; then a run whose rank 1 alone gets SIGUSR2 at step 3,
    then the same run again (it resumes)."""
    import torch.distributed as dist

    from tessera.trainer.train import train

    train(straight)
    if dist.get_rank() == 1:
        _signal_self_after(Path(interrupted.run.dir) / "metrics.jsonl", 3, signal.SIGUSR2)
    stopped_at = train(interrupted).step
    finished_at = train(interrupted).step
    return {"stopped_at": stopped_at, "finished_at": finished_at}


def test_usr2_on_one_rank_stops_all_at_one_step_and_resume_is_exact(tmp_path, byte_shards):
    steps = 16
    common = {"train.steps": steps, "checkpoint.interval": 0, "train.grad_clip": 0}
    straight = tiny_config(tmp_path / "straight", byte_shards, **common)
    interrupted = tiny_config(tmp_path / "interrupted", byte_shards, **common)
    rank0, rank1 = run_ranks(2, straight_then_interrupted, straight, interrupted)
    stopped_at = rank0["stopped_at"]
    assert rank1["stopped_at"] == stopped_at, "ranks stopped at different steps"
    assert 3 <= stopped_at < steps
    assert rank0["finished_at"] == rank1["finished_at"] == steps
    # the stop saved a checkpoint at its step; the rerun logged the remaining steps after it
    saved = checkpoint.committed_steps(tmp_path / "interrupted" / "checkpoints")
    assert saved == [stopped_at, steps]
    rows = read_metrics(tmp_path / "interrupted")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert losses(rows) == losses(read_metrics(tmp_path / "straight"))  # bitwise


def _start_train(tmp_path: Path, byte_shards: Path, **overrides) -> tuple[subprocess.Popen, Path]:
    """`tessera train` in a session of its own (its process group: what Slurm and a terminal
    signal), logging to a file; returns once it has logged 2 steps."""
    cfg_args = [f"{k}={v}" for k, v in {
        "run.dir": tmp_path / "run", "run.seed": 3, "data.shards": byte_shards, "data.streams": 2,
        "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.ffn_hidden_size": 176, "model.seq_len": 32,
        "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.steps": 200,
        "checkpoint.interval": 0, **overrides,
    }.items()]
    metrics = tmp_path / "run" / "metrics.jsonl"
    log = tmp_path / "train.log"  # a file, not a pipe: a full pipe would block the run
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tessera", "train", *cfg_args],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no steps logged:\n{log.read_text()}")
        time.sleep(0.05)
    return proc, log


@pytest.mark.parametrize("sig, code, line, whole_group, workers", [
    (signal.SIGTERM, PREEMPTED_EXIT_CODE, "SIGTERM received", False, 0),
    # Slurm's preemption and `scancel --full` signal every process, loader workers included
    (signal.SIGTERM, PREEMPTED_EXIT_CODE, "SIGTERM received", True, 2),
    (signal.SIGUSR2, PREEMPTED_EXIT_CODE, "SIGUSR2 received", True, 1),
    # Ctrl-C (the terminal's whole group): the same save at a step boundary, then one line and
    # the shell's 130 (no requeue)
    (signal.SIGINT, INTERRUPTED_EXIT_CODE, "interrupted (Ctrl-C) and saved at step", True, 1),
], ids=["sigterm", "sigterm-full-workers2", "usr2-full-workers1", "ctrl-c-workers1"])
def test_a_signal_makes_tessera_train_save_and_exit(tmp_path, byte_shards, sig, code, line,
                                                     whole_group, workers):
    proc, log = _start_train(tmp_path, byte_shards, **{"data.num_workers": workers})
    try:
        if whole_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = log.read_text()
    assert proc.returncode == code, output
    assert line in output and "Traceback" not in output, output
    last_step = read_metrics(tmp_path / "run")[-1]["step"]
    assert last_step < 200
    assert checkpoint.latest_tag(tmp_path / "run" / "checkpoints") == checkpoint.tag_for(last_step)


def _ranks_of(run_dir: Path) -> list[int]:
    """Live processes whose command line names `run_dir` (the launcher and its ranks)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and str(run_dir).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_ranks_exit_when_their_launcher_is_killed(tmp_path, byte_shards):
    """SIGKILL to `tessera train` (the launcher of 2 local ranks) while its ranks hang (stopped:
    they reach no collective, no store, no pipe that could tell them): no rank is left."""
    proc, _ = _start_train(tmp_path, byte_shards, **{"launch.nproc_per_node": 2})
    ranks = [pid for pid in _ranks_of(tmp_path / "run") if pid != proc.pid]
    assert len(ranks) >= 2, ranks
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while _ranks_of(tmp_path / "run") and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _ranks_of(tmp_path / "run")
    for pid in left:  # tidy up before failing
        os.kill(pid, signal.SIGKILL)
    assert not left, f"ranks left running 30 s after their launcher died: {left}"


A_STEP_THAT_NEVER_ENDS = """
import time
from tessera.launch.signals import StopSignal
with StopSignal(["TERM", "INT"]) as stop:
    print("ready", flush=True)
    try:
        while True:  # no step boundary comes
            time.sleep(0.05)
    except KeyboardInterrupt:
        print(f"stopped now; recorded {stop.received.name}", flush=True)
"""


def test_a_second_ctrl_c_stops_now_without_waiting_for_the_step():
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    proc = subprocess.Popen([sys.executable, "-c", A_STEP_THAT_NEVER_ENDS], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        time.sleep(1)
        assert proc.poll() is None, "the first Ctrl-C waits for the step boundary"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert out.strip() == "stopped now; recorded SIGINT"
    assert err.strip() == ("tessera: Ctrl-C: saving at the end of this step; press it again to "
                           "stop now without saving")
