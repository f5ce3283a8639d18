"""AdamW parameter groups and the learning-rate schedules: linear warmup, then cosine decay,
warmup-stable-decay (wsd) or constant; and the check that a resume never changes the learning
rate without a word."""

from __future__ import annotations

import math

import torch
from torch import nn

from tessera.parallel.engine import Engine
from tessera.trainer.config import ConfigError, TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms and biases (1-D tensors) are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, train.weight_decay),
        lr=train.lr,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
        fused=torch.cuda.is_available(),
    )


def lr_at(step_index: int, train: TrainConfig) -> float:
    """The learning rate of optimizer step `step_index` (0-based).

    Each phase counts its steps from 1, as the warmup does, so that the last warmup step trains
    at train.lr and the last step of the run (step_index train.steps - 1) at train.min_lr."""
    if step_index < train.warmup_steps:
        return train.lr * (step_index + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return train.lr
    if train.lr_schedule == "wsd":
        decay_start = train.steps - train.decay_steps
        if step_index < decay_start:
            return train.lr
        progress = min((step_index - decay_start + 1) / train.decay_steps, 1.0)
        remaining = 1.0 - (math.sqrt(progress) if train.decay_shape == "1-sqrt" else progress)
        return train.min_lr + (train.lr - train.min_lr) * remaining
    decay_steps = max(train.steps - train.warmup_steps, 1)
    progress = min((step_index - train.warmup_steps + 1) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.min_lr + (train.lr - train.min_lr) * cosine


SCHEDULE_KEYS = ("steps", "lr", "min_lr", "warmup_steps", "lr_schedule", "decay_steps",
                 "decay_shape")


class ScheduleChangeError(ConfigError):
    pass


def check_schedule_change(saved: TrainConfig, new: TrainConfig, step: int) -> None:
    """On resume after `step` steps: the schedule keys may change (a longer run, a cooldown
    branch) where the new schedule continues the saved one, giving the checkpoint's last step
    the learning rate it trained at (extending wsd in its stable phase, a decay that starts
    after it); otherwise one line with both, unless train.allow_schedule_change."""
    changed = [k for k in SCHEDULE_KEYS if getattr(saved, k) != getattr(new, k)]
    if not changed or new.allow_schedule_change or step == 0:
        return
    before, after = lr_at(step - 1, saved), lr_at(step - 1, new)
    if before == after:
        return
    changes = ", ".join(f"train.{k} {getattr(saved, k)} -> {getattr(new, k)}" for k in changed)
    raise ScheduleChangeError(
        f"the learning-rate schedule changed since the checkpoint ({changes}): the new one does "
        f"not continue the saved one, which trained step {step} at {before:.4g} where the new "
        f"one gives {after:.4g}; set train.allow_schedule_change=true to go on with the new one"
    )


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_at(i, train) / train.lr)


def follow_schedule_at(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """On resume: set the learning rate the current schedule gives `step`. train.steps may have
    changed since the save (a longer run); the same product LambdaLR forms, so an unchanged
    schedule resumes bit for bit."""
    for group, base_lr, factor in zip(
        scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas
    ):
        group["lr"] = base_lr * factor(step)


def count_skipped_update(engine: Engine) -> None:
    """A step whose update was skipped (non-finite gradients, tessera.trainer.health) still
    counts: DeepSpeed does not step the schedule then, so we do, and the learning rate stays a
    function of the step number (a resumed run follows the same schedule)."""
    if not engine.was_step_applied() and engine.lr_scheduler is not None:
        engine.lr_scheduler.step()
