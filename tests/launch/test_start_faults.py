"""Faults at start-up: a rank that cannot start stops its peers within seconds (naming itself),
rather than leaving them in a collective until its timeout; a run.dir the ranks do not share is
refused at start, naming the ranks that cannot see rank 0's files."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest
from multiproc import _entry, run_ranks
from training import tiny_config

from tessera.launch import faults
from tessera.launch.local import free_port
from tessera.trainer.config import ConfigError

ANSWER_S = 30  # generous on a loaded 2-core machine; the watchdog looks every second


def test_a_rank_that_cannot_start_stops_its_peers_within_seconds(tmp_path, byte_shards):
    """Rank 1's data is missing (as on a node without the data): it fails at start; rank 0,
    already waiting in DeepSpeed's first collective, leaves within seconds with code 1."""
    good = tiny_config(tmp_path / "run", byte_shards)
    bad = tiny_config(tmp_path / "run", tmp_path / "missing-data")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(rank, 2, port, "gloo", train_config, (cfg,),
                                              results))
             for rank, cfg in enumerate([good, bad])]
    started = time.monotonic()
    for proc in procs:
        proc.start()
    try:
        procs[1].join(timeout=120)
        failed_at = time.monotonic()
        procs[0].join(timeout=ANSWER_S + 10)
        stopped_after_s = time.monotonic() - failed_at
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
    assert procs[0].exitcode == 1, "rank 0 did not leave after rank 1 failed"
    assert stopped_after_s < ANSWER_S, stopped_after_s
    [launch] = (tmp_path / "run" / faults.RESILIENCE_DIR / "launches").iterdir()
    beats = {b.rank: b.ended for b in faults.read_heartbeats(next(launch.iterdir()))}
    assert beats == {0: faults.PEER_FAILED, 1: faults.FATAL}
    failure = (next(launch.iterdir()) / "failed").read_text()
    assert failure.startswith("rank 1 on ") and "missing-data" in failure, failure
    print(f"rank 0 left {stopped_after_s:.1f} s after rank 1 failed ({failed_at - started:.0f} s "
          f"in)")


def train_config(cfg) -> None:
    from tessera.trainer.train import train

    train(cfg)


def shared_check_on_own_dirs(run_dirs: list) -> str:
    import torch.distributed as dist

    from tessera.trainer.run_dir import check_shared

    rank = dist.get_rank()
    try:
        check_shared(run_dirs[rank], rank, patience_s=1)
    except ConfigError as e:
        return str(e)
    return ""


def test_a_run_dir_the_ranks_do_not_share_is_refused_at_start(tmp_path):
    """Each rank given its own directory stands for a node-local path on each node."""
    run_dirs = [tmp_path / "node0", tmp_path / "node1"]
    errors = run_ranks(2, shared_check_on_own_dirs, run_dirs)
    assert errors[1] == errors[0].replace("node0", "node1")  # one line on every rank
    assert errors[0].startswith(f"config key 'run.dir': {run_dirs[0]} is not shared between the "
                                f"nodes: rank 1 on {faults.host_name()} cannot see the file rank 0")


def test_a_shared_run_dir_passes(tmp_path):
    assert run_ranks(2, shared_check_on_own_dirs, [tmp_path, tmp_path]) == ["", ""]


@pytest.mark.parametrize("ended, restart", [
    ([faults.FATAL, faults.PEER_FAILED], False),
    ([faults.HANG, None], True),
    ([None, faults.ERROR], True),
    ([faults.STOPPED, faults.STOPPED], False),
])
def test_a_failed_launch_is_restarted_only_when_a_restart_can_help(tmp_path, ended, restart):
    directory = faults.launch_dir(tmp_path, "launch-a", 1)
    for rank, ending in enumerate(ended):
        beat = faults.Heartbeat.start(rank, 3)
        beat.ended = ending
        faults.write_heartbeat(directory, beat)
    assert faults.post_mortem(tmp_path, "launch-a").restart == restart


def test_a_silent_peer_its_launcher_stopped_with_sigterm_gets_no_strike(tmp_path):
    """Rank 1 died without a word; rank 0 (blocked, as in an NCCL collective) got its launcher's
    SIGTERM, then its SIGKILL: the crash, and the strike, are rank 1's alone."""
    directory = faults.launch_dir(tmp_path, "launch-a", 1)
    for rank, host in enumerate(["n1", "n2"]):
        beat = faults.Heartbeat.start(rank, 3)
        beat.host, beat.terminated = host, rank == 0
        faults.write_heartbeat(directory, beat)
    verdict = faults.post_mortem(tmp_path, "launch-a")
    assert verdict.restart and [b.rank for b in verdict.culprits] == [1]
    assert verdict.reason == "killed or crashed without an error: rank 1 on n2 (step 3, start-up)"
    assert set(faults.host_strikes(tmp_path)) == {"n2"}


def test_a_launch_whose_ranks_were_all_stopped_with_sigterm_strikes_no_host(tmp_path):
    directory = faults.launch_dir(tmp_path, "launch-a", 1)
    beat = faults.Heartbeat.start(0, 3)
    beat.terminated = True
    faults.write_heartbeat(directory, beat)
    verdict = faults.post_mortem(tmp_path, "launch-a")
    assert verdict.restart and verdict.culprits == []
    assert "stopped with SIGTERM and killed" in verdict.reason
    assert faults.host_strikes(tmp_path) == {}


WATCHED_RANK = """
import sys, time
from tessera.launch.signals import StopSignal
from tessera.launch.watchdog import Watchdog
watchdog = Watchdog(sys.argv[1], rank=0, world_size=1, timeout_s=0).start()
with StopSignal(["TERM"]):
    print("ready", flush=True)
    time.sleep(60)  # what the trainer does on SIGTERM does not matter: its launcher kills it
"""


def test_the_watchdog_records_a_sigterm_in_the_heartbeat(tmp_path):
    """The watchdog's thread sees SIGTERM through the interpreter's wakeup fd, whatever the main
    thread is doing, and says so in the heartbeat a post-mortem reads after the SIGKILL."""
    env = {**os.environ, faults.LAUNCH_ID_VARIABLE: "launch-a"}
    rank = subprocess.Popen([sys.executable, "-c", WATCHED_RANK, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert rank.stdout.readline().strip() == "ready"
        directory = faults.launch_dir(tmp_path, "launch-a")
        [before] = faults.read_heartbeats(directory)
        assert not before.terminated
        rank.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + ANSWER_S
        while not faults.read_heartbeats(directory)[0].terminated:
            assert time.monotonic() < deadline, "no SIGTERM in the heartbeat"
            time.sleep(0.1)
    finally:
        rank.kill()
        rank.wait()
    [after] = faults.read_heartbeats(directory)
    assert after.ended is None and after.terminated


@pytest.mark.parametrize("rank_0_error, left_to_rank_0", [
    ("nowhere: no such shard or directory (data.shards)", True),  # every rank met it
    ("rank 0's own data is missing", False),  # rank 1's differs: it says its own
    (None, False),  # rank 0 is still training (waiting in a collective): rank 1 says it
])
def test_a_rank_leaves_its_error_to_rank_0_only_when_rank_0_stopped_on_the_same(
        tmp_path, rank_0_error, left_to_rank_0):
    from tessera.data.format import DataError
    from tessera.launch.watchdog import Watchdog

    watchdog = Watchdog(tmp_path, rank=1, world_size=2, timeout_s=0)
    rank_0 = faults.Heartbeat.start(0, 3)
    rank_0.error = rank_0_error
    faults.write_heartbeat(watchdog.directory, rank_0)
    error = DataError("nowhere: no such shard or directory (data.shards)\nsecond line")
    assert watchdog.fail(error, fatal=True) == left_to_rank_0
    [_, rank_1] = faults.read_heartbeats(watchdog.directory)
    assert rank_1.ended == faults.FATAL
    assert rank_1.error == "nowhere: no such shard or directory (data.shards)"


def test_rank_0_says_its_error_whatever_the_others_met(tmp_path):
    from tessera.launch.watchdog import Watchdog

    watchdog = Watchdog(tmp_path, rank=0, world_size=2, timeout_s=0)
    assert watchdog.fail(ConfigError("config key 'x': bad"), fatal=True) is False


def test_one_rank_says_a_peers_failure_for_the_job():
    from tessera.launch.watchdog import rank_to_say_peer_failure

    assert rank_to_say_peer_failure("rank 5 on n2: CUDA error: out of memory") == 0
    assert rank_to_say_peer_failure("rank 0 on n1: CUDA error: out of memory") == 1
