"""The config's `launch` and `slurm` sections: how many ranks start where, and what a Slurm job
asks of the cluster. Plain dataclasses (their comments are the reference of their keys); the
config loader (tessera.trainer.config) builds and checks them with the rest."""

from __future__ import annotations

import dataclasses
from typing import Any

MIN_HANG_TIMEOUT_S = 5  # below this a heartbeat's delay could pass for a hang


@dataclasses.dataclass
class LaunchConfig:
    nproc_per_node: int = 1  # local ranks `tessera train` starts (one per GPU)
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | gloo | nccl


@dataclasses.dataclass
class SlurmConfig:
    partition: str | None = None  # None: the cluster's default partition
    nodes: int = 1  # machines of the job
    tasks_per_node: int = 1  # srun launcher: one task per GPU; torchrun launcher: must be 1
    gpus_per_node: int = 0  # 0: a CPU job
    time_min: int = 60  # the job's time limit in minutes
    signal: str = "USR2"  # sent signal_lead_s before the time limit: save, exit, requeue
    launcher: str = "srun"  # srun: a Slurm task per rank | torchrun: per node, nproc_per_node ranks
    cpus_per_task: int | None = None  # None: Slurm's default
    mem_gb: float | None = None  # memory per node; None: Slurm's default
    account: str | None = None  # --account; None: Slurm's default
    qos: str | None = None  # --qos; None: Slurm's default
    constraint: str | None = None  # --constraint (node features); None: none
    job_name: str | None = None  # None: tessera-<run name>
    signal_lead_s: int = 120  # seconds before the time limit that `signal` arrives
    max_requeues: int = 10  # requeues after a stop on a signal; then the job ends
    sbatch_options: Any = dataclasses.field(default_factory=dict)  # {exclusive: true, ...};
    # a flag set to false is left out
    setup: Any = dataclasses.field(default_factory=list)  # shell lines run before srun

    def tasks_on_each_node(self) -> int:
        """Slurm tasks per node: one per rank with srun, one (torchrun) per node otherwise."""
        return self.tasks_per_node if self.launcher == "srun" else 1


@dataclasses.dataclass
class ResilienceConfig:
    hang_timeout_s: float = 600  # a rank that makes no progress (data, forward/backward,
    # optimizer, save) this long: every live rank writes its stacks to run.dir/hangs/, one line
    # names the ranks and hosts that stopped, and the job exits with code 76 to restart. The
    # first step (compilation) and the first save may take 10x as long, a later save 3x the
    # longest before it. 0: off
    straggler_factor: float = 1.5  # name a rank whose own time (data + forward) exceeds this
    # times the median over all ranks for 3 log steps in a row; 0: off
    max_restarts: int = 3  # relaunches in the same allocation (or `tessera train` launch) after
    # a rank dies or hangs, each resuming from the last checkpoint; then a Slurm job requeues
    exclude_after: int = 2  # strikes (a hang or crash named on a host) after which a requeue or
    # the next `tessera submit` of the run leaves the host out; 0: never
