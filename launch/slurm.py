"""Slurm: what a job asks of the cluster, checks against it, submission through submitit, and
what a task does once training stopped on a signal. Nothing here knows what the job trains: the
caller (`tessera.trainer.submit`) hands over the config's Slurm section, the job's name and log
folder, and the callable its tasks run.

A job stops on `slurm.signal` (sent `slurm.signal_lead_s` before its time limit) or SIGTERM at a
step boundary, saves, and returns unfinished; task 0 then requeues it (at most
`slurm.max_requeues` times, counted by SLURM_RESTART_COUNT) and the next allocation resumes from
the run directory by itself. submitit's own checkpoint() runs on rank 0 alone, so it cannot
save a sharded checkpoint: here it only resubmits the same call.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError
from submitit.slurm.slurm import SlurmJobEnvironment, _make_sbatch_string
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from tessera.launch.config import SlurmConfig
from tessera.launch.env import DistEnv
from tessera.launch.signals import PREEMPTED_EXIT_CODE, StopSignal, parse_signal

JOBS_FILE = "jobs.jsonl"  # under run.dir/slurm/: one line per submitted job
SLURM_TOOLS = ("sbatch", "sinfo", "scontrol", "srun")


class SlurmError(ValueError):
    """A request this cluster cannot run, or Slurm missing; nothing was submitted."""


@dataclasses.dataclass(frozen=True)
class Submitted:
    job_id: str
    job_name: str
    log_dir: Path


# ---------------------------------------------------------------------------------------------
# What is asked of Slurm


def sbatch_parameters(slurm: SlurmConfig, job_name: str, exclude: list[str] = ()) -> dict:
    """submitit SlurmExecutor parameters (its native names, passed through unchanged).
    `exclude`: hosts the job must not run on."""
    signal_name = parse_signal(slurm.signal).name.removeprefix("SIG")
    params = {
        "job_name": job_name,
        "partition": slurm.partition,
        "time": slurm.time_min,
        "nodes": slurm.nodes,
        "ntasks_per_node": slurm.tasks_on_each_node(),
        "cpus_per_task": slurm.cpus_per_task,
        "gpus_per_node": slurm.gpus_per_node or None,
        "mem": None if slurm.mem_gb is None else f"{round(slurm.mem_gb * 1024)}M",
        "account": slurm.account,
        "qos": slurm.qos,
        "constraint": slurm.constraint,
        "exclude": ",".join(exclude) or None,
        # a task that dies ends the step on every node (the batch script may start it again)
        "srun_args": ["--kill-on-bad-exit=1"],
        "signal_delay_s": slurm.signal_lead_s,
        # the job's submitit handles this signal until training installs its own handler
        "setup": [f"export SUBMITIT_PREEMPT_SIGNAL={signal_name}", *slurm.setup],
        # sent to every task (not B: the batch shell alone), so each rank records it
        "additional_parameters": {"signal": f"{signal_name}@{slurm.signal_lead_s}",
                                  **_set_flags(slurm.sbatch_options)},
    }
    params = {key: value for key, value in params.items() if value is not None}
    # no --wckey unless slurm.sbatch_options asks for one (submitit writes --wckey=submitit)
    return {**params, "wckey": None}


def _set_flags(options: dict) -> dict:
    """slurm.sbatch_options without the flags set to false: `exclusive: false` leaves
    --exclusive out (submitit writes true as a bare `--exclusive`, false as `--exclusive=False`,
    which sbatch refuses)."""
    return {flag: value for flag, value in options.items() if value is not False}


def _submitit_command(folder: Path) -> str:
    # The command submitit's SlurmExecutor puts in the script (`_submitit_command_str`).
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit",
                     shlex.quote(str(folder))])


@dataclasses.dataclass(frozen=True)
class JobStep:
    """How the batch script runs its srun step."""

    wrapper: tuple[str, ...] = ()  # words before `srun` (tessera.launch.restarts)
    note: tuple[str, ...] = ()  # comment lines above it: what each task runs
    exclude: tuple[str, ...] = ()  # hosts the job must not run on

    def wrap(self, script: str) -> str:
        """The submitit script with the note above its srun line and the wrapper before it.

        The restarts and the task note live on that one line, so a submitit whose script has
        no such line, or several, is refused here rather than submitted without them."""
        lines = script.split("\n")
        steps = [i for i, line in enumerate(lines) if line.startswith("srun ")]
        if len(steps) != 1:
            raise SlurmError(f"submitit {submitit.__version__} wrote a batch script with "
                             f"{len(steps)} lines starting with `srun ` where Tessera expects "
                             "one; install the submitit version pinned in pyproject.toml")
        at = steps[0]
        prefix = "".join(shlex.quote(word) + " " for word in self.wrapper)
        note = [f"# {line}" for line in self.note]
        return "\n".join(lines[:at] + note + [prefix + lines[at]] + lines[at + 1:])


def sbatch_script(slurm: SlurmConfig, job_name: str, folder: Path, step: JobStep = JobStep()
                  ) -> str:
    """The sbatch script submitit writes for this request (what --dry-run prints)."""
    script = _make_sbatch_string(command=_submitit_command(folder), folder=folder,
                                 **sbatch_parameters(slurm, job_name, list(step.exclude)))
    return step.wrap(script)


class _Executor(submitit.SlurmExecutor):
    """submitit's executor, its scripts' srun line wrapped by a JobStep."""

    def __init__(self, folder: Path, max_num_timeout: int, step: JobStep):
        super().__init__(folder=folder, max_num_timeout=max_num_timeout)
        self.step = step

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        return self.step.wrap(super()._make_submission_file_text(command, uid))


# ---------------------------------------------------------------------------------------------
# Checks against the cluster


def require_slurm_tools() -> None:
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if missing:
        raise SlurmError(f"Slurm tools not found on PATH ({', '.join(missing)}): `tessera submit` "
                         "needs a Slurm login node (`tessera train` and torchrun need no Slurm)")


@dataclasses.dataclass(frozen=True)
class SlurmNode:
    name: str
    partitions: tuple[str, ...]
    cpus: int
    memory_mb: int
    gpus: int


def cluster_nodes() -> tuple[list[SlurmNode], str | None]:
    """Every node with its partitions, and the default partition (sinfo marks it with '*')."""
    out = _slurm_command(["sinfo", "--noheader", "--Node", "--format=%N|%P|%c|%m|%G"])
    nodes: dict[str, SlurmNode] = {}
    default = None
    for line in out.splitlines():
        name, partition, cpus, memory_mb, gres = line.strip().split("|")
        if partition.endswith("*"):
            partition = default = partition[:-1]
        known = nodes.get(name)
        partitions = (known.partitions if known else ()) + (partition,)
        nodes[name] = SlurmNode(name, partitions, _leading_int(cpus), _leading_int(memory_mb),
                                gpus_in_gres(gres))
    return list(nodes.values()), default


def gpus_in_gres(gres: str) -> int:
    """'gpu:8', 'gpu:a100:4(S:0-1),shard:8', '(null)' -> 8, 4, 0."""
    total = 0
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and len(fields) > 1 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def _leading_int(text: str) -> int:
    digits = "".join(c for c in text.split("+")[0] if c.isdigit())
    return int(digits) if digits else 0


def check_against_cluster(slurm: SlurmConfig, job_name: str, folder: Path,
                          step: JobStep = JobStep()) -> None:
    """Partition, node count, GPUs/CPUs/memory per node, then Slurm's own `sbatch --test-only`."""
    s, exclude = slurm, step.exclude
    nodes, default = cluster_nodes()
    partitions = sorted({p for node in nodes for p in node.partitions})
    partition = s.partition or default
    if partition is None:
        raise SlurmError("config key 'slurm.partition': not set and the cluster has no default "
                         f"partition (partitions: {', '.join(partitions)})")
    if partition not in partitions:
        raise SlurmError(f"config key 'slurm.partition': no partition {partition!r} on this "
                         f"cluster (partitions: {', '.join(partitions)})")
    members = [node for node in nodes if partition in node.partitions]
    cpus = (s.cpus_per_task or 1) * s.tasks_on_each_node()
    memory_mb = 0 if s.mem_gb is None else round(s.mem_gb * 1024)
    where = f"partition {partition!r}"
    for key, asked, have, unit in [
        ("slurm.gpus_per_node", s.gpus_per_node, max(n.gpus for n in members), "GPUs"),
        ("slurm.cpus_per_task", cpus, max(n.cpus for n in members), "CPUs (cpus_per_task x tasks)"),
        ("slurm.mem_gb", memory_mb, max(n.memory_mb for n in members), "MB of memory"),
    ]:
        if asked > have:
            raise SlurmError(f"config key '{key}': {asked} {unit} per node requested; nodes of "
                             f"{where} have at most {have}")
    fitting = [n for n in members if n.gpus >= s.gpus_per_node and n.cpus >= cpus
               and n.memory_mb >= memory_mb and n.name not in exclude]
    if s.nodes > len(fitting):
        left_out = f", {len(exclude)} excluded for strikes: {', '.join(exclude)}" if exclude else ""
        raise SlurmError(f"config key 'slurm.nodes': {s.nodes} nodes requested; {where} has "
                         f"{len(fitting)} that fit the request ({len(members)} in all{left_out})")
    script = sbatch_script(slurm, job_name, folder, step)
    test = subprocess.run(["sbatch", "--test-only"], input=script,
                          text=True, capture_output=True)
    if test.returncode != 0:
        raise SlurmError(rejection(test.stderr or test.stdout))


# Words in sbatch's refusal -> the key that sets what it refused
_REFUSED_KEYS = (("account", "slurm.account"), ("qos", "slurm.qos"),
                 ("partition", "slurm.partition"), ("feature", "slurm.constraint"),
                 ("constraint", "slurm.constraint"), ("time limit", "slurm.time_min"),
                 ("memory", "slurm.mem_gb"), ("node count", "slurm.nodes"))


def rejection(output: str) -> str:
    """One line for sbatch's refusal, naming the config key it concerns where one does."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    reason = lines[-1] if lines else "no reason given"
    reason = reason.removeprefix("sbatch: error: ").removeprefix("Batch job submission failed: ")
    key = next((key for word, key in _REFUSED_KEYS if word in reason.lower()), None)
    where = f"config key '{key}': " if key else ""
    return f"{where}Slurm rejects the job (sbatch --test-only): {reason}"


def _slurm_command(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        if "contact slurm controller" in output.lower() or "connection refused" in output.lower():
            controller = _controller_named(output)
            raise SlurmError(f"the Slurm controller{controller} does not answer (`{command[0]}`); "
                             "is slurmctld up, and SLURM_CONF the cluster's? (`scontrol ping`)")
        first = output.splitlines()[0] if output else f"exit code {done.returncode}"
        raise SlurmError(f"`{' '.join(command)}` failed: {first}")
    return done.stdout


def _controller_named(output: str) -> str:
    """' (host:port)' when Slurm's message names its controller, else ''."""
    for word in output.replace(",", " ").split():
        if ":" in word and word.split(":")[-1].rstrip(")").isdigit():
            return f" ({word.strip('()[]')})"
    return ""


# ---------------------------------------------------------------------------------------------
# Submitting


def submit(slurm: SlurmConfig, job_name: str, folder: Path, job: Callable[[], Any],
           step: JobStep = JobStep()) -> Submitted:
    """Submit `job` (pickled by submitit; each task calls it) after the checks against the
    cluster; `step` says how the script runs its srun step."""
    require_slurm_tools()
    check_against_cluster(slurm, job_name, folder, step)
    executor = _Executor(folder=folder, max_num_timeout=slurm.max_requeues, step=step)
    executor.update_parameters(**sbatch_parameters(slurm, job_name, list(step.exclude)))
    try:
        submitted = executor.submit(job)
    except (FailedJobError, FailedSubmissionError) as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise SlurmError(f"sbatch failed: {lines[-1] if lines else e}") from None
    job_id = str(submitted.job_id)
    return Submitted(job_id=job_id, job_name=job_name,
                     log_dir=Path(str(folder).replace("%j", job_id)))


def record_job(jobs_file: Path, row: dict) -> None:
    """One line per submitted job (`tessera status` reads them)."""
    with open(jobs_file, "a") as f:
        f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------
# In the job


def run_node_with_torchrun(env: DistEnv, nproc_per_node: int, argv: list[str],
                           stop_signal: str) -> bool:
    """torchrun launcher: this task starts its node's `nproc_per_node` ranks of
    `python <argv>`. True when they finished, False when a signal stopped them (saved)."""

    launch = LaunchConfig(
        min_nodes=env.num_nodes, max_nodes=env.num_nodes, nproc_per_node=nproc_per_node,
        run_id=f"tessera-{env.job_id}", rdzv_backend="static",
        rdzv_endpoint=f"{env.master_addr}:{env.master_port}", rdzv_configs={"rank": env.node_rank},
        max_restarts=0, monitor_interval=0.5, start_method="spawn",
        # The ranks get Slurm's signals themselves and stop at a step boundary; the agent must
        # neither die of them nor kill the ranks mid-save (its default on SIGTERM).
        signals_to_handle="SIGINT,SIGHUP,SIGQUIT",
    )
    with StopSignal([stop_signal, "TERM"]):
        try:
            elastic_launch(launch, entrypoint=sys.executable)(*argv)
        except ChildFailedError as e:
            codes = {failure.exitcode for failure in e.failures.values()}
            if codes == {PREEMPTED_EXIT_CODE}:
                return False
            rank, failure = e.get_first_failure()
            raise RuntimeError(f"rank {rank} failed with exit code {failure.exitcode}; its "
                               "output is in this log") from None
    return True


def requeue_or_end(env: DistEnv, max_requeues: int, resumes_from: str | None) -> None:
    """After a stop on a signal (the checkpoint is saved): task 0 requeues, the others leave."""
    if env.rank != 0:
        raise SystemExit(0)  # a clean exit: a failing task could end the step before the requeue
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        raise RuntimeError(f"stopped on a signal after {restarts} requeues (slurm.max_requeues="
                           f"{max_requeues}): not requeued; the last checkpoint is "
                           f"{resumes_from}; `tessera submit` the same config to go on")
    remaining = max_requeues - restarts - 1
    SlurmJobEnvironment()._requeue(remaining)  # submitit's requeue: `scontrol requeue <job>`
    print(f"tessera: job {env.job_id} requeued ({remaining} requeues left); it resumes from "
          f"{resumes_from}", flush=True)
    # Like submitit after its own requeue: leave without a result, the job is not over.
    raise SystemExit(0)
