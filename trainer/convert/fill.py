"""Fill a live DeepSpeed engine of any layout from canonical tensors: the model's weights, the
optimizer's fp32 masters and Adam moments, the schedule and DeepSpeed's step counters.

Each rank cuts its local tensors from the full ones with the model's own `canonical_parts` (as
initialization does) and hands them to the optimizer in the form its DeepSpeed wrapper keeps
them; saving the engine then writes DeepSpeed's own files for the new layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

from tessera.parallel import tensor_parallel as tpl
from tessera.parallel.engine import Engine
from tessera.trainer.checkpoint import CheckpointError
from tessera.trainer.convert.reader import KINDS, MOMENTS, WEIGHT

# (canonical name, kind) -> the full fp32 tensor; kind is weight, exp_avg or exp_avg_sq
TensorSource = Callable[[str, str], torch.Tensor]


def _step_tensor(adam_step: float, fused: bool, device: torch.device) -> torch.Tensor:
    # where torch's Adam keeps its step: on the parameter's device only when fused/capturable
    return torch.tensor(adam_step, dtype=torch.float32, device=device if fused else "cpu")


def _fresh_state(flat: torch.Tensor, adam_step: float, fused: bool) -> dict:
    return {
        "step": _step_tensor(adam_step, fused, flat.device),
        "exp_avg": torch.zeros_like(flat),
        "exp_avg_sq": torch.zeros_like(flat),
    }


class _TorchAdam:
    """fp32 without ZeRO: the model's parameters are the optimizer's."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.fused = {
            id(p): bool(g.get("fused") or g.get("capturable"))
            for g in optimizer.param_groups
            for p in g["params"]
        }

    def prepare(self, adam_step: float | None) -> None:
        self.adam_step = adam_step

    def set(self, param: torch.nn.Parameter, values: dict[str, torch.Tensor]) -> None:
        param.data.copy_(values[WEIGHT])
        if self.adam_step is not None:
            self.optimizer.state[param] = {
                "step": _step_tensor(self.adam_step, self.fused[id(param)], param.device),
                **{k: values[k].to(param.device, torch.float32).clone() for k in MOMENTS},
            }

    def finish(self) -> None:
        pass


class _Unfused(_TorchAdam):
    """bf16 without ZeRO at pp=1 (DeepSpeed's FP16_UnfusedOptimizer): an fp32 master per
    parameter, the base optimizer's state keyed by the masters."""

    def __init__(self, wrapper) -> None:
        super().__init__(wrapper.optimizer)
        self.master = {
            id(lp): hp
            for lps, hps in zip(wrapper.fp16_groups, wrapper.fp32_groups)
            for lp, hp in zip(lps, hps)
        }

    def set(self, param: torch.nn.Parameter, values: dict[str, torch.Tensor]) -> None:
        master = self.master[id(param)]
        param.data.copy_(values[WEIGHT])
        super().set(master, values)


class _Zero12:
    """ZeRO 1/2 and BF16_Optimizer: flat fp32 partitions, reached through DeepSpeed's
    tensor-fragment API (each rank writes the fragment its partition holds)."""

    def __init__(self, wrapper) -> None:
        self.wrapper = wrapper

    def prepare(self, adam_step: float | None) -> None:
        self.adam_step = adam_step
        if adam_step is None:
            return
        base = self.wrapper.optimizer
        for group in base.param_groups:
            for flat in group["params"]:
                base.state[flat] = _fresh_state(flat, adam_step, bool(group.get("fused")))
        self.wrapper._hp_optimizer_states_linked = False  # relink the fragments to the new state
        self.wrapper._lazy_init_hp_params_optimizer_state()

    def set(self, param: torch.nn.Parameter, values: dict[str, torch.Tensor]) -> None:
        param.data.copy_(values[WEIGHT])
        safe_set_full_fp32_param(param, values[WEIGHT].to(param.device))
        if self.adam_step is not None:
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, values[key].to(param.device), key)

    def finish(self) -> None:
        pass


class _Zero3(_Zero12):
    """ZeRO 3: parameters themselves partitioned; set the fp32 partitions, then copy them into
    the model's partitions as DeepSpeed's own checkpoint loader does."""

    def prepare(self, adam_step: float | None) -> None:
        self.adam_step = adam_step
        if adam_step is not None:
            base = self.wrapper.optimizer
            fused = bool(base.defaults.get("fused"))
            for flat in self.wrapper.fp32_partitioned_groups_flat:
                base.state[flat] = _fresh_state(flat, adam_step, fused)

    def set(self, param: torch.nn.Parameter, values: dict[str, torch.Tensor]) -> None:
        safe_set_full_fp32_param(param, values[WEIGHT].to(param.ds_tensor.device))
        if self.adam_step is not None:
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, values[key].to(param.ds_tensor.device), key)

    def finish(self) -> None:
        for sub_group in range(len(self.wrapper.fp16_groups)):
            self.wrapper._reassign_or_swap_out_partitioned_parameters(sub_group)


def _handler(optimizer: torch.optim.Optimizer) -> _TorchAdam | _Zero12:
    match optimizer:
        case DeepSpeedZeroOptimizer_Stage3():
            return _Zero3(optimizer)
        case DeepSpeedZeroOptimizer() | BF16_Optimizer():
            return _Zero12(optimizer)
        case FP16_UnfusedOptimizer():
            return _Unfused(optimizer)
        case torch.optim.Optimizer():
            return _TorchAdam(optimizer)
    raise CheckpointError(
        f"cannot fill a {type(optimizer).__name__} optimizer (not one "
        f"DeepSpeed builds for Tessera's configurations)"
    )


@torch.no_grad()
def fill_engine(engine: Engine, source: TensorSource, adam_step: float | None) -> None:
    """Every rank: set its local tensors from `source`. With `adam_step` None, the weights only
    (the optimizer keeps the fresh state it was built with); otherwise also the fp32 masters and
    Adam's moments, whose step count becomes `adam_step`."""
    tp_rank, tp = tpl.tp_rank_and_size()
    kinds = KINDS if adam_step is not None else (WEIGHT,)
    handler = _handler(engine.optimizer)
    handler.prepare(adam_step)
    for param, parts in tpl.canonical_params(engine.module):
        values = {
            kind: tpl.local_tensor(parts, lambda part, k=kind: source(part.name, k), tp_rank, tp)
            for kind in kinds
        }
        handler.set(param, values)
    handler.finish()


def restore_schedule(engine: Engine, scheduler_state: dict, counters: dict) -> None:
    """The learning-rate schedule and DeepSpeed's step counters of the source checkpoint. Every
    param group follows one schedule, so a stage with fewer groups takes the first's values."""
    scheduler = engine.lr_scheduler
    groups = len(scheduler.optimizer.param_groups)
    state = dict(scheduler_state)
    for key in ("base_lrs", "_last_lr"):
        if isinstance(state.get(key), list):
            state[key] = state[key] if len(state[key]) == groups else [state[key][0]] * groups
    state["lr_lambdas"] = [None] * groups  # ours are closures over the config, not state
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if key in counters:
            setattr(engine, key, counters[key])
