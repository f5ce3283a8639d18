"""The DeepSpeed engine: its config generated from ours (so batch sizes can never disagree)."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from tessera.parallel.topology import MegatronMPU, Topology
from tessera.trainer.config import Config

# A step count DeepSpeed never reaches: we print our own metrics lines.
_NEVER = 10**12


def gradient_accumulation_steps(cfg: Config, dp: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def deepspeed_config(cfg: Config, dp: int) -> dict:
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(cfg, dp),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }


def quiet_deepspeed() -> None:
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: Config, topo: Topology):
    import deepspeed

    quiet_deepspeed()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, topo.dp),
        mpu=MegatronMPU,
    )
    return engine


def global_grad_norm(engine) -> float:
    """The global gradient norm of the step just taken (before clipping).

    ZeRO and bf16 optimizers record it; DeepSpeed's plain fp32 path does not, so there we measure
    it ourselves with DeepSpeed's tensor-parallel-aware norm before the step (see `pre_step_norm`).
    """
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def needs_own_grad_norm(engine) -> bool:
    return not (engine.zero_optimization() or engine.bfloat16_enabled())


def pre_step_norm(engine) -> float:
    """L2 norm of the (data-parallel averaged) gradients over the whole model.

    Tensor-parallel shards add up across the TP group; replicated tensors (norm weights) are
    counted once, on TP rank 0.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    squares = torch.zeros((), device=engine.device, dtype=torch.float32)
    for param in engine.module.parameters():
        if param.grad is None:
            continue
        if getattr(param, "tensor_model_parallel", False) or tp_rank == 0:
            squares += param.grad.detach().float().pow(2).sum()
    dist.all_reduce(squares, group=parallel_state.get_tensor_model_parallel_group())
    return squares.sqrt().item()
