"""Batch-size ramp-up (train.batch_size_ramp): the global batch of each step follows Megatron's
rule, in closed form; the loader gives each step its batch and resumes mid-ramp exactly, at the
same or another data-parallel size."""

from __future__ import annotations

import json

import pytest
import torch
from shardutil import SEQ_LEN, assert_steps_equal, make_data, make_loader, take_steps

from tessera.data.format import DataError
from tessera.data.ramp import BatchSizes


@pytest.mark.parametrize("final, start, increment, samples", [
    (16, 4, 4, 40), (64, 8, 8, 1000), (12, 4, 4, 0), (32, 2, 2, 77)])
def test_each_step_has_megatrons_batch(final, start, increment, samples):
    sizes = BatchSizes(final, start, increment, samples)
    increments = (final - start) // increment
    consumed = 0
    for step in range(400):
        index = min(increments, consumed * increments // samples) if samples else increments
        assert sizes.batch_at(step) == start + index * increment, step
        assert sizes.samples_before(step) == consumed, step
        consumed += sizes.batch_at(step)
    assert sizes.sizes()[-1] == final and sizes.batch_at(10**9) == final


RAMP = BatchSizes(16, 4, 4, 48)  # 4 x 3, 8 x 2, 12 x 1 ... then 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ramp")
    make_data(root, num_shards=4, tokens_per_shard=2000, seed=1)
    return root


def test_the_loader_gives_each_step_its_batch(shards):
    loader = make_loader(shards, global_batch_size=16, micro_batch_size=4, batch_sizes=RAMP)
    steps = take_steps(loader, 10)
    assert [len(s) for s in steps] == [RAMP.batch_at(k) for k in range(10)]
    assert loader.consumed_tokens(10) == {"default": RAMP.samples_before(10) * SEQ_LEN}
    # the windows are those a constant batch of 4 (one per stream) reads over as many samples:
    # each stream's sequence of windows does not depend on the batch
    flat = make_loader(shards, global_batch_size=4, micro_batch_size=4, num_streams=4)
    windows = torch.cat(take_steps(flat, RAMP.samples_before(10) // 4))
    assert sorted(map(tuple, torch.cat(steps).tolist())) == sorted(map(tuple, windows.tolist()))


@pytest.mark.parametrize("step", [2, 3, 5, 8])
@pytest.mark.parametrize("dp_size", [1, 2])
def test_a_ramp_resumes_exactly_at_any_step_and_dp_size(shards, step, dp_size):
    common = dict(global_batch_size=16, micro_batch_size=2, batch_sizes=RAMP, shuffle_buffer=3)
    straight = take_steps(make_loader(shards, **common), 10)
    state = json.loads(json.dumps(make_loader(shards, **common).state_dict(step)))
    ranks = []
    for rank in range(dp_size):
        loader = make_loader(shards, **common, start_step=step, dp_rank=rank, dp_size=dp_size)
        loader.check_resume(state)
        ranks.append(take_steps(loader, 10 - step))
    assert_steps_equal([torch.cat([r[k] for r in ranks]) for k in range(10 - step)],
                       straight[step:])


def test_a_changed_ramp_is_refused(shards):
    common = dict(global_batch_size=16, micro_batch_size=4)
    state = make_loader(shards, **common, batch_sizes=RAMP).state_dict(3)
    other = BatchSizes(16, 4, 4, 96)
    with pytest.raises(DataError, match="train.batch_size_ramp was .*'samples': 48.* now "
                                        ".*'samples': 96"):
        make_loader(shards, **common, batch_sizes=other, start_step=3).check_resume(state)
