"""`tessera submit`: a training job on Slurm that requeues itself when stopped.

    tessera submit --config F [dotted.key=value ...] [--dry-run]

Everything a user can get wrong is checked before anything reaches Slurm: the config (its layout
at the job's world size included), the data, then (tessera.launch.slurm) the Slurm tools and the
request against the cluster: partition, nodes, GPUs, CPUs and memory per node, then
`sbatch --test-only`.

In the job (`TrainJob`, pickled by submitit) with `slurm.launcher=srun`, every Slurm task is one
rank: it sets RANK/WORLD_SIZE/MASTER_* from submitit's JobEnvironment and calls `train(cfg)`.
With `slurm.launcher=torchrun`, one task per node starts `launch.nproc_per_node` ranks of
`python -m tessera train` through torch's elastic launcher.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
import tempfile
from pathlib import Path

from submitit.helpers import Checkpointable

from tessera.data.format import DataError
from tessera.data.sources import resolve_shards
from tessera.launch import faults, slurm
from tessera.launch.env import DistEnv, from_slurm, quiet_dependencies
from tessera.launch.restarts import batch_command
from tessera.trainer import checkpoint
from tessera.trainer.config import Config, ConfigError, save_config, validate, validate_layout
from tessera.trainer.run_dir import check_not_a_file


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


def sbatch_script(cfg: Config) -> str:
    """The sbatch script submitit writes for this config (what --dry-run prints)."""
    return slurm.sbatch_script(cfg.slurm, job_name(cfg), log_folder(cfg), job_step(cfg))


def job_step(cfg: Config) -> slurm.JobStep:
    """The srun step runs under tessera.launch.restarts (a failed step starts again in the
    allocation, up to resilience.max_restarts times), on hosts without too many strikes; the
    comment above it says what each task runs."""
    r = cfg.resilience
    wrapper = batch_command(sys.executable, str(Path(cfg.run.dir).resolve()), r.max_restarts,
                            r.exclude_after, cfg.slurm.max_requeues)
    return slurm.JobStep(tuple(wrapper), task_note(cfg), tuple(excluded_hosts(cfg)))


def task_note(cfg: Config) -> tuple[str, ...]:
    """What each task runs (submitit's _submit below unpickles it), as a command line."""
    config = submitted_config_path(cfg)
    if cfg.slurm.launcher == "srun":
        return (f"each task is one rank ($SLURM_PROCID) of: python -m tessera train --config "
                f"{config}",
                "(submitit's _submit runs it: tessera.trainer.submit.TrainJob, the same config)")
    return (f"each task (one per node) runs: torchrun --nproc-per-node "
            f"{cfg.launch.nproc_per_node} -m tessera train --config {config}",
            "(submitit's _submit runs it: tessera.trainer.submit.TrainJob, the same config)")


def submitted_config_path(cfg: Config) -> Path:
    """The config a job was submitted with (written at submit, read by nothing: for people)."""
    return slurm_dir(cfg) / "submitted.yaml"


def excluded_hosts(cfg: Config) -> list[str]:
    """Hosts with resilience.exclude_after strikes in this run (hangs and crashes named there)."""
    return faults.excluded_hosts(cfg.run.dir, cfg.resilience.exclude_after)


def check_config(cfg: Config, dry_run: bool = False) -> None:
    """Config and data problems (ConfigError, DataError), before anything reaches Slurm. A dry
    run (perhaps away from the cluster, where the data lives) only warns about the data."""
    s = cfg.slurm
    validate(cfg)
    check_not_a_file(cfg.run.dir)  # as `tessera train` refuses it
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
    try:
        resolve_shards(cfg.data.shards)
    except DataError as e:
        if not dry_run:
            raise
        print(f"tessera submit: warning: {e} (not readable here; the job needs it on the "
              f"cluster)", file=sys.stderr)


def submit(cfg: Config) -> slurm.Submitted:
    """Check everything, then submit through submitit; records the job in run.dir/slurm/."""
    run = dataclasses.replace(cfg.run, dir=str(Path(cfg.run.dir).resolve()))
    cfg = dataclasses.replace(cfg, run=run)
    check_config(cfg)
    step = job_step(cfg)
    if step.exclude:
        print(f"tessera submit: leaving out {', '.join(step.exclude)}: at least "
              f"resilience.exclude_after={cfg.resilience.exclude_after} strikes each (see "
              f"`tessera status {cfg.run.dir}`)", file=sys.stderr)
    submitted = slurm.submit(cfg.slurm, job_name(cfg), log_folder(cfg), TrainJob(cfg), step)
    save_config(cfg, submitted_config_path(cfg))  # (after the checks: a refusal writes nothing)
    slurm.record_job(slurm_dir(cfg) / slurm.JOBS_FILE, {
        "job_id": submitted.job_id, "job_name": submitted.job_name,
        "log_dir": str(submitted.log_dir),
        "submitted_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "nodes": cfg.slurm.nodes, "launcher": cfg.slurm.launcher, "world_size": world_size(cfg),
        "steps": cfg.train.steps, "excluded": list(step.exclude),
    })
    return submitted


class TrainJob(Checkpointable):
    """What each Slurm task runs (pickled by submitit). Returns a summary when the run finished;
    when a signal stopped it, task 0 requeues the job and every task exits without a result."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def __call__(self) -> dict:
        env = from_slurm()
        if env.rank == 0:  # the job's log says what it runs (the script's comment says it too)
            print(f"tessera: job {env.job_id}: {task_note(self.cfg)[0]}", flush=True)
        if self.cfg.slurm.launcher == "srun":
            finished = _train_here(self.cfg, env)
        else:
            finished = _train_with_torchrun(self.cfg, env)
        if finished:
            return {"step": self.cfg.train.steps, "run_dir": self.cfg.run.dir,
                    "job_id": env.job_id}
        latest = checkpoint.latest_tag(Path(self.cfg.run.dir) / "checkpoints")
        slurm.requeue_or_end(env, self.cfg.slurm.max_requeues, latest)
        raise AssertionError("unreachable")


def _train_here(cfg: Config, env: DistEnv) -> bool:
    """srun launcher: this task is one rank. True when the run finished, False when stopped."""
    env.export()
    quiet_dependencies()  # before the imports that warn
    from tessera.trainer.train import train  # lazy: after quiet_dependencies: the imports that warn

    return train(cfg).step >= cfg.train.steps


def _train_with_torchrun(cfg: Config, env: DistEnv) -> bool:
    """torchrun launcher: this task starts the node's ranks of `python -m tessera train`."""
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.yaml"
        save_config(cfg, config_path)
        argv = ["-m", "tessera", "train", "--config", str(config_path)]
        return slurm.run_node_with_torchrun(env, cfg.launch.nproc_per_node, argv,
                                            cfg.slurm.signal)
