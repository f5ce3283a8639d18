"""A corpus `prepare` writes as one shard (a small one, at the default shard size) trains at any
data-parallel size: the streams share the shard. A run stopped at dp=4 resumes at dp=2 and
follows the dp=4 run. (Bitwise data at each size: tests/data/test_loader.py.)"""

from __future__ import annotations

import pytest
from multiproc import run_ranks
from training import tiny_config, train_each


@pytest.mark.slow
def test_one_shard_trains_at_dp_4_and_a_stopped_run_resumes_at_dp_2(tmp_path, one_shard):
    common = {"data.streams": "null", "train.steps": 4, "train.grad_clip": 0,
              "checkpoint.interval": 0}
    straight = tiny_config(tmp_path / "dp4", one_shard, **common)
    stopped = tiny_config(tmp_path / "moved", one_shard, **common, **{"train.stop_at": 2})
    rows_dp4, rows_stopped = run_ranks(4, train_each, [straight, stopped])[0]
    assert [r["step"] for r in rows_stopped] == [1, 2]
    resumed = tiny_config(tmp_path / "moved", one_shard, **common)
    [moved] = run_ranks(2, train_each, [resumed])[0]  # (rows of both starts)
    assert [r["step"] for r in moved] == [1, 2, 3, 4]
    for row, reference in zip(moved, rows_dp4):  # the same data; sums in another order
        assert row["loss"] == pytest.approx(reference["loss"], rel=1e-5)
