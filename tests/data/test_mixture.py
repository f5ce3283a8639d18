"""Mixtures: `data.sources` sampled by weight, deterministically; consumed tokens per source;
a resume with changed weights refused unless data.allow_mixture_change."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from shardutil import SEQ_LEN, assert_steps_equal, make_data, make_loader, take_steps

from tessera.data.format import DataError
from tessera.data.mixture import Schedule
from tessera.data.sources import resolve_data, resolve_sources

# Each source's token ids lie in their own range, so a window tells its source.
RANGES = {"web": (1, 400), "code": (400, 700), "books": (700, 1000)}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    shard_counts = {"web": 8, "code": 4, "books": 2}
    for seed, (name, (low, high)) in enumerate(RANGES.items()):
        make_data(
            root / name,
            num_shards=shard_counts[name],
            tokens_per_shard=300,
            seed=seed,
            low=low,
            high=high,
        )
    return root


def entries(roots, weights: dict[str, float]) -> list[dict]:
    return [{"name": n, "shards": str(roots / n), "weight": w} for n, w in weights.items()]


def source_of(window: torch.Tensor) -> str:
    ids = window[window != 0]  # EOS (0) is shared
    for name, (low, high) in RANGES.items():
        if bool(((ids >= low) & (ids < high)).all()):
            return name
    raise AssertionError(f"window mixes sources: {window}")


def window_sources(steps: list[torch.Tensor]) -> list[str]:
    return [source_of(w) for step in steps for w in step]


def test_proportions_over_10000_windows(roots):
    weights = {"web": 0.6, "code": 0.3, "books": 0.1}
    loader = make_loader(
        resolve_sources(entries(roots, weights)),
        global_batch_size=16,
        micro_batch_size=16,
        num_streams=4,
        shuffle_buffer=8,
    )
    num_steps = 625  # 10,000 windows
    names = window_sources(take_steps(loader, num_steps))
    assert len(names) == 10_000
    for name, weight in weights.items():
        share = names.count(name) / len(names)
        # 3 binomial standard deviations; the schedule keeps far closer than that
        assert abs(share - weight) < 3 * math.sqrt(weight * (1 - weight) / len(names)), name
        assert abs(share - weight) < 0.002, name
    # The consumed-token metric is computed, not counted: it agrees with what came out.
    consumed = loader.consumed_tokens(num_steps)
    assert consumed == {n: names.count(n) * SEQ_LEN for n in weights}
    row = loader.metrics(num_steps)
    assert row["data/tokens/code"] == consumed["code"] and row["data/skipped_samples"] == 0


def test_consumed_tokens_match_every_step_and_dp_size(roots):
    sources = resolve_sources(entries(roots, {"web": 2, "code": 1, "books": 1}))
    steps = take_steps(make_loader(sources, shuffle_buffer=3), 9)
    names = window_sources(steps)
    per_step = len(steps[0])
    for k in range(10):
        expected = {n: names[: k * per_step].count(n) * SEQ_LEN for n in RANGES}
        for dp_size in (1, 2):
            loader = make_loader(sources, shuffle_buffer=3, dp_size=dp_size)
            got = loader.consumed_tokens(k)
            assert {n: got.get(n, 0) for n in RANGES} == expected, (k, dp_size)


def test_schedule_counts_are_closed_form_and_close_to_the_weights():
    schedule = Schedule({"a": 5.0, "b": 3.0, "c": 1.5, "d": 0.5}, [7, 2, 0, 0])
    n = np.arange(0, 50_001)
    counts = schedule.counts(n)
    assert (counts.sum(axis=1) == n).all()
    assert (np.diff(counts, axis=0) >= 0).all()
    expected = np.outer(n, np.array([5.0, 3.0, 1.5, 0.5]) / 10)
    assert np.abs(counts - expected).max() < 2  # one window per tree level at most
    sources = schedule.sources(1000, 500)
    assert (np.bincount(sources, minlength=4) == counts[1500] - counts[1000]).all()


def test_sources_are_drawn_deterministically(roots):
    sources = resolve_sources(entries(roots, {"web": 0.5, "code": 0.5}))
    first = take_steps(make_loader(sources), 10)
    assert_steps_equal(take_steps(make_loader(sources), 10), first)
    # The order of data.sources does not matter.
    reordered = resolve_sources(entries(roots, {"code": 0.5, "web": 0.5}))
    assert_steps_equal(take_steps(make_loader(reordered), 10), first)


def test_changed_weights_are_refused_unless_allowed(roots):
    before = resolve_sources(entries(roots, {"web": 0.8, "code": 0.2}))
    after = resolve_sources(entries(roots, {"web": 0.2, "code": 0.8}))
    state = json.loads(json.dumps(make_loader(before).state_dict(step=10)))
    with pytest.raises(DataError, match="mixture changed.*data.allow_mixture_change=true"):
        make_loader(after, start_step=10).check_resume(state)
    loader = make_loader(after, start_step=10, allow_mixture_change=True)
    loader.check_resume(state)
    assert [s.start_step for s in loader.segments] == [0, 10]
    names = window_sources(take_steps(loader, 100))
    assert 0.75 < names.count("code") / len(names) < 0.85
    # A later checkpoint of the changed run resumes it bitwise (the history is in the cursor).
    changed = take_steps(loader_from(after, state, 10), 30)
    later = json.loads(json.dumps(loader_from(after, state, 10).state_dict(step=25)))
    again = make_loader(after, start_step=25)  # same weights now: no flag needed
    again.check_resume(later)
    assert_steps_equal(take_steps(again, 15), changed[15:])
    # Consumed tokens carry over the change: what was drawn before, plus the new draws.
    before_tokens = make_loader(before).consumed_tokens(10)
    assert loader_from(after, state, 10).consumed_tokens(10) == before_tokens


def loader_from(sources, state, step):
    loader = make_loader(sources, start_step=step, allow_mixture_change=True)
    loader.check_resume(state)
    return loader


def test_adding_a_source_with_allow_mixture_change(roots):
    two = resolve_sources(entries(roots, {"web": 0.5, "code": 0.5}))
    three = resolve_sources(entries(roots, {"web": 0.5, "code": 0.5, "books": 1.0}))
    state = make_loader(two).state_dict(step=5)
    with pytest.raises(DataError, match="mixture changed"):
        make_loader(three, start_step=5).check_resume(state)
    names = window_sources(take_steps(loader_from(three, state, 5), 50))
    assert 0.4 < names.count("books") / len(names) < 0.6


def test_changed_shards_of_a_source_are_refused(roots, tmp_path):
    state = make_loader(resolve_sources(entries(roots, {"web": 1, "code": 1}))).state_dict(3)
    make_data(tmp_path / "other", num_shards=4, seed=9, low=400, high=700)
    moved = [
        {"name": "web", "shards": str(roots / "web"), "weight": 1},
        {"name": "code", "shards": str(tmp_path / "other"), "weight": 1},
    ]
    with pytest.raises(DataError, match="source 'code' changed"):
        make_loader(resolve_sources(moved), start_step=3).check_resume(state)


def test_a_small_source_shares_lanes(roots):
    # books has 2 shards for 4 streams: streams 0 and 2 share lane 0, each taking every other
    # window of it; no window is read twice, none skipped.
    sources = resolve_sources(entries(roots, {"web": 1.0, "books": 3.0}))
    steps = take_steps(make_loader(sources, shuffle_buffer=0, shuffle=False), 12)
    books = [tuple(w.tolist()) for step in steps for w in step if source_of(w) == "books"]
    assert len(books) > 60 and len(set(books)) == len(books)


BAD_SOURCES = [
    ([], "data.sources': must be a non-empty list"),
    ([{"name": "a"}], r"data.sources\[0\].shards"),
    ([{"name": "a", "shards": "x", "weight": -1}], r"data.sources\[0\].weight': must be positive"),
    ([{"name": "a", "shards": "x", "wieght": 1}], "unknown key 'wieght'"),
    ([{"name": "", "shards": "x"}], r"data.sources\[0\].name"),
    (
        [{"name": "a", "shards": "ROOT/web"}, {"name": "a", "shards": "ROOT/code"}],
        r"data.sources\[1\].name': 'a' names two sources",
    ),
    (
        [{"name": "a", "shards": "ROOT/web"}, {"name": "b", "shards": "ROOT/web"}],
        "belongs to two of data.sources",
    ),
    ([{"name": "a", "shards": "ROOT/nothing"}], "nothing: no such shard"),
    ([{"name": "a", "shards": "ROOT/web"}, {"name": "b", "shards": "ROOT/nothing"}],
     r"nothing: no such shard or directory \(data.sources\[1\].shards\)"),
    ([{"name": "a", "shards": "ROOT/none-*.tar"}], r"data.sources\[0\].shards: '.*' matched "
                                                   r"nothing"),
]


@pytest.mark.parametrize(("value", "message"), BAD_SOURCES)
def test_bad_sources_name_the_key(roots, value, message):
    value = json.loads(json.dumps(value).replace("ROOT", str(roots)))
    with pytest.raises(DataError, match=message):
        resolve_sources(value)


def test_shards_and_sources_are_exclusive(roots):
    with pytest.raises(DataError, match="set one, not both"):
        resolve_data(str(roots / "web"), entries(roots, {"web": 1}))
    with pytest.raises(DataError, match="data.shards': not set"):
        resolve_data(None, None)


# -- mixture schedules: a source's weight as [[step, weight], ...] ------------------------------

ANNEAL = {"web": [[0, 1.0], [5, 0.25]], "code": [[0, 0.0], [5, 0.75]]}


def test_a_schedule_switches_its_weights_at_the_step(roots):
    """Only web before step 5, then a quarter web: the windows and the token metric follow."""
    sources = resolve_sources(entries(roots, ANNEAL))
    loader = make_loader(sources, global_batch_size=16, micro_batch_size=16)
    steps = take_steps(loader, 45)
    before, after = window_sources(steps[:5]), window_sources(steps[5:])
    assert set(before) == {"web"}
    assert abs(after.count("code") / len(after) - 0.75) < 0.02
    assert [s.start_step for s in loader.segments] == [0, 5]
    rows = {step: make_loader(sources, global_batch_size=16, micro_batch_size=16).metrics(step)
            for step in (5, 6, 45)}
    assert rows[5]["data/tokens/code"] == 0 and rows[6]["data/tokens/code"] > 0
    assert rows[45]["data/tokens/code"] == after.count("code") * SEQ_LEN


@pytest.mark.parametrize("step", [3, 5, 7])
@pytest.mark.parametrize("dp_size", [1, 2])
def test_a_schedule_resumes_exactly_at_any_step_and_dp_size(roots, step, dp_size):
    """Resumed before, at and after the switch, at the saved or another data-parallel size:
    the global batches of the straight run (closed form per segment, no replay)."""
    sources = resolve_sources(entries(roots, ANNEAL))
    straight = take_steps(make_loader(sources, shuffle_buffer=3), 12)
    state = json.loads(json.dumps(make_loader(sources, shuffle_buffer=3).state_dict(step)))
    ranks = []
    for rank in range(dp_size):
        loader = make_loader(sources, shuffle_buffer=3, start_step=step, dp_rank=rank,
                             dp_size=dp_size)
        loader.check_resume(state)
        ranks.append(take_steps(loader, 12 - step))
    resumed = [torch.cat([r[k] for r in ranks]) for k in range(12 - step)]
    assert_steps_equal(resumed, straight[step:])


def test_a_changed_schedule_is_refused_unless_allowed(roots):
    sources = resolve_sources(entries(roots, ANNEAL))
    moved = resolve_sources(entries(roots, {"web": [[0, 1.0], [8, 0.25]],
                                            "code": [[0, 0.0], [8, 0.75]]}))
    state = json.loads(json.dumps(make_loader(sources).state_dict(3)))
    with pytest.raises(DataError, match=r"mixture changed \(weights \{0: .*, 5: .*\} in the "
                                        r"checkpoint, now \{0: .*, 8: .*data.allow_mix"):
        make_loader(moved, start_step=3).check_resume(state)
    loader = loader_from(moved, state, 3)
    assert set(window_sources(take_steps(loader, 5))) == {"web"}  # the new plan: web to step 8


@pytest.mark.parametrize("weight, words", [
    ([[0, 1.0], [5, 0.5], [5, 0.2]], "schedule steps must increase, got 5 after 5"),
    ([[0, 1.0], [5, -0.5]], "must be positive, got -0.5"),
    ([[2, 1.0]], "a schedule starts at step 0"),
    ([[0, 1.0], [5]], "a list of [step, weight] pairs, got [5]"),
])
def test_bad_schedules_are_named(roots, weight, words):
    with pytest.raises(DataError, match=r"data.sources\[0\].weight") as error:
        resolve_sources(entries(roots, {"web": weight, "code": 1.0}))
    assert words in str(error.value)


def test_a_segment_with_every_weight_zero_is_refused(roots):
    with pytest.raises(DataError, match="from step 5 every weight is 0"):
        resolve_sources(entries(roots, {"web": [[0, 1.0], [5, 0.0]], "code": [[0, 0.0]]}))
