"""A real two-node Slurm cluster on this one machine, for the Slurm tests (needs root + apt-get).

Installs Debian's `slurm-wlm` and `munge` when missing, writes a slurm.conf into a fresh state
directory (found through SLURM_CONF, so /etc/slurm is never touched), names the nodes n1 and n2
in /etc/hosts (one marked line, removed on stop), and starts munged (unless one runs), slurmctld
and two slurmd. `stop()` cancels the cluster's jobs and stops only the daemons it started.

    python tests/launch/local_slurm.py start    # prints `export SLURM_CONF=...`
    python tests/launch/local_slurm.py stop DIR
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tessera.launch.local import free_port

NODES = ("n1", "n2")
PARTITION = "debug"
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# tessera local slurm test cluster"
MUNGE_PID_FILE = Path("/run/munge/munged.pid")
OPT_OUT = "TESSERA_SLURM_TESTS"  # =0: never install or start the cluster


class ClusterError(RuntimeError):
    pass


def unavailable_reason() -> str | None:
    """Why the cluster cannot be set up here, or None when it can."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return f"{OPT_OUT}=0"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (apt-get install slurm-wlm munge, daemons)"
    if not _installed() and shutil.which("apt-get") is None:
        return "slurm-wlm is not installed and apt-get is not available to install it"
    return None


def _installed() -> bool:
    return all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged"))


def install() -> None:
    if _installed():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]
    if subprocess.run(command, env=env, capture_output=True).returncode != 0:
        _run(["apt-get", "update", "-q"], env=env)  # a fresh machine has no package lists yet
        _run(command, env=env)


def _run(command: list[str], **kwargs) -> str:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise ClusterError(f"{' '.join(command)} failed ({done.returncode}): {' | '.join(tail)}")
    return done.stdout


@dataclasses.dataclass
class LocalCluster:
    root: Path
    started_munge: bool

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def daemon_pid_files(self) -> list[Path]:
        return [self.root / "slurmctld.pid", *(self.root / f"slurmd-{n}.pid" for n in NODES)]

    def stop(self) -> None:
        env = {**os.environ, **self.env}
        subprocess.run(["scancel", "--partition", PARTITION], env=env, capture_output=True)
        _wait_for(lambda: not _run(["squeue", "-h"], env=env).strip(), timeout_s=30)
        for pid_file in self.daemon_pid_files():
            _stop_pid_file(pid_file)
        if not self._others_running():  # another test session's cluster needs munge and hosts
            if self.started_munge:
                _stop_pid_file(MUNGE_PID_FILE)
            _remove_hosts_line()
        shutil.rmtree(self.root, ignore_errors=True)

    def _others_running(self) -> bool:
        for pid_file in self.root.parent.glob("tessera-slurm-*/slurmctld.pid"):
            if pid_file.parent != self.root and _alive(_read_pid(pid_file)):
                return True
        return False


def _read_pid(pid_file: Path) -> int:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return 0


def _stop_pid_file(pid_file: Path, timeout_s: float = 15) -> None:
    pid = _read_pid(pid_file)
    if pid <= 0:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    if not _wait_for(lambda: not _alive(pid), timeout_s):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return ""


def _wait_for(predicate, timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except ClusterError:
            pass
        time.sleep(interval_s)
    return False


def _slurm_conf(root: Path, cpus_per_node: int, memory_mb: int) -> str:
    host = socket.gethostname().split(".")[0]
    lines = [
        "ClusterName=tessera-test",
        f"SlurmctldHost={host}",
        f"SlurmctldPort={free_port()}",
        "AuthType=auth/munge",
        # A requeued job waits out the credential lifetime before it starts again (so messages of
        # its previous run are never taken for the new one's): 120 s by default, 10 s here.
        "AuthInfo=cred_expire=10",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root}/state",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmdSpoolDir={root}/spool-%n",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none",
        "KillWait=30",
        "MinJobAge=600",
    ]
    for node in NODES:
        lines.append(
            f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
            f"CPUs={cpus_per_node} RealMemory={memory_mb} State=UNKNOWN"
        )
    lines.append(f"PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES "
                 "MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def _add_hosts_line() -> None:
    text = HOSTS_FILE.read_text()
    if HOSTS_MARK not in text:
        # written in place: /etc/hosts is often a bind mount that a rename would not replace
        with open(HOSTS_FILE, "a") as f:
            newline = "" if text.endswith("\n") else "\n"
            f.write(f"{newline}127.0.0.1 {' '.join(NODES)} {HOSTS_MARK}\n")


def _remove_hosts_line() -> None:
    text = HOSTS_FILE.read_text()
    if HOSTS_MARK in text:
        kept = [line for line in text.splitlines(keepends=True) if HOSTS_MARK not in line]
        with open(HOSTS_FILE, "w") as f:
            f.write("".join(kept))


def _munge_works() -> bool:
    encoded = subprocess.run(["munge", "-n"], capture_output=True)
    if encoded.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=encoded.stdout, capture_output=True).returncode == 0


def _start_munge() -> bool:
    """Start munged as the munge user unless one already answers; True when we started it."""
    if _munge_works():
        return False
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    _run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"])
    if not _wait_for(_munge_works, timeout_s=10):
        raise ClusterError("munged started but `munge -n | unmunge` does not succeed")
    return True


def start(cpus_per_node: int = 2, memory_mb: int = 8000) -> LocalCluster:
    """Install when needed and start the cluster; returns once both nodes are idle."""
    install()
    root = Path(tempfile.mkdtemp(prefix="tessera-slurm-"))
    for sub in ("state", "log"):
        (root / sub).mkdir()
    cluster = LocalCluster(root=root, started_munge=_start_munge())
    try:
        cluster.conf.write_text(_slurm_conf(root, cpus_per_node, memory_mb))
        _add_hosts_line()
        env = {**os.environ, **cluster.env}
        _run(["slurmctld"], env=env)
        for node in NODES:
            _run(["slurmd", "-N", node], env=env)
        if not _wait_for(lambda: _nodes_idle(env), timeout_s=60):
            log = (root / "log" / "slurmctld.log").read_text().splitlines()[-5:]
            raise ClusterError(f"nodes {NODES} did not become idle; slurmctld.log: {log}")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _nodes_idle(env: dict) -> bool:
    states = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env).split()
    return sorted(states[0::2]) == sorted(NODES) and all(s == "idle" for s in states[1::2])


def main(argv: list[str]) -> int:
    if argv[:1] == ["start"]:
        reason = unavailable_reason()
        if reason:
            print(f"cannot start the local Slurm cluster: {reason}", file=sys.stderr)
            return 1
        cluster = start()
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    if argv[:1] == ["stop"] and len(argv) == 2:
        root = Path(argv[1])
        started_munge = False  # a cluster started from the command line leaves munged running
        LocalCluster(root=root, started_munge=started_munge).stop()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
