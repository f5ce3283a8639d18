"""What a run directory records about faults, for the watchdog, the restart loops and `tessera
status`:

    run.dir/resilience/launches/<launch id>/rank-NNNNN.json   each rank's heartbeat in one launch
    run.dir/resilience/events.jsonl                           hangs, crashes, restarts, stragglers
    run.dir/resilience/hosts.json                             strikes per host
    run.dir/hangs/<time>/rank-NNNNN.txt                       the stacks a hang left

A heartbeat file holds the rank's step, phase and host, and how the rank ended when it ended on
its own; a rank killed with SIGKILL, by the OOM killer or by a segfault leaves none. It also says
whether SIGTERM reached the rank: a launcher ends a failed launch's other ranks with SIGTERM, then
SIGKILL (torch's agent 30 s later; srun --kill-on-bad-exit after Slurm's KillWait), so a rank
that died silently after a SIGTERM is a peer the launcher stopped, not a culprit (with NCCL it
may be blocked in a collective until then).
After a launch failed, its heartbeats tell a restart loop who died without a word (the crash's
culprit), whether a rank hung (restart), or whether the input was at fault (a restart would fail
the same way).
Files rather than the process group's store: they outlive a stopped or dead rank 0, and run.dir
is shared by every node already (checkpoints need it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

RESILIENCE_DIR = "resilience"
HANGS_DIR = "hangs"
LAUNCH_ID_VARIABLE = "TESSERA_LAUNCH_ID"  # set by our launchers, one per attempt

HANG_EXIT_CODE = 76  # a rank's watchdog found a hang and left; a restart resumes
# How a rank ended, in its last heartbeat. None (no ending): killed from outside, or crashed
# in native code. FATAL: an error a restart would meet again (the config, data, a checkpoint,
# non-finite losses). PEER_FAILED: left because another rank failed.
FINISHED, STOPPED, HANG = "finished", "stopped", "hang"
FATAL, ERROR, PEER_FAILED = "fatal error", "error", "peer failed"


def host_name() -> str:
    """This node's name as Slurm knows it (what --exclude takes), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def new_launch_id() -> str:
    return uuid.uuid4().hex[:12]


def launch_id() -> str:
    """The same on every rank of one launch and new in the next: our launchers set it; under a
    plain torchrun or srun it comes from their ids (a restart or a requeue changes them)."""
    if os.environ.get(LAUNCH_ID_VARIABLE):
        return os.environ[LAUNCH_ID_VARIABLE]
    ids = [os.environ.get(name, "") for name in (
        "SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_RESTART_COUNT", "MASTER_PORT")]
    return "-".join(i for i in ids if i) or f"pid{os.getpid()}"


def launch_dir(run_dir: str | Path, launch: str, attempt: int | None = None) -> Path:
    """The heartbeats of one launch's `attempt`-th training in each process (1 in a job; a
    test may train several times in one launch). None: the latest."""
    root = Path(run_dir) / RESILIENCE_DIR / "launches" / launch
    if attempt is None:
        attempts = [int(p.name) for p in root.glob("*") if p.name.isdigit()]
        attempt = max(attempts, default=1)
    return root / str(attempt)


# ---------------------------------------------------------------------------------------------
# Heartbeats


@dataclasses.dataclass
class Heartbeat:
    rank: int
    host: str
    pid: int
    step: int  # the step being worked on
    phase: str
    progressed_at: float  # Unix seconds of the last phase change
    beat_at: float  # Unix seconds of this write
    ended: str | None = None  # how it ended (the names above); None while running
    terminated: bool = False  # SIGTERM reached it: a launcher (or Slurm) was stopping it
    error: str | None = None  # the first line of the error it stopped on, if any

    @staticmethod
    def start(rank: int, step: int) -> Heartbeat:
        now = time.time()
        return Heartbeat(rank, host_name(), os.getpid(), step, "start-up", now, now)


def heartbeat_path(directory: Path, rank: int) -> Path:
    return directory / f"rank-{rank:05d}.json"


def write_heartbeat(directory: Path, beat: Heartbeat) -> None:
    """Atomic (a reader never sees half a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = heartbeat_path(directory, beat.rank)
    partial = path.with_suffix(f".tmp{os.getpid()}")
    partial.write_text(json.dumps(dataclasses.asdict(beat)))
    os.replace(partial, path)


def read_heartbeats(directory: Path) -> list[Heartbeat]:
    beats = [read_heartbeat(path) for path in sorted(directory.glob("rank-*.json"))]
    return [beat for beat in beats if beat is not None]


def read_heartbeat(path: Path) -> Heartbeat | None:
    """None for a file that is missing or not a heartbeat."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        return Heartbeat(**json.loads(path.read_text()))
    return None


# ---------------------------------------------------------------------------------------------
# Events and strikes


def record_event(run_dir: str | Path, kind: str, **fields: object) -> None:
    """One line of run.dir/resilience/events.jsonl (`tessera status` counts them)."""
    path = Path(run_dir) / RESILIENCE_DIR / "events.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {"time": round(time.time(), 3), "event": kind, **fields}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_events(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / RESILIENCE_DIR / "events.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def add_strike(run_dir: str | Path, host: str, reason: str) -> int:
    """Count a fault against `host`; returns its strikes."""
    path = Path(run_dir) / RESILIENCE_DIR / "hosts.json"
    with _locked(path):
        hosts = host_strikes(run_dir)
        entry = hosts.setdefault(host, {"strikes": 0, "reasons": []})
        entry["strikes"] += 1
        entry["reasons"] = [*entry["reasons"], f"{_now()} {reason}"][-10:]
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(hosts, indent=1))
        os.replace(partial, path)
    return entry["strikes"]


def host_strikes(run_dir: str | Path) -> dict[str, dict]:
    path = Path(run_dir) / RESILIENCE_DIR / "hosts.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def excluded_hosts(run_dir: str | Path, exclude_after: int) -> list[str]:
    """Hosts with at least `exclude_after` strikes (none when it is 0)."""
    if exclude_after <= 0:
        return []
    return sorted(host for host, entry in host_strikes(run_dir).items()
                  if entry.get("strikes", 0) >= exclude_after)


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# After a failed launch


@dataclasses.dataclass
class Verdict:
    restart: bool  # a relaunch can help (a crash or a hang, not the input)
    reason: str  # one line: what happened, naming ranks and hosts
    culprits: list[Heartbeat]  # ranks that died without a word


def post_mortem(run_dir: str | Path, launch: str) -> Verdict:
    """What a failed launch's heartbeats say, and the strikes it earns its hosts."""
    beats = read_heartbeats(launch_dir(run_dir, launch))
    if not beats:
        return Verdict(False, "no rank started training (the error is above)", [])
    fatal = [b for b in beats if b.ended == FATAL]
    if fatal:
        return Verdict(False, f"rank {fatal[0].rank} on {fatal[0].host} stopped on an error a "
                              "restart would meet again (above)", [])
    if all(b.ended in (FINISHED, STOPPED) for b in beats):
        return Verdict(False, "every rank finished or stopped on a signal (saved)", [])
    if any(b.ended == HANG for b in beats):  # the watchdog named the hosts and struck them
        return Verdict(True, "a hang stopped the ranks (named above)", [])
    stopped = [b for b in beats if b.ended is None and b.terminated]  # by their launcher
    silent = [b for b in beats if b.ended is None and not b.terminated]
    for beat in silent:
        add_strike(run_dir, beat.host, f"rank {beat.rank} died at step {beat.step}")
    if silent:
        named = ", ".join(f"rank {b.rank} on {b.host} (step {b.step}, {b.phase})"
                          for b in silent[:4])
        reason = f"killed or crashed without an error: {named}"
    elif stopped:
        reason = f"rank {stopped[0].rank} on {stopped[0].host} was stopped with SIGTERM and killed"
    else:
        reason = "every rank stopped on an error (above)"
    record_event(run_dir, "crash", launch=launch, reason=reason,
                 hosts=sorted({b.host for b in silent}))
    return Verdict(True, reason, silent)
