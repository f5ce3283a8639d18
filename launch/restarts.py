"""Relaunch after a crash or a hang, from the last committed checkpoint, without a queue wait.

`run_with_restarts` runs a launch (all ranks, to their end) up to 1 + `resilience.max_restarts`
times. A launch that failed is read through its ranks' heartbeats (tessera.launch.faults): a rank
killed from outside (kill -9, the OOM killer, a segfault) or a hang is relaunched, and its host
gets a strike; an error a restart would meet again (the config, the data, a checkpoint, non-finite
losses) or a stop on a signal (saved, requeued) is not.

Two launchers use it:
- `tessera train` with several local ranks (tessera.launch.local);
- a Slurm job: its batch script runs `python -m tessera.launch.restarts ... -- srun ...`, so a
  failed step (srun --kill-on-bad-exit ends every task when one dies) is started again in the
  same allocation. When the restarts are spent, or a host of the allocation reached
  `resilience.exclude_after` strikes, the job requeues (at most slurm.max_requeues times, as a
  preemption does) with those hosts excluded.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tessera.launch import faults
from tessera.launch.signals import (
    INTERRUPTED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    USER_ERROR_EXIT_CODE,
)

# Ended in a way a restart cannot help: done, an input error, stopped on a signal and saved.
NO_RESTART_CODES = (0, USER_ERROR_EXIT_CODE, PREEMPTED_EXIT_CODE, INTERRUPTED_EXIT_CODE)
REQUEUE_UPDATE_S = 20.0  # how long a requeued job may take to turn pending (to exclude hosts)


def run_with_restarts(launch: Callable[[], int], run_dir: str | Path, max_restarts: int,
                      may_restart: Callable[[], bool] = lambda: True) -> tuple[int, bool]:
    """(the last launch's exit code, whether its failure was one a restart could help). Each
    launch gets a new launch id (in the environment the ranks inherit). `may_restart`: asked
    before each restart (False: stop here)."""
    for attempt in range(max_restarts + 1):
        launch_id = faults.new_launch_id()
        os.environ[faults.LAUNCH_ID_VARIABLE] = launch_id
        code = launch()
        if code in NO_RESTART_CODES:
            return code, False
        verdict = faults.post_mortem(run_dir, launch_id)
        if not verdict.restart:
            return code, False
        if attempt == max_restarts:
            print(f"tessera: {verdict.reason}; no restart left (resilience.max_restarts="
                  f"{max_restarts})", file=sys.stderr, flush=True)
            return code, True
        if not may_restart():
            return code, True
        faults.record_event(run_dir, "restart", attempt=attempt + 1, reason=verdict.reason)
        print(f"tessera: {verdict.reason}; restart {attempt + 1} of {max_restarts}, from the last "
              f"checkpoint", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# In a Slurm job's batch script


def batch_command(python: str, run_dir: str, max_restarts: int, exclude_after: int,
                  max_requeues: int) -> list[str]:
    """The words the batch script puts before its `srun` line."""
    return [python, "-u", "-m", "tessera.launch.restarts", "--run-dir", run_dir,
            "--max-restarts", str(max_restarts), "--exclude-after", str(exclude_after),
            "--max-requeues", str(max_requeues), "--"]


def allocation_hosts() -> list[str]:
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return []
    done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                          text=True)
    return done.stdout.split() if done.returncode == 0 else []


def requeue_excluding(run_dir: str, exclude_after: int, max_requeues: int, why: str) -> int:
    """Requeue this job (the next allocation resumes) with the hosts that reached
    `exclude_after` strikes excluded; 1 when no requeue is left."""
    job_id = os.environ["SLURM_JOB_ID"]
    requeues = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if requeues >= max_requeues:
        print(f"tessera: {why}; not requeued: {requeues} requeues done (slurm.max_requeues="
              f"{max_requeues}); `tessera submit` the same config to go on", file=sys.stderr,
              flush=True)
        return 1
    excluded = faults.excluded_hosts(run_dir, exclude_after)
    faults.record_event(run_dir, "requeue", job_id=job_id, excluded=excluded, reason=why)
    print(f"tessera: {why}; requeuing job {job_id}"
          + (f" without {', '.join(excluded)}" if excluded else ""), file=sys.stderr, flush=True)
    if not excluded:
        subprocess.run(["scontrol", "requeue", job_id], check=False)
        return 0
    # A running job's node list cannot change: requeue it held, exclude while it is pending,
    # release. (This script ignores SIGTERM; Slurm kills it after KillWait, time enough.)
    subprocess.run(["scontrol", "requeuehold", job_id], check=False)
    deadline = time.monotonic() + REQUEUE_UPDATE_S
    while time.monotonic() < deadline:
        update = subprocess.run(["scontrol", "update", f"JobId={job_id}",
                                 f"ExcNodeList={','.join(excluded)}"], capture_output=True)
        if update.returncode == 0:
            break
        time.sleep(0.5)
    subprocess.run(["scontrol", "release", job_id], check=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tessera.launch.restarts")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--max-restarts", type=int, required=True)
    parser.add_argument("--exclude-after", type=int, required=True)
    parser.add_argument("--max-requeues", type=int, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    # `scancel --full` and preemption signal every process of the job: the ranks save and
    # requeue; this loop only waits for them.
    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    hosts = allocation_hosts()

    def no_struck_host() -> bool:
        return not set(faults.excluded_hosts(args.run_dir, args.exclude_after)) & set(hosts)

    code, restartable = run_with_restarts(lambda: subprocess.run(command).returncode,
                                          args.run_dir, args.max_restarts,
                                          may_restart=no_struck_host)
    if not restartable:
        return code
    why = ("a host of this allocation reached resilience.exclude_after strikes"
           if not no_struck_host() else "the restarts are spent")
    return code if requeue_excluding(args.run_dir, args.exclude_after, args.max_requeues, why) \
        else 0


if __name__ == "__main__":
    sys.exit(main())
