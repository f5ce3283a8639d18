"""The run directory: usable before anything starts, and used by one training job at a time.

Two `tessera train` on one run.dir would resume from each other's checkpoints and delete each
other's saves in progress. Rank 0 holds an exclusive lock on run.dir/tessera.lock for the job's
life: `flock`, which the operating system releases when the process dies (kill -9 included), so
a crashed job never leaves a lock behind on its own host. The file names the holder (host, pid,
Slurm job id, start time) for the refusal's one line.

A lock the file system keeps after its holder's host died (a network file system whose server
has not yet noticed) must not block that job's requeue: Slurm never runs two instances of one
job id, so a lock held under this job's own SLURM_JOB_ID belongs to its previous, dead, instance.
The new instance then replaces the lock file (a new file; the stale lock stays on the old one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from tessera.launch import faults
from tessera.trainer.config import ConfigError

LOCK_FILE = "tessera.lock"
# what a run directory holds once its first rank has started (config.yaml before any save)
RUN_MARKS = ("config.yaml", "metrics.jsonl", "checkpoints")


def is_run_dir(path: str | Path) -> bool:
    """Training has started in `path`: `status` and `checkpoint list` refuse any other
    directory rather than report an empty run."""
    return any((Path(path) / name).exists() for name in RUN_MARKS)


def check_writable(run_dir: str | Path) -> None:
    """run.dir can hold the run's files: a directory (made if missing) we may write in. Called
    before any process group forms, so an unusable path fails in a second, in one line."""
    path = Path(run_dir)
    check_not_a_file(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(f"config key 'run.dir': cannot write in {path} ({reason})") from None


def check_not_a_file(run_dir: str | Path) -> None:
    """run.dir, or else the nearest of its parents that exists, is a directory: check_writable's
    first check, which makes nothing (`tessera submit` writes nothing before Slurm takes a job,
    and its dry run may name a directory of the cluster's)."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"config key 'run.dir': {path} exists and is not a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"config key 'run.dir': {path} lies under {parent}, which is "
                                  f"not a directory")
            return


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    slurm_job_id: str | None
    since: str

    @staticmethod
    def me() -> Holder:
        return Holder(socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID"),
                      datetime.datetime.now().isoformat(timespec="seconds"))

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"host {self.host}, pid {self.pid}{job}, since {self.since}"


class RunLock:
    """The exclusive lock of one run directory (rank 0, for the job's life)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming the job that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _try_lock(fd)
        except OSError as e:  # a file system without flock: say so, and go on unguarded
            os.close(fd)
            print(f"tessera: warning: cannot lock {self.path} ({e.strerror}); make sure no other "
                  f"job uses this run.dir", flush=True)
            return
        if not locked:
            holder = _read_holder(fd)
            os.close(fd)
            me = Holder.me()
            if holder is None or not (holder.slurm_job_id and
                                      holder.slurm_job_id == me.slurm_job_id):
                raise ConfigError(self._refusal(holder))
            fd = self._replace_stale_lock()  # this job's previous instance, on a dead host
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(dataclasses.asdict(Holder.me())).encode())
        os.fsync(fd)
        self._fd = fd

    def check_free(self) -> None:
        """Raise ConfigError now if another job holds the lock (before ranks are started)."""
        self.acquire()
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _replace_stale_lock(self) -> int:
        os.unlink(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        if not _try_lock(fd):  # another instance took the new file first: not ours
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(self._refusal(holder))
        return fd

    def _refusal(self, holder: Holder | None) -> str:
        who = holder.describe() if holder else "a job that has not written its name yet"
        return (f"config key 'run.dir': {self.path.parent} is in use by another tessera train "
                f"({who}); wait for it, stop it, or choose another run.dir (if that job is "
                f"dead on a host that is down, delete {self.path})")


@contextlib.contextmanager
def run_lock(run_dir: str | Path, rank: int) -> Iterator[None]:
    """Collective: rank 0 holds run.dir's lock for the body; a refusal raises on every rank."""
    lock = RunLock(run_dir) if rank == 0 else None
    refusal = [None]
    if lock is not None:
        try:
            lock.acquire()
        except ConfigError as e:
            refusal = [str(e)]
    if dist.is_initialized():
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise ConfigError(refusal[0])
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_holder(fd: int) -> Holder | None:
    try:
        raw = os.pread(fd, 4096, 0)
        return Holder(**json.loads(raw)) if raw else None
    except (OSError, ValueError, TypeError):
        return None


SHARED_CHECK_FILE = "shared-check.txt"  # under run.dir/resilience/
SHARED_CHECK_PATIENCE_S = 30.0  # a network file system may show a new file late


def check_shared(run_dir: str | Path, rank: int,
                 patience_s: float = SHARED_CHECK_PATIENCE_S) -> None:
    """Collective: every rank sees a file rank 0 just wrote in run.dir, else ConfigError on
    every rank naming the ranks and hosts that do not. A node-local run.dir would split the
    checkpoints between nodes and a requeue would not find them: found at start, not at the
    first requeue."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    path = Path(run_dir) / faults.RESILIENCE_DIR / SHARED_CHECK_FILE
    token = [uuid.uuid4().hex if rank == 0 else None]
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(token[0])
    dist.broadcast_object_list(token, src=0)
    deadline = time.monotonic() + patience_s
    while not (sees := _reads(path, token[0])) and time.monotonic() < deadline:
        time.sleep(0.5)
    views: list = [None] * dist.get_world_size()
    dist.all_gather_object(views, (sees, faults.host_name()))
    blind = [f"rank {r} on {host}" for r, (seen, host) in enumerate(views) if not seen]
    if blind:
        raise ConfigError(
            f"config key 'run.dir': {run_dir} is not shared between the nodes: "
            f"{', '.join(blind[:4])} cannot see the file rank 0 on {views[0][1]} wrote there "
            f"({path.name}); point run.dir at a file system every node mounts")


def _reads(path: Path, text: str) -> bool:
    try:
        return path.read_text() == text
    except OSError:
        return False
