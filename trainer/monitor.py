"""What the train loop hands each finished step to: the non-finite guard, loss spikes, evaluation,
the metrics row (metrics.jsonl, TensorBoard, W&B) and the console line.

Every method is called on every rank at the same steps (some of them are collective); only rank 0
writes or prints.
"""

from __future__ import annotations

import time

from tessera.data.loader import TrainLoader
from tessera.data.sources import Source
from tessera.parallel.engine import Engine
from tessera.parallel.topology import Topology
from tessera.trainer.config import Config
from tessera.trainer.evaluate import Evaluator, resolve_valid
from tessera.trainer.health import LossSpikes, NonFiniteGuard
from tessera.trainer.metrics import MetricsLog, StepTimes, print_resolved_config, warn
from tessera.trainer.stragglers import Stragglers


class TrainMonitor:
    def __init__(
        self,
        cfg: Config,
        topo: Topology,
        engine: Engine,
        loader: TrainLoader,
        sources: list[Source],
        start_step: int,
        resumed_config: Config | None = None,
    ) -> None:
        """`resumed_config`: the config of the checkpoint the run resumed from (None: a first
        start, which prints the whole config; a resume prints one line of what changed)."""
        self.cfg = cfg
        self.is_writer = topo.rank == 0
        self.loader = loader
        if self.is_writer:
            print_resolved_config(cfg, resumed_config)
        self.evaluator = None
        if cfg.data.valid_shards is not None:
            self.evaluator = Evaluator(cfg, topo, resolve_valid(cfg.data.valid_shards, sources))
        self.guard = NonFiniteGuard(cfg)
        self.spikes = LossSpikes(cfg.log.loss_spike_factor)
        self.times = StepTimes(cfg, topo.world_size, engine.device, start_step)
        self.stragglers = Stragglers(cfg.resilience.straggler_factor, topo.rank,
                                     topo.world_size, engine.device, cfg.run.dir)
        self.metrics = MetricsLog(cfg.run.dir, self.is_writer, cfg, start_step)

    def after_step(
        self,
        engine: Engine,
        step: int,
        consumed_samples: int,
        global_batch_size: int,
        *,
        loss: float,
        lr: float,
        grad_norm: float,
        step_s: float,
        data_s: float,
        own_s: float,
    ) -> None:
        """Collective: account for optimizer step `step`; raises NonFiniteError to stop. `own_s`:
        this rank's own time in the step (stragglers)."""
        health = self.guard.check(step, loss, grad_norm, engine.was_step_applied())
        if health["train/skipped"] and self.is_writer:
            warn(
                f"step {step}: loss {loss:.4g}, grad norm {grad_norm:.4g}: not finite; the update "
                f"was skipped on every rank ({self.guard.in_a_row} in a row, at most "
                f"train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps})"
            )
        self._check_spike(step, loss)
        health["train/loss_spikes"] = self.spikes.count
        self.times.add(step_s, data_s, global_batch_size)
        self.stragglers.add(own_s)
        evaluation = (
            self.evaluator.run(engine) if self.evaluator and self.evaluator.due(step) else {}
        )
        if step % self.cfg.log.interval == 0 or step == self.cfg.train.steps or evaluation:
            stragglers = self.stragglers.check(step)  # collective: every rank, same steps
            self.metrics.write(
                {
                    "step": step,
                    "time": round(time.time(), 3),  # Unix seconds, when the row was written
                    "total_steps": self.cfg.train.steps,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "consumed_samples": consumed_samples,
                    "global_batch_size": global_batch_size,
                    **self.times.row(step),
                    **health,
                    **stragglers,
                    **evaluation,
                    **self.loader.metrics(step),
                }
            )

    def _check_spike(self, step: int, loss: float) -> None:
        mean = self.spikes.check(loss)
        if mean is not None and self.is_writer:
            warn(
                f"step {step}: loss spike: {loss:.4f} is {loss / mean:.1f}x the mean of the "
                f"previous {len(self.spikes.history) - 1} steps ({mean:.4f}; "
                f"log.loss_spike_factor={self.cfg.log.loss_spike_factor})"
            )

    def saved(self, seconds: float) -> None:
        """A checkpoint save took `seconds` (reported in the next metrics row)."""
        self.times.saved(seconds)

    def close(self) -> None:
        self.metrics.close()
