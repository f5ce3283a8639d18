"""Where this process sits in a distributed job, read from Slurm's environment.

torchrun (and our local launcher) set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
themselves. Under Slurm each task reads its place from submitit's JobEnvironment (the SLURM_*
variables), and `DistEnv.export` sets the torchrun variables from it, so training reads one
convention whatever started it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import sys
import warnings
from collections.abc import Mapping

# MASTER_PORT = PORT_BASE + job id mod PORT_SPAN: every node derives the same port, and jobs
# sharing a first node rarely collide. Below Linux's ephemeral range (32768-60999).
PORT_BASE = 20000
PORT_SPAN = 10000


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    job_id: str

    def export(self) -> None:
        """Set the torchrun-style variables that init_distributed reads."""
        os.environ.update(
            RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size), GROUP_RANK=str(self.node_rank),
            MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port),
        )


def master_port_for_job(job_id: str) -> int:
    """The port every node of the job derives alike, from SLURM_JOB_ID (unique per array task)."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def from_slurm() -> DistEnv:
    """This task's place, from submitit's reading of the SLURM_* variables (in a submitit job or
    under a plain `srun`). MASTER_ADDR is the allocation's first host."""
    from submitit.slurm.slurm import SlurmJobEnvironment  # lazy: only inside a Slurm job

    env = SlurmJobEnvironment()
    num_nodes = env.num_nodes
    per_node = int(os.environ.get("SLURM_NTASKS_PER_NODE", env.num_tasks // max(num_nodes, 1)))
    return DistEnv(
        rank=env.global_rank, world_size=env.num_tasks, local_rank=env.local_rank,
        local_world_size=per_node, node_rank=env.node, num_nodes=num_nodes,
        master_addr=env.hostnames[0], master_port=master_port_for_job(env.raw_job_id),
        job_id=env.raw_job_id,
    )


def srun_step_tasks() -> int:
    """How many tasks the current `srun` step started (1 outside Slurm or in a batch shell)."""
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))


class LaunchEnvError(ValueError):
    """A launcher variable (RANK, WORLD_SIZE, ...) this process cannot run with; the message
    names it."""


def check_launch_env(env: Mapping[str, str] = os.environ) -> None:
    """Refuse torchrun-style variables that no launcher would set: one left in a shell or a job
    script (RANK=abc, WORLD_SIZE=0, LOCAL_RANK=-1, a WORLD_SIZE without MASTER_ADDR) otherwise
    fails inside torch or DeepSpeed, in int(), a division by 0, or an MPI discovery."""
    world = _int_variable(env, "WORLD_SIZE", 1, "a number of processes (an integer >= 1)")
    _int_variable(env, "RANK", 0, f"a rank (an integer from 0 to WORLD_SIZE-1 = {world - 1})",
                  most=world - 1)
    _int_variable(env, "LOCAL_RANK", 0, "a local rank (an integer >= 0)")
    _int_variable(env, "LOCAL_WORLD_SIZE", 1, "a number of ranks per node (an integer >= 1)")
    if world == 1:
        return
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name, "").strip():
            raise LaunchEnvError(
                f"environment variable WORLD_SIZE={world} asks for {world} processes but {name} "
                f"is not set; torchrun sets WORLD_SIZE with RANK, MASTER_ADDR and MASTER_PORT "
                f"(tessera does under srun): unset WORLD_SIZE to run one process")
    _int_variable(env, "MASTER_PORT", 1, "a TCP port (an integer from 1 to 65535)", most=65535,
                  fix="set it to rank 0's port, or unset WORLD_SIZE to run one process")


def _int_variable(env: Mapping[str, str], name: str, least: int, what: str,
                  most: int | None = None, fix: str = "unset it to run one process") -> int:
    """The value of `name`, an integer from `least` to `most` (`least` when unset); else a
    LaunchEnvError saying what it should be."""
    if name not in env:
        return least
    try:
        value = int(env[name])
    except ValueError:
        value = None
    if value is None or value < least or (most is not None and value > most):
        raise LaunchEnvError(f"environment variable {name}={env[name]!r} is not {what}; "
                             f"torchrun sets it (tessera does under srun): {fix}")
    return value


# torch.distributed functions torch 2.13 deprecates that DeepSpeed's collectives call; none of
# ours calls them (tests/test_layering.py), as their warnings are hidden
DEPRECATED_COLLECTIVES = ("all_gather_into_tensor", "reduce_scatter_tensor")


def quiet_dependencies() -> None:
    """Silence start-up notices of our dependencies that say nothing to a user of Tessera.
    (Two more are quieted where they arise: torch's agent's log lines in launch.local, and
    DeepSpeed's pipeline-module printout in parallel.pipeline.)"""
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="megatron")
    # DeepSpeed's pipeline engine broadcasts tied weights (pp > 1 with tied embeddings) through
    # a c10d op without an autograd kernel; no gradient flows through it: the run equals one
    # process (tests/parity/test_parity.py, "tied" at pp=2)
    warnings.filterwarnings("ignore", message="c10d::broadcast_: an autograd kernel was not "
                                              "registered")
    # the warning names torch's module, not DeepSpeed's, the caller
    names = "|".join(DEPRECATED_COLLECTIVES)
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=rf"`torch\.distributed\.({names})` is deprecated")
    if "DS_ACCELERATOR" not in os.environ:
        import torch  # lazy: the CLI calls this first: `tessera --help` stays quick without torch

        # Naming the accelerator spares DeepSpeed's "Setting accelerator to CPU" warning.
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"


PR_SET_PDEATHSIG = 1  # prctl(2)


def exit_with_launcher() -> None:
    """A rank started by an elastic agent (our local launch, torchrun) is killed when the agent
    dies, so that a SIGKILLed launcher leaves no rank behind holding memory or a GPU. SIGKILL
    rather than a stop signal: the peers are going too, so a save would wait in a collective for
    ranks that are gone; checkpoints survive kill -9. Under srun without torchrun, Slurm ends a
    step's tasks itself."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != launcher:  # it died before prctl took effect
        os._exit(1)
