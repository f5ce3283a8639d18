"""End to end: a run stopped at dp=2 resumes at dp=1 on the same global sample order."""

from __future__ import annotations

import pytest
from multiproc import run_ranks
from training import losses, tiny_config, train_each


@pytest.mark.slow
def test_training_resumes_at_another_data_parallel_size(tmp_path, byte_shards):
    common = {"train.grad_clip": 0, "data.streams": 4, "data.shuffle_buffer": 4}
    straight = tiny_config(tmp_path / "straight", byte_shards, **{"train.steps": 6}, **common)
    first_half = tiny_config(tmp_path / "resumed", byte_shards,
                             **{"train.steps": 6, "train.stop_at": 3}, **common)
    second_half = tiny_config(tmp_path / "resumed", byte_shards, **{"train.steps": 6}, **common)
    straight_rows, _ = run_ranks(2, train_each, [straight, first_half])[0]
    (resumed_rows,) = run_ranks(1, train_each, [second_half])[0]

    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4, 5, 6]
    assert losses(resumed_rows[:3]) == losses(straight_rows[:3])  # the same dp=2 run so far
    # After the restart one rank computes what two did: equal up to the reduction order. Any
    # other sample order would move the loss by far more than that.
    assert losses(resumed_rows[3:]) == pytest.approx(losses(straight_rows[3:]), rel=1e-5)
    for row, expected in zip(resumed_rows, straight_rows):
        assert row["data/tokens/default"] == expected["data/tokens/default"] == row["step"] * 8 * 32
        assert row["data/skipped_samples"] == 0


@pytest.mark.slow
def test_a_mixture_schedule_resumes_at_another_data_parallel_size(tmp_path, byte_shards):
    """Two sources (the shards split in halves), the second joining at step 3 by schedule;
    stopped at step 4 at dp=2, resumed at dp=1: the token metric shows the switch, and the
    losses are the straight run's."""
    sources = [
        {"name": "a", "shards": [str(byte_shards / f"shard-00000{i}.tar") for i in range(2)],
         "weight": [[0, 1.0], [3, 0.5]]},
        {"name": "b", "shards": [str(byte_shards / f"shard-00000{i}.tar") for i in range(2, 4)],
         "weight": [[0, 0.0], [3, 0.5]]},
    ]
    common = {"train.grad_clip": 0, "data.streams": 4, "data.shuffle_buffer": 4,
              "data.shards": "null", "data.sources": sources, "train.steps": 6}
    straight = tiny_config(tmp_path / "straight", byte_shards, **common)
    first_half = tiny_config(tmp_path / "resumed", byte_shards, **common, **{"train.stop_at": 4})
    second_half = tiny_config(tmp_path / "resumed", byte_shards, **common)
    straight_rows, _ = run_ranks(2, train_each, [straight, first_half])[0]
    (resumed_rows,) = run_ranks(1, train_each, [second_half])[0]

    assert [r["data/tokens/b"] for r in straight_rows[:3]] == [0, 0, 0]
    assert 0 < straight_rows[3]["data/tokens/b"] < straight_rows[5]["data/tokens/b"]
    assert [r["data/tokens/b"] for r in resumed_rows] == [r["data/tokens/b"] for r in straight_rows]
    assert losses(resumed_rows[4:]) == pytest.approx(losses(straight_rows[4:]), rel=1e-5)
