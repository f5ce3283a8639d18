import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from shardutil import (
    SEQ_LEN,
    WINDOW_TOKENS,
    assert_steps_equal,
    global_steps,
    make_data,
    make_loader,
    random_docs,
    take_steps,
    write_shards,
)

from tessera.data import loader as loader_mod
from tessera.data.format import DataError
from tessera.data.loader import default_num_streams, resolve_shards


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The shard files read (in the main process, so with num_workers=0)."""
    paths: list[str] = []
    original = loader_mod.read_shard

    def recording(shard):
        paths.append(Path(shard.path).name)
        return original(shard)

    monkeypatch.setattr(loader_mod, "read_shard", recording)
    return paths


def test_single_stream_reproduces_tokens_in_order(tmp_path):
    shard_tokens = make_data(tmp_path, num_shards=3)
    all_tokens = np.concatenate(shard_tokens)
    num_windows = len(all_tokens) // WINDOW_TOKENS
    loader = make_loader(
        tmp_path, num_streams=1, global_batch_size=1, micro_batch_size=1, shuffle=False
    )
    windows = torch.cat(take_steps(loader, num_windows))
    assert windows.shape == (num_windows, WINDOW_TOKENS)
    expected = all_tokens[: num_windows * WINDOW_TOKENS]
    assert np.array_equal(windows.flatten().numpy(), expected)


@pytest.mark.parametrize("dp_size", [2, 4])
def test_ranks_read_disjoint_shards_covering_all(tmp_path, opened, dp_size):
    # 8 equal shards, 4 streams: each stream reads 2 shards (2 * 200 tokens) per epoch.
    make_data(tmp_path, num_shards=8, tokens_per_shard=200)
    num_steps = 15  # 15 * 2 rows * 9 tokens = 270 tokens per stream: past shard 1, in epoch 0
    per_rank = []
    for rank in range(dp_size):
        opened.clear()
        take_steps(make_loader(tmp_path, dp_rank=rank, dp_size=dp_size), num_steps)
        per_rank.append(set(opened))
        assert len(opened) == len(set(opened))  # no shard read twice in one epoch
    assert sum(len(s) for s in per_rank) == 8
    assert set().union(*per_rank) == {f"shard-{i:06d}.tar" for i in range(8)}


@pytest.mark.parametrize("dp_size", [2, 4])
def test_global_batch_independent_of_dp_size(tmp_path, dp_size):
    make_data(tmp_path, num_shards=8)  # ~100 tokens/shard: streams wrap epochs within 20 steps
    expected = global_steps(tmp_path, dp_size=1, num_steps=20)
    assert_steps_equal(global_steps(tmp_path, dp_size=dp_size, num_steps=20), expected)


def test_num_workers_bitwise_identical(tmp_path):
    make_data(tmp_path, num_shards=8)
    kwargs = {"dp_rank": 1, "dp_size": 2, "micro_batch_size": 1}
    expected = take_steps(make_loader(tmp_path, num_workers=0, **kwargs), 20)
    assert_steps_equal(take_steps(make_loader(tmp_path, num_workers=2, **kwargs), 20), expected)


def test_epochs_reshuffle_shards(tmp_path):
    make_data(tmp_path, num_shards=8, tokens_per_shard=180)
    steps = take_steps(make_loader(tmp_path, num_streams=1, global_batch_size=2), 160)
    windows = torch.cat(steps).flatten().numpy()
    epoch_tokens = 8 * 180
    assert not np.array_equal(windows[:epoch_tokens], windows[epoch_tokens : 2 * epoch_tokens])
    assert np.array_equal(np.sort(windows[:epoch_tokens]), np.sort(windows[epoch_tokens:][:1440]))


# 8 equal shards of 216 tokens, 4 streams, 2 rows per stream and step: a step reads 18 tokens
# per stream, so shard boundaries fall at steps 12, 24 (the end of epoch 0), 36, ...
RESUME_CASES = {"inside_shard": 5, "shard_boundary": 12, "after_epoch_wrap": 30}


@pytest.mark.parametrize("start_step", RESUME_CASES.values(), ids=RESUME_CASES.keys())
def test_resume_matches_uninterrupted(tmp_path, opened, start_step):
    make_data(tmp_path, num_shards=8, tokens_per_shard=216)
    uninterrupted = take_steps(make_loader(tmp_path, shuffle_buffer=0), start_step + 6)
    opened.clear()
    resumed = take_steps(make_loader(tmp_path, start_step=start_step, shuffle_buffer=0), 6)
    assert_steps_equal(resumed, uninterrupted[start_step:])
    # Fast-forward reads no earlier shard: each stream opened only the shard it resumes in.
    assert len(opened) == 4


@pytest.mark.parametrize("resume_dp_size", [1, 4])
def test_resume_with_other_dp_size(tmp_path, resume_dp_size):
    make_data(tmp_path, num_shards=8)
    start_step = 13
    uninterrupted = global_steps(tmp_path, dp_size=2, num_steps=start_step + 5)
    resumed = global_steps(tmp_path, dp_size=resume_dp_size, num_steps=5, start_step=start_step)
    assert_steps_equal(resumed, uninterrupted[start_step:])


def test_state_dict_and_check_resume(tmp_path):
    make_data(tmp_path, num_shards=8)
    state = make_loader(tmp_path, dp_size=2).state_dict(step=7)
    assert state["step"] == 7
    json.dumps(state)  # plain values
    # The data-parallel size and the workers may change.
    make_loader(tmp_path, dp_size=4, num_workers=1, start_step=7).check_resume(state)
    changes = {
        "num_streams": {"num_streams": 8},
        "seq_len": {"seq_len": SEQ_LEN + 1},
        "global_batch_size": {"global_batch_size": 16},
        "seed": {"seed": 4},
        "shuffle": {"shuffle": False},
    }
    for field, override in changes.items():
        with pytest.raises(DataError, match=field):
            make_loader(tmp_path, start_step=7, **override).check_resume(state)
    other = tmp_path / "other"
    make_data(other, num_shards=8, seed=1)
    with pytest.raises(DataError, match="shards_fingerprint"):
        make_loader(other, start_step=7).check_resume(state)


def test_fingerprint_survives_moving_the_data(tmp_path):
    make_data(tmp_path / "a", num_shards=8)
    state = make_loader(tmp_path / "a").state_dict(step=0)
    shutil.move(tmp_path / "a", tmp_path / "b")
    make_loader(tmp_path / "b").check_resume(state)


def test_resolve_shards_specs(tmp_path):
    make_data(tmp_path / "a", num_shards=4)
    make_data(tmp_path / "b", num_shards=2, seed=1)
    by_dir = resolve_shards(tmp_path / "a")
    assert [Path(s.path).name for s in by_dir] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert all(s.dtype == "uint16" and s.num_tokens > 0 for s in by_dir)
    assert resolve_shards(str(tmp_path / "a" / "shard-{000000..000003}.tar")) == by_dir
    assert resolve_shards(str(tmp_path / "a" / "*.tar")) == by_dir
    both = resolve_shards([str(tmp_path / "a"), str(tmp_path / "b" / "shard-00000[01].tar")])
    assert len(both) == 6 and both[:4] == by_dir
    assert resolve_shards(str(tmp_path / "[ab]")) == both


def test_resolve_shards_errors(tmp_path):
    make_data(tmp_path / "a", num_shards=2)
    with pytest.raises(DataError, match="matched nothing"):
        resolve_shards(str(tmp_path / "a" / "*.tgz"))
    with pytest.raises(DataError, match="shard-000002.tar"):
        resolve_shards(str(tmp_path / "a" / "shard-{000000..000002}.tar"))
    shutil.copy(tmp_path / "a" / "shard-000000.tar", tmp_path / "a" / "extra.tar")
    with pytest.raises(DataError, match="extra.tar.*not listed"):
        resolve_shards(str(tmp_path / "a" / "*.tar"))
    (tmp_path / "a" / "shard-000001.tar").unlink()
    with pytest.raises(DataError, match="shard-000001.tar.*missing"):
        resolve_shards(tmp_path / "a")
    with pytest.raises(DataError, match="nothing-here: no such shard"):
        resolve_shards(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*no manifest"):
        resolve_shards(tmp_path / "empty")
    with pytest.raises(DataError, match="twice"):
        resolve_shards([tmp_path / "a" / "shard-000000.tar"] * 2)

    rng = np.random.default_rng(0)
    write_shards(tmp_path / "u16", [random_docs(rng, 50)], dtype="uint16")
    write_shards(tmp_path / "u32", [random_docs(rng, 50)], dtype="uint32", vocab_size=1000)
    write_shards(tmp_path / "v2000", [random_docs(rng, 50)], vocab_size=2000)
    with pytest.raises(DataError, match="u32.*dtype"):
        resolve_shards([tmp_path / "u16", tmp_path / "u32"])
    with pytest.raises(DataError, match="v2000.*tokenizer"):
        resolve_shards([tmp_path / "u16", tmp_path / "v2000"])


def test_manifest_token_count_is_checked(tmp_path):
    make_data(tmp_path, num_shards=1, tokens_per_shard=50)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["num_tokens"] = 60
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    loader = make_loader(tmp_path, num_streams=1, global_batch_size=1, micro_batch_size=1)
    with pytest.raises(DataError, match="shard-000000.tar.*50 tokens.*60"):
        take_steps(loader, 10)


def test_layout_errors_name_the_key(tmp_path):
    make_data(tmp_path, num_shards=8)
    with pytest.raises(DataError, match="data.streams 3 must divide global_batch_size"):
        make_loader(tmp_path, num_streams=3)
    with pytest.raises(DataError, match="data.streams 2 must be a multiple of the data-parallel"):
        make_loader(tmp_path, num_streams=2, dp_size=4)
    with pytest.raises(DataError, match="data.num_workers 3"):
        make_loader(tmp_path, num_workers=3)
    with pytest.raises(DataError, match="micro_batch_size 3"):
        make_loader(tmp_path, micro_batch_size=3)
    with pytest.raises(DataError, match="dp_rank"):
        make_loader(tmp_path, dp_rank=2, dp_size=2)


def test_default_num_streams(tmp_path):
    assert default_num_streams(num_shards=8, global_batch_size=8, dp_size=2) == 8
    assert default_num_streams(num_shards=7, global_batch_size=8, dp_size=2) == 8
    assert default_num_streams(num_shards=100, global_batch_size=48, dp_size=4) == 48
    assert default_num_streams(num_shards=10, global_batch_size=48, dp_size=4) == 8
    # fewer shards than ranks: the fewest streams that fit (they share the shards)
    # fewer shards: at least 8 streams where the batch allows, for a resume at dp 1, 2, 4 or 8
    assert default_num_streams(num_shards=1, global_batch_size=8, dp_size=4) == 8
    assert default_num_streams(num_shards=3, global_batch_size=16, dp_size=4) == 8
    assert default_num_streams(num_shards=1, global_batch_size=8, dp_size=1) == 8
    assert default_num_streams(num_shards=1, global_batch_size=4, dp_size=1) == 4
    assert default_num_streams(num_shards=1, global_batch_size=24, dp_size=3) == 12
    with pytest.raises(DataError, match="data-parallel size 3 does not divide"):
        default_num_streams(num_shards=3, global_batch_size=8, dp_size=3)
    make_data(tmp_path, num_shards=6)
    loader = make_loader(tmp_path, num_streams=None, dp_size=2)
    assert loader.num_streams == 8 and loader.micro_batches_per_step == 2


# One shard (what `prepare` writes for a small corpus at the default shard size): the streams
# share it, each reading it whole and keeping its own windows.
@pytest.mark.parametrize("dp_size", [2, 4])
def test_one_shard_feeds_any_data_parallel_size(tmp_path, dp_size):
    make_data(tmp_path, num_shards=1, tokens_per_shard=900)
    streams = default_num_streams(num_shards=1, global_batch_size=8, dp_size=dp_size)
    assert streams == 8
    overrides = {"num_streams": streams, "shuffle_buffer": 0}
    expected = global_steps(tmp_path, dp_size=1, num_steps=12, **overrides)
    got = global_steps(tmp_path, dp_size=dp_size, num_steps=12, **overrides)
    assert_steps_equal(got, expected)
    rows = torch.cat(got)  # the streams do not repeat each other's windows within an epoch
    assert len({tuple(row.tolist()) for row in rows[:24]}) == 24


@pytest.mark.parametrize("start_dp, resume_dp", [(4, 2), (2, 4)])
def test_one_shard_resumes_exactly_at_another_data_parallel_size(tmp_path, start_dp, resume_dp):
    make_data(tmp_path, num_shards=1, tokens_per_shard=900)
    start_step, overrides = 7, {"num_streams": 4, "shuffle_buffer": 0}
    uninterrupted = global_steps(tmp_path, dp_size=start_dp, num_steps=start_step + 5, **overrides)
    resumed = global_steps(tmp_path, dp_size=resume_dp, num_steps=5, start_step=start_step,
                           **overrides)
    assert_steps_equal(resumed, uninterrupted[start_step:])


UNCAUGHT_ERROR_WITH_WORKERS = """
import sys
sys.path.insert(0, sys.argv[2])
from shardutil import make_loader
batches = iter(make_loader(sys.argv[1], num_workers=1))
next(batches)
raise RuntimeError("an error nobody catches, the loader open")
"""


def test_an_uncaught_error_with_loader_workers_ends_the_process(tmp_path):
    """Workers ignore SIGTERM (a preemption's signal is the trainer's): the exit of a trainer
    whose loader is still open must not wait on them forever."""
    import subprocess
    import sys

    make_data(tmp_path, num_shards=4)
    tests = Path(__file__).parent
    done = subprocess.run([sys.executable, "-c", UNCAUGHT_ERROR_WITH_WORKERS, str(tmp_path),
                           str(tests)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().endswith("an error nobody catches, the loader open"), done.stderr
