"""The DeepSpeed engine: its config generated from ours (so batch sizes can never disagree)."""

from __future__ import annotations

import dataclasses
import logging
import math

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.utils import logger
from torch import nn

from tessera.parallel.mcore import parallel_state
from tessera.parallel.topology import MegatronMPU, Topology

# A step count DeepSpeed never reaches: we print our own metrics lines.
_NEVER = 10**12
# What build_engine returns (DeepSpeed's PipelineEngine, with pp > 1, is one too).
Engine = DeepSpeedEngine
# DeepSpeed's default gradient bucket, 5e8 elements, is allocated whole by ZeRO 1-3 (2 GB a rank
# in fp32) whatever the model; we cap it at this and at the rank's own parameter count.
MAX_BUCKET_ELEMENTS = 50_000_000


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """What the DeepSpeed engine is built with: the train and parallel sections' batch,
    clipping, precision and ZeRO settings (tessera.trainer.train makes it from the config)."""

    global_batch_size: int  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int  # sequences per forward/backward on one rank
    grad_clip: float  # 0: no clipping
    precision: str  # fp32 | bf16
    zero_stage: int
    leaf_module: type | None = None  # ZeRO 3 gathers each instance's parameters at once

    def gradient_accumulation_steps(self, dp: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * dp)

    def clips_own_gradients(self) -> bool:
        """Without ZeRO or bf16, DeepSpeed neither records the grad norm nor counts it right
        across pipeline stages, so we measure and clip ourselves (`GradNormClipper`)."""
        return self.zero_stage == 0 and self.precision == "fp32"


def zero_config(stage: int, bucket_elements: int, overlap_comm: bool = False,
                leaf_module: type | None = None) -> dict:
    """`overlap_comm`: reduce gradient buckets on a side stream while backward goes on (CUDA,
    dp > 1), into one contiguous buffer; on a CPU there are no streams to overlap with."""
    zero = {"stage": stage, "reduce_bucket_size": bucket_elements}
    if overlap_comm and stage > 0:
        zero.update(overlap_comm=True, contiguous_gradients=True)
    if stage == 3 and leaf_module is not None:
        # ZeRO 3 gathers and releases a whole transformer block's parameters at once (as FSDP
        # wraps each block): one fetch and one release per block and pass instead of one per
        # linear layer and norm inside it (six), for the same memory bound of one block.
        zero["leaf_module"] = {"classes": [f"{leaf_module.__module__}.{leaf_module.__qualname__}"]}
    return zero


def deepspeed_config(options: EngineOptions, dp: int, local_params: int = MAX_BUCKET_ELEMENTS,
                     cuda: bool = False) -> dict:
    """`local_params`: this rank's parameter count (it bounds the gradient bucket); `cuda`:
    the engine runs on a GPU."""
    bucket_elements = max(1, min(MAX_BUCKET_ELEMENTS, local_params))
    overlap_comm = cuda and dp > 1
    zero = zero_config(options.zero_stage, bucket_elements, overlap_comm, options.leaf_module)
    return {
        "train_batch_size": options.global_batch_size,
        "train_micro_batch_size_per_gpu": options.micro_batch_size,
        "gradient_accumulation_steps": options.gradient_accumulation_steps(dp),
        "gradient_clipping": 0.0 if options.clips_own_gradients() else options.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": options.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }


def quiet_deepspeed() -> None:
    logger.setLevel(logging.WARNING)


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, options: EngineOptions,
                 topo: Topology) -> Engine:
    """A DeepSpeed engine; a PipelineModule (pp > 1) brings its own process-group grid."""

    quiet_deepspeed()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(options, topo.dp, sum(p.numel() for p in model.parameters()),
                                cuda=torch.cuda.is_available()),
        mpu=MegatronMPU if topo.pp == 1 else None,
    )
    if topo.pp == 1 and topo.dp == 1 and options.zero_stage == 0:
        # Alone in its data-parallel group, DeepSpeed would still flatten every gradient,
        # all-reduce it over one rank and copy it back each step: three passes that change no bit.
        engine.enable_backward_allreduce = False
    return engine


def grad_norm_of(params: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of the whole model's gradients from this rank's parameters.

    Tensor-parallel shards add up across the TP group; tensors replicated across TP (norm weights)
    count once, on TP rank 0; the tied copy of the embedding on the last stage does not count.
    Stages add up across the pipeline group.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    device = params[0].device if params else torch.device("cpu")
    squares = torch.zeros((), device=device, dtype=torch.float32)
    for param in params:
        if param.grad is None or getattr(param, "ds_pipe_replicated", False):
            continue
        if getattr(param, "tensor_model_parallel", False) or tp_rank == 0:
            squares += param.grad.detach().float().pow(2).sum()
    dist.all_reduce(squares, group=parallel_state.get_tensor_model_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(squares, group=parallel_state.get_pipeline_model_parallel_group())
    return squares.sqrt()


class GradNormClipper:
    """Measures the global grad norm and clips to `max_norm` (0: no clipping) right before each
    optimizer step; DeepSpeed has reduced the gradients across data-parallel ranks by then."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float):
        self.max_norm = max_norm
        self.last_norm = float("nan")
        optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = grad_norm_of(params)
        self.last_norm = norm.item()
        # A non-finite norm (the same value on every rank) skips the update: without gradients
        # AdamW leaves the weights and its moments alone, and DeepSpeed's engine reads
        # `overflow` as it does for its own optimizers (counts a skipped step; trainer/health.py).
        optimizer.overflow = not math.isfinite(self.last_norm)
        if optimizer.overflow:
            for param in params:
                param.grad = None
            return
        if self.max_norm > 0 and self.last_norm > self.max_norm:
            scale = self.max_norm / (self.last_norm + 1e-6)
            for param in params:
                if param.grad is not None:
                    param.grad.mul_(scale)


def step_grad_norm(engine: Engine, clipper: GradNormClipper | None) -> float:
    """The global gradient norm (before clipping) of the step just taken."""
    if clipper is not None:
        return clipper.last_norm
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
