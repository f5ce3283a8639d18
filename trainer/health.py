"""Training health: updates skipped on non-finite values, and loss spikes.

How a non-finite step is skipped, on every rank alike. The decision has to be taken where the
update is, before the optimizer touches the weights or Adam's moments (zeroing the gradients
would not do: Adam would still decay its moments, apply weight decay and count the step).
- DeepSpeed's wrapped optimizers (ZeRO 1-3, and bf16 at any stage) check the global gradient
  norm before stepping: when it is inf or NaN they drop the gradients and return without any
  update, after an all-reduce (MAX) of the overflow flag over the data- and model-parallel groups,
  so every rank skips together. The engine then reports `was_step_applied() == False`.
- fp32 without ZeRO uses the bare torch optimizer; there our `GradNormClipper` (parallel/engine.py)
  computes the same global norm right before `optimizer.step()` (gradients already summed over
  data-parallel ranks, squares summed over the tensor- and pipeline-parallel groups, so every rank
  holds the same value), and when it is not finite it sets every gradient to None (torch's AdamW
  then leaves those parameters and their state untouched) and raises the optimizer's `overflow`
  flag, which the DeepSpeed engine reads exactly as it reads its own optimizers'.
A non-finite loss makes the gradients non-finite too (the cross-entropy gradient is NaN wherever
its loss is), so the gradient check also covers the loss. The reported loss and grad norm are the
same on every rank (the loss is averaged over data-parallel ranks, the norm is global), so the
bookkeeping below agrees across ranks without another collective.

A skipped step still consumes its batch and counts as a step: the loop steps the learning-rate
schedule for it (`optim.count_skipped_update`; DeepSpeed skips the scheduler on overflow), so
the learning rate stays a function of the step number and a resumed run follows the same
schedule.
"""

from __future__ import annotations

import collections
import math

from tessera.trainer.config import Config

SPIKE_WINDOW = 100  # finite losses the running mean of `LossSpikes` is taken over
SPIKE_MIN_HISTORY = 10  # no spike is flagged before this many losses are known


class NonFiniteError(RuntimeError):
    """The run stopped on non-finite losses or gradients; the message names the step."""


class NonFiniteGuard:
    """Counts skipped updates; stops the run when too many come in a row."""

    def __init__(self, cfg: Config):
        self.skip = cfg.train.skip_nonfinite
        self.max_in_a_row = cfg.train.max_nonfinite_steps
        self.total = 0
        self.in_a_row = 0

    def check(self, step: int, loss: float, grad_norm: float, applied: bool) -> dict:
        """After optimizer step `step` (`applied`: the engine updated the weights): its metrics
        entries; raises NonFiniteError to stop the run."""
        if applied and math.isfinite(loss) and not math.isinf(grad_norm):
            self.in_a_row = 0  # (a NaN norm with an applied step: the engine reported none)
            return {"train/skipped": 0, "train/nonfinite_steps": self.total}
        what = f"loss {loss:.4g}, grad norm {grad_norm:.4g}"
        if applied:  # not with the engines we build (see the module doc); never pass silently
            raise NonFiniteError(
                f"step {step}: {what} is not finite but the optimizer applied the update, so the "
                f"weights are no longer usable; resume from the last checkpoint with a lower "
                f"train.lr"
            )
        self.total += 1
        self.in_a_row += 1
        if not self.skip:
            raise NonFiniteError(
                f"step {step}: {what}: not finite (the update was not applied), and "
                f"train.skip_nonfinite=false stops at the first one; lower train.lr (or set "
                f"train.grad_clip), check the data, then resume from the last checkpoint"
            )
        if self.in_a_row > self.max_in_a_row:
            first = step - self.in_a_row + 1
            raise NonFiniteError(
                f"step {step}: {self.in_a_row} steps in a row (steps {first}-{step}) had a "
                f"non-finite loss or grad norm ({what}), more than train.max_nonfinite_steps="
                f"{self.max_in_a_row}; each update was skipped. Lower train.lr (or set "
                f"train.grad_clip), check the data, then resume from the last checkpoint"
            )
        return {"train/skipped": 1, "train/nonfinite_steps": self.total}


class LossSpikes:
    """Flags a loss above `factor` times the mean of the previous finite losses."""

    def __init__(self, factor: float, window: int = SPIKE_WINDOW):
        self.factor = factor
        self.history: collections.deque[float] = collections.deque(maxlen=window)
        self.count = 0

    def check(self, loss: float) -> float | None:
        """The running mean when `loss` is a spike, else None; remembers finite losses."""
        if not math.isfinite(loss):
            return None
        mean = sum(self.history) / len(self.history) if self.history else None
        self.history.append(loss)
        if (
            self.factor > 0
            and mean is not None
            and len(self.history) > SPIKE_MIN_HISTORY
            and loss > self.factor * mean
        ):
            self.count += 1
            return mean
        return None
