"""`tessera submit`: a training job on Slurm through submitit, that requeues itself when stopped.

    tessera submit --config F [dotted.key=value ...] [--dry-run]

Everything a user can get wrong is checked before anything reaches Slurm: the config (its
layout at the job's world size included), the data, the Slurm tools, and the request against the
cluster (partition, nodes, GPUs, CPUs and memory per node, then `sbatch --test-only`).

In the job (`TrainJob`, pickled by submitit) with `slurm.launcher=srun`, every Slurm task is one
rank: it sets RANK/WORLD_SIZE/MASTER_* from submitit's JobEnvironment and calls `train(cfg)`.
With `slurm.launcher=torchrun`, one task per node starts `launch.nproc_per_node` ranks of
`python -m tessera train` through torch's elastic launcher. Either way training stops on
`slurm.signal` or SIGTERM at a step boundary all ranks agree on, saves, and returns unfinished;
then task 0 asks submitit to requeue the job (at most `slurm.max_requeues` times, counted by
SLURM_RESTART_COUNT), and the next allocation resumes from `run.dir/checkpoints` by itself.
submitit's own checkpoint() runs on rank 0 alone, so it cannot save a sharded checkpoint: here it
only resubmits the same call, which finds its place in the run directory.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from submitit.core.utils import FailedJobError, FailedSubmissionError
from submitit.helpers import Checkpointable

from tessera.launch.env import DistEnv, from_slurm
from tessera.launch.signals import PREEMPTED_EXIT_CODE, StopSignal, parse_signal
from tessera.trainer.config import Config, ConfigError, save_config, validate, validate_layout

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


def world_size(cfg: Config) -> int:
    s = cfg.slurm
    per_node = s.tasks_per_node if s.launcher == "srun" else cfg.launch.nproc_per_node
    return s.nodes * per_node


def run_name(cfg: Config) -> str:
    return cfg.run.name or Path(cfg.run.dir).resolve().name


def job_name(cfg: Config) -> str:
    return cfg.slurm.job_name or f"tessera-{run_name(cfg)}"


def slurm_dir(cfg: Config) -> Path:
    return Path(cfg.run.dir).resolve() / "slurm"


def log_folder(cfg: Config) -> Path:
    """submitit's folder: one per job id (a requeued job appends to the same logs)."""
    return slurm_dir(cfg) / "%j"


def sbatch_parameters(cfg: Config) -> dict:
    """submitit SlurmExecutor parameters (its native names, passed through unchanged)."""
    s = cfg.slurm
    signal_name = parse_signal(s.signal).name.removeprefix("SIG")
    params = {
        "job_name": job_name(cfg),
        "partition": s.partition,
        "time": s.time_min,
        "nodes": s.nodes,
        "ntasks_per_node": s.tasks_per_node if s.launcher == "srun" else 1,
        "cpus_per_task": s.cpus_per_task,
        "gpus_per_node": s.gpus_per_node or None,
        "mem": None if s.mem_gb is None else f"{round(s.mem_gb * 1024)}M",
        "account": s.account,
        "qos": s.qos,
        "constraint": s.constraint,
        "signal_delay_s": s.signal_lead_s,
        # the job's submitit handles this signal until training installs its own handler
        "setup": [f"export SUBMITIT_PREEMPT_SIGNAL={signal_name}", *s.setup],
        # sent to every task (not B: the batch shell alone), so each rank records it
        "additional_parameters": {"signal": f"{signal_name}@{s.signal_lead_s}", **s.sbatch_options},
    }
    return {key: value for key, value in params.items() if value is not None}


def _submitit_command(folder: Path) -> str:
    # The command submitit's SlurmExecutor puts in the script (`_submitit_command_str`).
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit",
                     shlex.quote(str(folder))])


def sbatch_script(cfg: Config) -> str:
    """The sbatch script submitit writes for this config (what --dry-run prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = log_folder(cfg)
    return _make_sbatch_string(command=_submitit_command(folder), folder=folder,
                               **sbatch_parameters(cfg))


# ---------------------------------------------------------------------------------------------
# Checks before submitting


def check_config(cfg: Config) -> None:
    """Config and data problems (ConfigError, DataError), before anything reaches Slurm."""
    from tessera.data.loader import resolve_shards

    s = cfg.slurm
    validate(cfg)
    if s.launcher == "torchrun" and s.tasks_per_node != 1:
        raise ConfigError(f"config key 'slurm.tasks_per_node': {s.tasks_per_node} with "
                          "slurm.launcher=torchrun; torchrun runs one task per node and starts "
                          "launch.nproc_per_node ranks in it (set slurm.tasks_per_node=1)")
    per_node = s.tasks_per_node if s.launcher == "srun" else cfg.launch.nproc_per_node
    per_node_key = "slurm.tasks_per_node" if s.launcher == "srun" else "launch.nproc_per_node"
    if s.gpus_per_node and per_node != s.gpus_per_node:
        raise ConfigError(f"config key '{per_node_key}': {per_node} ranks per node but "
                          f"slurm.gpus_per_node={s.gpus_per_node}; one rank per GPU")
    validate_layout(cfg, world_size(cfg), f"{per_node_key} x slurm.nodes")
    if cfg.data.shards is None:
        raise ConfigError("config key 'data.shards': not set; point it at a `tessera prepare` "
                          "output")
    resolve_shards(cfg.data.shards)


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


def check_against_cluster(cfg: Config) -> None:
    """Partition, node count, GPUs/CPUs/memory per node, then Slurm's own `sbatch --test-only`."""
    s = cfg.slurm
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
    tasks = s.tasks_per_node if s.launcher == "srun" else 1
    cpus = (s.cpus_per_task or 1) * tasks
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
               and n.memory_mb >= memory_mb]
    if s.nodes > len(fitting):
        raise SlurmError(f"config key 'slurm.nodes': {s.nodes} nodes requested; {where} has "
                         f"{len(fitting)} that fit the request ({len(members)} in all)")
    test = subprocess.run(["sbatch", "--test-only"], input=sbatch_script(cfg), text=True,
                          capture_output=True)
    if test.returncode != 0:
        reason = (test.stderr or test.stdout).strip().splitlines()[-1:] or ["no reason given"]
        raise SlurmError(f"Slurm rejects the job (sbatch --test-only): {reason[0]}")


def _slurm_command(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SlurmError(f"`{' '.join(command)}` failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


# ---------------------------------------------------------------------------------------------
# Submitting


def submit(cfg: Config) -> Submitted:
    """Check everything, then submit through submitit; records the job in run.dir/slurm/."""
    import submitit

    run = dataclasses.replace(cfg.run, dir=str(Path(cfg.run.dir).resolve()))
    cfg = dataclasses.replace(cfg, run=run)
    check_config(cfg)
    require_slurm_tools()
    check_against_cluster(cfg)
    executor = submitit.SlurmExecutor(folder=log_folder(cfg),
                                      max_num_timeout=cfg.slurm.max_requeues)
    executor.update_parameters(**sbatch_parameters(cfg))
    try:
        job = executor.submit(TrainJob(cfg))
    except (FailedJobError, FailedSubmissionError) as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise SlurmError(f"sbatch failed: {lines[-1] if lines else e}") from None
    submitted = Submitted(job_id=str(job.job_id), job_name=job_name(cfg),
                          log_dir=Path(str(log_folder(cfg)).replace("%j", str(job.job_id))))
    _record(cfg, submitted)
    return submitted


def _record(cfg: Config, job: Submitted) -> None:
    row = {
        "job_id": job.job_id, "job_name": job.job_name, "log_dir": str(job.log_dir),
        "submitted_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "nodes": cfg.slurm.nodes, "launcher": cfg.slurm.launcher, "world_size": world_size(cfg),
        "steps": cfg.train.steps,
    }
    with open(slurm_dir(cfg) / JOBS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------
# In the job


class TrainJob(Checkpointable):
    """What each Slurm task runs (pickled by submitit). Returns a summary when the run finished;
    when a signal stopped it, task 0 requeues the job and every task exits without a result."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def __call__(self) -> dict:
        env = from_slurm()
        if self.cfg.slurm.launcher == "srun":
            finished_step = _train_here(self.cfg, env)
        else:
            finished_step = _train_with_torchrun(self.cfg, env)
        if finished_step is not None:
            return {"step": finished_step, "run_dir": self.cfg.run.dir, "job_id": env.job_id}
        _requeue_or_end(self.cfg, env)
        raise AssertionError("unreachable")


def _train_here(cfg: Config, env: DistEnv) -> int | None:
    """srun launcher: this task is one rank. The final step, or None when stopped early."""
    from tessera.cli import quiet_dependencies

    env.export()
    quiet_dependencies()  # before the imports that warn
    from tessera.trainer.train import train

    state = train(cfg)
    return state.step if state.step >= cfg.train.steps else None


def _train_with_torchrun(cfg: Config, env: DistEnv) -> int | None:
    """torchrun launcher: this task starts the node's ranks of `python -m tessera train`."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch = LaunchConfig(
        min_nodes=env.num_nodes, max_nodes=env.num_nodes, nproc_per_node=cfg.launch.nproc_per_node,
        run_id=f"tessera-{env.job_id}", rdzv_backend="static",
        rdzv_endpoint=f"{env.master_addr}:{env.master_port}", rdzv_configs={"rank": env.node_rank},
        max_restarts=0, monitor_interval=0.5, start_method="spawn",
        # The ranks get Slurm's signals themselves and stop at a step boundary; the agent must
        # neither die of them nor kill the ranks mid-save (its default on SIGTERM).
        signals_to_handle="SIGINT,SIGHUP,SIGQUIT",
    )
    with tempfile.TemporaryDirectory() as tmp, StopSignal([cfg.slurm.signal, "TERM"]):
        config_path = Path(tmp) / "config.yaml"
        save_config(cfg, config_path)
        try:
            elastic_launch(launch, entrypoint=sys.executable)(
                "-m", "tessera", "train", "--config", str(config_path))
        except ChildFailedError as e:
            codes = {failure.exitcode for failure in e.failures.values()}
            if codes == {PREEMPTED_EXIT_CODE}:
                return None
            rank, failure = e.get_first_failure()
            raise RuntimeError(f"rank {rank} failed with exit code {failure.exitcode}; its "
                               "output is in this log") from None
    return cfg.train.steps


def _requeue_or_end(cfg: Config, env: DistEnv) -> None:
    """After a stop on a signal (the checkpoint is saved): task 0 requeues, the others leave."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    from tessera.trainer import checkpoint

    if env.rank != 0:
        raise SystemExit(0)  # a clean exit: a failing task could end the step before the requeue
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    latest = checkpoint.latest_tag(Path(cfg.run.dir) / "checkpoints")
    if restarts >= cfg.slurm.max_requeues:
        raise RuntimeError(f"stopped on a signal after {restarts} requeues (slurm.max_requeues="
                           f"{cfg.slurm.max_requeues}): not requeued; the last checkpoint is "
                           f"{latest}; `tessera submit` the same config to go on")
    remaining = cfg.slurm.max_requeues - restarts - 1
    SlurmJobEnvironment()._requeue(remaining)  # submitit's requeue: `scontrol requeue <job>`
    print(f"tessera: job {env.job_id} requeued ({remaining} requeues left); it resumes from "
          f"{latest}", flush=True)
    # Like submitit after its own requeue: leave without a result, the job is not over.
    raise SystemExit(0)
