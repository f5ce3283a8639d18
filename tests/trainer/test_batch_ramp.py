"""train.batch_size_ramp in training: each step updates once over its global batch, the
learning rate counts steps, metrics.jsonl shows the batch on every row, and a run stopped
mid-ramp resumes on the straight run's samples at another data-parallel size."""

from __future__ import annotations

import pytest
from multiproc import run_ranks
from training import losses, tiny_config, train_each

from tessera.trainer.config import ConfigError, validate, validate_layout
from tessera.trainer.optim import lr_at

RAMP = '{start: 4, increment: 4, samples: 24}'  # 4, 4, 8, 12, then 16 (global_batch_size)


@pytest.mark.parametrize("ramp, words", [
    ('{start: 4, increment: 4}', "must be null or {start: N, increment: N, samples: N}"),
    ('{start: 16, increment: 4, samples: 8}', "start 16 must be at least 1 and below"),
    ('{start: 4, increment: 5, samples: 8}', "increment 5 must step from start 4 to"),
    ('{start: 2, increment: 2, samples: 8}', "global batch 2 is not divisible by train.micro"),
])
def test_bad_ramps_are_named(tmp_path, ramp, words):
    cfg = tiny_config(tmp_path, tmp_path, **{"train.batch_size_ramp": ramp,
                                              "train.global_batch_size": 16,
                                              "train.micro_batch_size": 4})
    with pytest.raises(ConfigError, match="train.batch_size_ramp") as error:
        validate(cfg)
    assert words in str(error.value)


def test_a_ramp_must_divide_into_micro_batches_on_every_rank(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path, **{"train.batch_size_ramp": RAMP,
                                              "train.global_batch_size": 16,
                                              "train.micro_batch_size": 4})
    validate_layout(cfg, world_size=1)
    with pytest.raises(ConfigError, match=r"train.batch_size_ramp.*global batch 4 is not "
                                          r"divisible by train.micro_batch_size\*dp = 4\*2"):
        validate_layout(cfg, world_size=2)


@pytest.mark.slow
def test_a_ramped_run_resumes_mid_ramp_at_another_data_parallel_size(tmp_path, byte_shards):
    common = {"train.batch_size_ramp": RAMP, "train.global_batch_size": 16,
              "train.micro_batch_size": 2, "train.steps": 7, "train.grad_clip": 0,
              "data.streams": 4, "data.shuffle_buffer": 4}
    straight = tiny_config(tmp_path / "straight", byte_shards, **common)
    first = tiny_config(tmp_path / "resumed", byte_shards, **common, **{"train.stop_at": 3})
    second = tiny_config(tmp_path / "resumed", byte_shards, **common)
    straight_rows, _ = run_ranks(2, train_each, [straight, first])[0]
    (resumed_rows,) = run_ranks(1, train_each, [second])[0]

    assert [r["global_batch_size"] for r in straight_rows] == [4, 4, 8, 12, 16, 16, 16]
    assert [r["consumed_samples"] for r in straight_rows] == [4, 8, 16, 28, 44, 60, 76]
    assert [r["data/tokens/default"] for r in straight_rows] == [
        r["consumed_samples"] * 32 for r in straight_rows]
    schedule = straight.train
    assert [r["lr"] for r in straight_rows] == pytest.approx(
        [lr_at(i, schedule) for i in range(7)], rel=1e-12)  # the schedule counts steps
    assert [r["global_batch_size"] for r in resumed_rows] == [4, 4, 8, 12, 16, 16, 16]
    assert losses(resumed_rows[:3]) == losses(straight_rows[:3])
    # one rank computes what two did after the restart: equal up to the reduction order
    assert losses(resumed_rows[3:]) == pytest.approx(losses(straight_rows[3:]), rel=1e-5)


@pytest.mark.slow
def test_a_ramped_run_trains_alike_in_one_process_and_two_pipeline_stages(tmp_path, byte_shards):
    """DeepSpeed's pipeline engine runs a ramp step's micro-batches as one batch too."""
    common = {"train.batch_size_ramp": RAMP, "train.global_batch_size": 16,
              "train.micro_batch_size": 2, "train.steps": 5, "train.grad_clip": 0,
              "data.streams": 4, "model.num_layers": 4}
    (single,) = run_ranks(1, train_each, [tiny_config(tmp_path / "one", byte_shards, **common)])[0]
    (piped,) = run_ranks(2, train_each, [tiny_config(tmp_path / "pp2", byte_shards, **common,
                                                     **{"parallel.pp": 2})])[0]
    assert [r["global_batch_size"] for r in piped] == [4, 4, 8, 12, 16]
    assert losses(piped) == pytest.approx(losses(single), rel=1e-5)
