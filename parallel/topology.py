"""One topology (dp x pp x tp = world) shared by megatron-core and DeepSpeed.

Rank order, fastest axis first: tensor, data, pipeline. That is megatron-core's default order
(tp-cp-ep-dp-pp with cp = ep = 1) and DeepSpeed's PipeModelDataParallelTopology (axes pipe, data,
model), so both libraries build the same groups from the same ranks.
megatron-core's `parallel_state` is initialized here and nowhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Iterator

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from tessera.parallel.mcore import parallel_state

SHM_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's name of the op (ShareMemCommBuilder.NAME)


@dataclasses.dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    local_rank: int
    tp: int
    pp: int

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    def describe(self) -> str:
        return f"world={self.world_size} dp={self.dp} pp={self.pp} tp={self.tp}"


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun-style variables; one process without them."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return rank, world, local_rank


def choose_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(tp: int, pp: int, backend: str = "auto", timeout_s: int = 600) -> Topology:
    """Join (or create) the default process group, build megatron-core's groups for (tp, pp)."""
    rank, world, local_rank = env_world()
    backend = choose_backend(backend)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    else:
        # CPU ranks on one host share the cores they may run on (Slurm may bind a subset); more
        # threads than cores only adds contention.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    timeout = datetime.timedelta(seconds=timeout_s)
    if world == 1 and not dist.is_initialized():
        # One process still needs a process group for megatron-core and DeepSpeed; an in-memory
        # store makes it without a port, and leaves no RANK/MASTER_* behind in the environment
        # (a command this process starts would take them for a launch). DeepSpeed's engine reads
        # LOCAL_RANK, which alone does not look like a launch.
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    skip_deepspeeds_shm_op()
    # Wraps an existing torch process group, or creates one from the environment.
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    topo = Topology(
        world_size=dist.get_world_size(), rank=dist.get_rank(), local_rank=local_rank, tp=tp, pp=pp
    )
    assert parallel_state.get_data_parallel_rank() == topo.dp_rank, "rank order mismatch"
    assert parallel_state.get_tensor_model_parallel_rank() == topo.tp_rank, "rank order mismatch"
    return topo


@contextlib.contextmanager
def distributed(tp: int, pp: int, backend: str = "auto") -> Iterator[Topology]:
    """The process group and megatron-core's groups for the body, left after it. A process group
    that existed before (torchrun's rendezvous, a test's) stays; one made here goes."""
    owns_process_group = not dist.is_initialized()
    topo = init_distributed(tp, pp, backend)
    try:
        yield topo
    finally:
        destroy_distributed(process_group_too=owns_process_group)


def destroy_distributed(process_group_too: bool = True) -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if process_group_too and dist.is_initialized():
        dist.destroy_process_group()


def skip_deepspeeds_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (used by its inference
    all-reduce) when it first wraps the process group: a C++ build of 20 s to minutes in every new
    environment, announced by each rank. Training never calls it, so it is marked unavailable."""
    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def deepspeed_topology(topo: Topology) -> PipeModelDataParallelTopology:
    return PipeModelDataParallelTopology(num_pp=topo.pp, num_mp=topo.tp, num_dp=topo.dp)


class MegatronMPU:
    """DeepSpeed's `mpu` interface answered by megatron-core's groups (non-pipeline engine)."""

    @staticmethod
    def get_model_parallel_rank() -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    @staticmethod
    def get_model_parallel_group() -> dist.ProcessGroup:
        return parallel_state.get_tensor_model_parallel_group()

    @staticmethod
    def get_data_parallel_rank() -> int:
        return parallel_state.get_data_parallel_rank()

    @staticmethod
    def get_data_parallel_world_size() -> int:
        return parallel_state.get_data_parallel_world_size()

    @staticmethod
    def get_data_parallel_group() -> dist.ProcessGroup:
        return parallel_state.get_data_parallel_group()
