"""A NaN loss on ONE rank makes EVERY rank skip that update, in each kind of engine path: our own
GradNormClipper (fp32, ZeRO-0; at dp=2, tp=2 and pp=2) and DeepSpeed's ZeRO optimizer (ZeRO-1).

"Skipped" is checked where it matters: the checkpoint after the poisoned step holds exactly (bit
for bit) the weights AND the Adam moments of the checkpoint before it, on every rank's files; the
run goes on with the learning rate its schedule gives that step; and too many non-finite steps in
a row stop the run with a message naming the step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from multiproc import run_ranks
from training import read_metrics, tiny_config

from tessera.trainer import checkpoint
from tessera.trainer.optim import lr_at

LAYOUTS = {
    "dp2-zero0": {},
    "dp2-zero1": {"parallel.zero_stage": 1},
    "tp2": {"parallel.tp": 2},
    "pp2": {"parallel.pp": 2},
}


def train_poisoned(plans: list[tuple]) -> list:
    """Rank body: for each (cfg, rank, steps), train with the loss of `rank` multiplied by NaN
    in the given steps (first micro-batch); rank 0 returns the metrics rows or the stop message."""
    import torch.distributed as dist

    from tessera.trainer import model as model_module
    from tessera.trainer import train as train_module
    from tessera.trainer.health import NonFiniteError

    original = model_module.lm_loss
    results = []
    for cfg, nan_rank, nan_steps in plans:
        dp = dist.get_world_size() // (cfg.parallel.tp * cfg.parallel.pp)
        micro_batches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
        calls = [0]

        def poisoned(
            logits,
            labels,
            micro_batches=micro_batches,
            calls=calls,
            nan_rank=nan_rank,
            nan_steps=nan_steps,
        ):
            loss = original(logits, labels)
            step, index = divmod(calls[0], micro_batches)
            calls[0] += 1
            if dist.get_rank() == nan_rank and step + 1 in nan_steps and index == 0:
                return loss * float("nan")
            return loss

        model_module.lm_loss = poisoned
        try:
            train_module.train(cfg)
            outcome = read_metrics(cfg.run.dir) if dist.get_rank() == 0 else None
        except NonFiniteError as e:
            outcome = str(e)
        finally:
            model_module.lm_loss = original
        results.append(outcome)
    return results


def state_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model and optimizer files (not RNG), by file and key path."""
    found = {}

    def walk(obj, where):
        if torch.is_tensor(obj):
            found[where] = obj
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{where}.{key}")
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, f"{where}[{i}]")

    for path in sorted(step_dir.glob("*.pt")):
        walk(checkpoint.safe_load(path), path.name)
    return found


@pytest.mark.slow
def test_a_nan_on_one_rank_skips_the_update_on_every_rank(tmp_path, byte_shards):
    plans = []
    for name, overrides in LAYOUTS.items():
        common = {
            "train.steps": 4,
            "checkpoint.interval": 3,
            "checkpoint.keep_last": 5,
            "log.loss_spike_factor": 0,
            **overrides,
        }
        plans.append((tiny_config(tmp_path / name / "poisoned", byte_shards, **common), 1, {3}))
        plans.append(
            (
                tiny_config(tmp_path / name / "clean", byte_shards, **{**common, "train.steps": 2}),
                None,
                set(),
            )
        )
    results = run_ranks(2, train_poisoned, plans)[0]
    for index, name in enumerate(LAYOUTS):
        poisoned, clean = results[2 * index], results[2 * index + 1]
        assert isinstance(poisoned, list), f"{name}: {poisoned}"
        assert [r["loss"] for r in poisoned[:2]] == [r["loss"] for r in clean], name
        skipped = poisoned[2]
        assert skipped["train/skipped"] == 1 and skipped["train/nonfinite_steps"] == 1, name
        assert poisoned[3]["train/skipped"] == 0 and poisoned[3]["train/nonfinite_steps"] == 1
        assert torch.isfinite(torch.tensor(poisoned[3]["loss"])), f"{name}: training did not go on"
        cfg = plans[2 * index][0]
        assert poisoned[3]["lr"] == pytest.approx(lr_at(3, cfg.train), rel=1e-12), name
        before = state_tensors(tmp_path / name / "clean" / "checkpoints" / "step-00000002")
        after = state_tensors(tmp_path / name / "poisoned" / "checkpoints" / "step-00000003")
        assert before.keys() == after.keys(), name
        assert any("exp_avg" in key for key in before), f"{name}: no Adam moments compared"
        changed = [key for key in before if not torch.equal(before[key], after[key])]
        assert not changed, f"{name}: the skipped step changed {changed[:5]}"


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tmp_path, byte_shards):
    cfg = tiny_config(
        tmp_path / "run", byte_shards, **{"train.steps": 6, "train.max_nonfinite_steps": 1}
    )
    (message,) = run_ranks(2, train_poisoned, [(cfg, 0, {2, 3, 4, 5, 6})])[0]
    assert isinstance(message, str), message
    assert message.startswith("step 3: 2 steps in a row (steps 2-3)"), message
    assert "train.max_nonfinite_steps=1" in message and "resume" in message
