"""Exact resume: after a restart at step k, at any data-parallel size and with any number of
workers, the global batches are bitwise those of the uninterrupted run (shuffle buffer and a
mixture of sources included)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from shardutil import assert_steps_equal, global_steps, make_data, make_loader, take_steps

# Two sources (token ids 1-499 and 500-999) so that a window's source can be told from its ids.
WEIGHTS = {"big": 0.7, "small": 0.3}


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("mixture")
    make_data(root / "big", num_shards=8, seed=1, low=1, high=500)
    make_data(root / "small", num_shards=3, seed=2, low=500, high=1000)
    return [
        {"name": "big", "shards": str(root / "big"), "weight": WEIGHTS["big"]},
        {"name": "small", "shards": str(root / "small"), "weight": WEIGHTS["small"]},
    ]


def sources_of(entries: list[dict], weights: dict | None = None):
    from tessera.data.sources import resolve_sources

    weights = weights or {}
    return resolve_sources([{**e, "weight": weights.get(e["name"], e["weight"])} for e in entries])


# (dp size of the first run, dp size after the restart, workers per rank)
LAYOUTS = [(2, 2, 0), (2, 1, 0), (1, 2, 0), (2, 2, 2), (2, 1, 2), (1, 2, 2)]


@pytest.mark.parametrize(
    ("dp_before", "dp_after", "workers"), LAYOUTS, ids=[f"dp{a}to{b}-w{w}" for a, b, w in LAYOUTS]
)
def test_bitwise_resume_at_any_dp_and_workers(mixture, dp_before, dp_after, workers):
    sources = sources_of(mixture)
    # 4 streams, 2 rows each per step, shuffle blocks of 3 windows: step 7 resumes mid-block.
    options = {"shuffle_buffer": 3, "num_workers": workers}
    start_step, more_steps = 7, 6
    straight = global_steps(sources, dp_before, start_step + more_steps, **options)

    before = make_loader(sources, dp_size=dp_before, **options)
    state = json.loads(json.dumps(before.state_dict(step=start_step)))  # as in a checkpoint
    resumed = []
    for rank in range(dp_after):
        loader = make_loader(
            sources, dp_rank=rank, dp_size=dp_after, start_step=start_step, **options
        )
        loader.check_resume(state)
        resumed.append(take_steps(loader, more_steps))
    resumed_global = [torch.cat([r[k] for r in resumed]) for k in range(more_steps)]
    assert_steps_equal(resumed_global, straight[start_step:])


def test_shuffle_buffer_permutes_windows_within_blocks(tmp_path):
    make_data(tmp_path, num_shards=4, tokens_per_shard=300)
    options = {"num_streams": 1, "global_batch_size": 2, "micro_batch_size": 2}
    plain = torch.cat(take_steps(make_loader(tmp_path, shuffle_buffer=0, **options), 24))
    shuffled = torch.cat(take_steps(make_loader(tmp_path, shuffle_buffer=8, **options), 24))
    assert not torch.equal(plain, shuffled)
    for block in range(6):  # each block of 8 windows holds the same windows, in another order
        rows = slice(8 * block, 8 * (block + 1))
        as_set = sorted(map(tuple, plain[rows].tolist()))
        assert as_set == sorted(map(tuple, shuffled[rows].tolist()))
    # Another seed, another order.
    other = torch.cat(take_steps(make_loader(tmp_path, shuffle_buffer=8, seed=4, **options), 24))
    assert not torch.equal(other, shuffled)


def test_resume_inside_a_block_reads_only_that_block_again(tmp_path, monkeypatch):
    from tessera.data import loader as loader_mod

    make_data(tmp_path, num_shards=4, tokens_per_shard=900)  # 100 windows per shard
    options = {
        "num_streams": 1,
        "global_batch_size": 2,
        "micro_batch_size": 2,
        "shuffle_buffer": 10,
    }
    straight = take_steps(make_loader(tmp_path, **options), 70)
    opened = []
    original = loader_mod.read_shard
    monkeypatch.setattr(loader_mod, "read_shard", lambda s: opened.append(s.path) or original(s))
    resumed = take_steps(make_loader(tmp_path, start_step=63, **options), 7)
    assert_steps_equal(resumed, straight[63:])
    # window 126 is in block 120-129 of the second shard in stream order: one shard opened
    assert len(opened) == 1


def test_changed_shuffle_buffer_is_refused(tmp_path):
    from tessera.data.format import DataError

    make_data(tmp_path, num_shards=4)
    state = make_loader(tmp_path, shuffle_buffer=4).state_dict(step=3)
    with pytest.raises(DataError, match="shuffle_buffer was 4 in the checkpoint, now 8"):
        make_loader(tmp_path, shuffle_buffer=8, start_step=3).check_resume(state)
    with pytest.raises(DataError, match="cursor is at step 3"):
        make_loader(tmp_path, shuffle_buffer=4, start_step=5).check_resume(state)


def test_windows_do_not_depend_on_the_numpy_global_seed(tmp_path):
    make_data(tmp_path, num_shards=4)
    np.random.seed(1)
    first = take_steps(make_loader(tmp_path), 5)
    np.random.seed(2)
    assert_steps_equal(take_steps(make_loader(tmp_path), 5), first)
