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


@pytest.mark.parametrize("sig, code, line", [
    (signal.SIGTERM, PREEMPTED_EXIT_CODE, "SIGTERM received"),
    # Ctrl-C: the same save at a step boundary, then one line and the shell's 130 (no requeue)
    (signal.SIGINT, INTERRUPTED_EXIT_CODE, "interrupted (Ctrl-C) and saved at step"),
], ids=["sigterm", "ctrl-c"])
def test_a_signal_makes_tessera_train_save_and_exit(tmp_path, byte_shards, sig, code, line):
    cfg_args = [f"{k}={v}" for k, v in {
        "run.dir": tmp_path / "run", "run.seed": 3, "data.shards": byte_shards, "data.streams": 2,
        "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.ffn_hidden_size": 176, "model.seq_len": 32,
        "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.steps": 200,
        "checkpoint.interval": 0,
    }.items()]
    metrics = tmp_path / "run" / "metrics.jsonl"
    log = tmp_path / "train.log"  # a file, not a pipe: a full pipe would block the run
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tessera", "train", *cfg_args],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no steps logged in 300 s"
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert proc.returncode == code, output
    assert line in output and "Traceback" not in output, output
    last_step = read_metrics(tmp_path / "run")[-1]["step"]
    assert last_step < 200
    assert checkpoint.latest_tag(tmp_path / "run" / "checkpoints") == checkpoint.tag_for(last_step)
