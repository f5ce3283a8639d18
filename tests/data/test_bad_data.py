"""Bad data: corrupt tar members, truncated and empty shards, samples of the wrong dtype or shape
are skipped with a warning naming shard and member, counted, and replaced by EOS so that every
later position (and so exact resume) is unchanged. A missing shard, too many bad samples in a
row, or a whole epoch of a stream's shards without one readable sample, stops the run with one
clear error, on every rank."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from multiproc import run_ranks
from shardutil import (
    EOS_ID,
    VOCAB_SIZE,
    assert_steps_equal,
    doc_members,
    make_data,
    make_loader,
    random_docs,
    take_steps,
    tar_bytes,
)

from tessera.data.format import (
    DataError,
    Manifest,
    ShardInfo,
    TokenizerInfo,
    encode_tokens,
    read_manifest,
    write_manifest,
)

Damage = Callable[[bytes], bytes]


def member_offset(data: bytes, name: str) -> tuple[int, int]:
    """(header offset, data offset) of member `name` in tar bytes."""
    import io

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        info = tar.getmember(name)
        return info.offset, info.offset_data


def write_damaged(
    directory: Path,
    shard_docs: list[list[np.ndarray]],
    damage: dict[int, Damage],
    extra_members: dict[int, list] | None = None,
) -> list[np.ndarray]:
    """Shards whose manifest was written from the clean data; then `damage[i]` rewrites shard i.
    Returns each shard's clean documents' tokens."""
    directory.mkdir(parents=True, exist_ok=True)
    infos, clean = [], []
    for index, docs in enumerate(shard_docs):
        members = doc_members(docs, "uint16") + (extra_members or {}).get(index, [])
        data = tar_bytes(members)
        tokens = np.concatenate(docs)
        extra = len((extra_members or {}).get(index, []))
        infos.append(
            ShardInfo(
                f"shard-{index:06d}.tar",
                len(tokens),
                len(docs) + extra,
                hashlib.sha256(data).hexdigest(),
            )
        )
        if index in damage:
            data = damage[index](data)
        (directory / infos[-1].path).write_bytes(data)
        clean.append(tokens.astype(np.int64))
    tokenizer = TokenizerInfo(kind="bytes", vocab_size=VOCAB_SIZE, eos_id=EOS_ID)
    write_manifest(directory, Manifest(tokenizer, "uint16", tuple(infos)))
    return clean


def stream_tokens(directory: Path, num_tokens: int, **options) -> tuple[np.ndarray, int]:
    """The first tokens of a single unshuffled stream (shards in order), and the skip count."""
    loader = make_loader(
        directory,
        num_streams=1,
        global_batch_size=1,
        micro_batch_size=1,
        shuffle=False,
        shuffle_buffer=0,
        **options,
    )
    windows = take_steps(loader, num_tokens // 9)
    return torch.cat(windows).flatten().numpy(), loader.skipped_samples


def docs_for(seed: int, count: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB_SIZE, size=int(rng.integers(5, 25))) for _ in range(count)]


def expected_stream(shards: list[list[np.ndarray]], lost: dict[int, set[int]]) -> np.ndarray:
    """Each shard's documents without the lost ones, then EOS filler up to its clean size."""
    parts = []
    for index, docs in enumerate(shards):
        kept = [d for i, d in enumerate(docs) if i not in lost.get(index, set())]
        size = sum(len(d) for d in docs)
        body = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
        parts += [body, np.full(size - len(body), EOS_ID)]
    return np.concatenate(parts)


def corrupt_header(name: str) -> Damage:
    def damage(data: bytes) -> bytes:
        header, _ = member_offset(data, name)
        out = bytearray(data)
        out[header + 3] ^= 0xFF  # the name: the header checksum no longer matches
        return bytes(out)

    return damage


def truncate_in(name: str) -> Damage:
    def damage(data: bytes) -> bytes:
        _, start = member_offset(data, name)
        return data[: start + 3]

    return damage


def check_case(tmp_path, caplog, damage, lost, expected_in_warnings, skipped, extra=None):
    shards = [docs_for(1), docs_for(2), docs_for(3), docs_for(4)]
    write_damaged(tmp_path, shards, damage, extra)
    total = sum(len(d) for docs in shards for d in docs)  # the last shard is read past all damage
    caplog.set_level(logging.WARNING, logger="tessera.data")
    got, num_skipped = stream_tokens(tmp_path, total - total % 9)
    expected = expected_stream(shards, lost)[: len(got)]
    np.testing.assert_array_equal(got, expected)
    assert num_skipped == skipped
    for text in expected_in_warnings:
        assert any(text in r.getMessage() for r in caplog.records), (text, caplog.text)


def test_corrupt_tar_member_is_skipped(tmp_path, caplog):
    check_case(
        tmp_path,
        caplog,
        {1: corrupt_header("000000002.tokens")},
        {1: {2}},
        [
            "shard-000001.tar: corrupt tar data after member 000000001.tokens",
            "shard-000001.tar: 1 of 6 samples missing",
        ],
        skipped=1,
    )


def test_truncated_shard_keeps_its_good_samples(tmp_path, caplog):
    check_case(
        tmp_path,
        caplog,
        {0: truncate_in("000000004.tokens")},
        {0: {4, 5}},
        [
            "shard-000000.tar: truncated in member 000000004.tokens",
            "shard-000000.tar: 2 of 6 samples missing",
        ],
        skipped=2,
    )


def test_empty_shard_file_is_skipped(tmp_path, caplog):
    check_case(
        tmp_path,
        caplog,
        {1: lambda data: b""},
        {1: set(range(6))},
        ["shard-000001.tar: empty file", "shard-000001.tar: 6 of 6 samples missing"],
        skipped=6,
    )


def test_samples_of_wrong_dtype_or_shape_are_skipped(tmp_path, caplog):
    bad = {
        2: [
            ("000000006.tokens", b"\x01\x02\x03"),  # 3 bytes: not whole uint16 tokens
            ("000000007.tokens", encode_tokens(np.array([5, 70000]), "uint32")),  # id 70000
            ("000000008.tokens", b""),
        ]
    }  # empty
    check_case(
        tmp_path,
        caplog,
        {},
        {},
        [
            "shard-000002.tar: member 000000006.tokens: 3 bytes is not a whole number of uint16",
            "shard-000002.tar: member 000000007.tokens: token id 4464 >= vocab size 1000",
            "shard-000002.tar: member 000000008.tokens: empty sample",
        ],
        skipped=3,
        extra=bad,
    )


def test_a_shard_whose_sha256_differs_without_visible_damage_is_skipped_whole(tmp_path, caplog):
    """A lying checksum (or a shard swapped for another valid one): every sample of it is
    skipped, counted and replaced by EOS; the other shards are read as they are."""
    shards = [docs_for(1), docs_for(2), docs_for(3), docs_for(4)]
    write_damaged(tmp_path, shards, {})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    total = sum(len(d) for docs in shards for d in docs)
    caplog.set_level(logging.WARNING, logger="tessera.data")
    got, num_skipped = stream_tokens(tmp_path, total - total % 9)
    np.testing.assert_array_equal(got, expected_stream(shards, {1: set(range(6))})[: len(got)])
    assert num_skipped == 6
    assert "shard-000001.tar: sha256 differs from its manifest and no damage explains it" in \
        caplog.text


def test_a_member_larger_than_its_shard_is_skipped_unread(tmp_path, caplog):
    """A member whose header declares more bytes than the manifest lists for the whole shard
    (a gzip bomb's shape) is skipped before it is decompressed into memory."""
    huge = {2: [("000000006.tokens", bytes(20_000))]}  # 10,000 tokens; the shard lists ~100
    check_case(
        tmp_path, caplog, {}, {},
        ["shard-000002.tar: member 000000006.tokens declares 20000 bytes, more than the"],
        skipped=1, extra=huge,
    )


class _Zeros(io.RawIOBase):
    """`size` zero bytes, made as they are read (a member of gigabytes costs no memory)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


def write_gzip_bomb(directory: Path, member_bytes: int) -> None:
    """One gzip shard of a few MB holding one member of `member_bytes` zeros; its manifest (of
    the attacker's making) lists it with its true sha256 and 100 tokens."""
    directory.mkdir(parents=True)
    path = directory / "shard-000000.tar"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("000000000.tokens")
        info.size = member_bytes
        tar.addfile(info, io.BufferedReader(_Zeros(member_bytes)))
    shard = ShardInfo(path.name, 100, 1, hashlib.sha256(path.read_bytes()).hexdigest())
    tokenizer = TokenizerInfo(kind="bytes", vocab_size=VOCAB_SIZE, eos_id=EOS_ID)
    write_manifest(directory, Manifest(tokenizer, "uint16", (shard,)))


PEAK_RSS_AFTER_READING = """
import resource, sys
from tessera.data.reader import read_shard
from tessera.data.sources import resolve_shards
for shard in resolve_shards(sys.argv[1]):
    for item in read_shard(shard):
        pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_a_gzip_bomb_does_not_raise_memory(tmp_path):
    """512 MiB of zeros in a 0.5 MB shard: reading it peaks below twice what a normal shard
    costs the same process (reading the member whole took 3.4 GB for a 1.5 GB member)."""
    import subprocess
    import sys

    write_gzip_bomb(tmp_path / "bomb", 512 * 2**20)
    make_data(tmp_path / "normal", num_shards=1)
    peaks = {}
    for name in ("normal", "bomb"):
        done = subprocess.run([sys.executable, "-c", PEAK_RSS_AFTER_READING, str(tmp_path / name)],
                              capture_output=True, text=True, check=True)
        peaks[name] = int(done.stdout.split()[-1])
    assert (tmp_path / "bomb" / "shard-000000.tar").stat().st_size < 2**20 * 4
    assert peaks["bomb"] < 2 * peaks["normal"], peaks


NOTHING_READABLE = {
    "empty file": lambda data: b"",
    "not a tar file": lambda data: b"not a tar file " * 100,
    "every sample bad": lambda data: tar_bytes([(f"{i:09d}.tokens", b"\x01") for i in range(6)]),
    "replaced": lambda data: tar_bytes(doc_members(docs_for(9), "uint16")),
}


@pytest.mark.parametrize("damage", NOTHING_READABLE.values(), ids=NOTHING_READABLE.keys())
def test_an_only_shard_without_one_readable_sample_stops_at_the_first_step(tmp_path, damage):
    """Skipping it would train on EOS filler alone (with warnings, and rc 0)."""
    write_damaged(tmp_path, [docs_for(1)], {0: damage})
    with pytest.raises(DataError) as caught:
        stream_tokens(tmp_path, 9)
    assert str(caught.value).startswith(
        f"{tmp_path}/shard-000000.tar: not one readable sample (empty or not a tar file, or every "
        f"sample bad; `tessera prepare --verify` names the damage): training would see EOS filler "
        f"only; stopping"
    )


def test_an_epoch_of_shards_without_one_readable_sample_stops_the_run(tmp_path):
    empty = {i: NOTHING_READABLE["empty file"] for i in range(3)}
    write_damaged(tmp_path, [docs_for(1), docs_for(2), docs_for(3)], empty)
    loader = make_loader(tmp_path, num_streams=1, global_batch_size=1, micro_batch_size=1)
    with pytest.raises(DataError, match=r"shard-00000\d.tar and the 2 other shards a data stream "
                                        r"reads with it: not one readable sample"):
        next(loader.steps())


def test_a_shard_listed_empty_in_its_manifest_is_skipped(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="tessera.data")
    rng = np.random.default_rng(0)
    from shardutil import write_shards

    write_shards(tmp_path, [random_docs(rng, 90), [], random_docs(rng, 90)])
    loader = make_loader(tmp_path, num_streams=2, global_batch_size=2)
    assert [Path(s.path).name for s in loader.shards] == ["shard-000000.tar", "shard-000002.tar"]
    assert "shard-000001.tar: empty shard (no tokens); skipped" in caplog.text
    take_steps(loader, 5)


def test_too_many_bad_samples_in_a_row_stop_the_run(tmp_path):
    bad = {0: [(f"{i:09d}.tokens", b"\x01") for i in range(6, 11)]}  # 5 bad in a row
    write_damaged(tmp_path, [docs_for(1), docs_for(2)], {}, bad)
    stream_tokens(tmp_path, 90, max_consecutive_errors=5)  # 5 is not more than 5
    with pytest.raises(
        DataError,
        match=r"shard-000000.tar: member 000000010.tokens: 1 bytes .*"
        r"more than 4 bad samples in a row",
    ):
        stream_tokens(tmp_path, 90, max_consecutive_errors=4)


def test_a_shard_changed_after_prepare_is_an_error(tmp_path):
    write_damaged(tmp_path, [docs_for(1), docs_for(2)], {})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["num_tokens"] += 5  # undamaged, yet 5 tokens short
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="shard-000000.tar: holds .* tokens but its manifest"):
        stream_tokens(tmp_path, 90)


def test_resume_over_damaged_data_is_exact(tmp_path):
    shards = [docs_for(i) for i in range(4)]
    damage = {1: corrupt_header("000000003.tokens"), 2: truncate_in("000000001.tokens")}
    write_damaged(tmp_path, shards, damage)
    options = {"num_streams": 2, "global_batch_size": 4, "micro_batch_size": 2, "shuffle_buffer": 3}
    straight_loader = make_loader(tmp_path, **options)
    straight = take_steps(straight_loader, 24)
    assert straight_loader.skipped_samples >= 6  # 1 + 5 lost in each epoch read
    for start in (3, 7, 11):
        ahead = make_loader(tmp_path, **options)
        take_steps(ahead, start)
        state = ahead.state_dict(start)
        resumed = make_loader(tmp_path, start_step=start, **options)
        resumed.check_resume(state)
        assert_steps_equal(take_steps(resumed, 24 - start), straight[start:])
        assert resumed.skipped_samples == straight_loader.skipped_samples, start


def test_missing_shard_is_an_error(tmp_path):
    make_data(tmp_path, num_shards=2)
    (tmp_path / "shard-000001.tar").unlink()
    with pytest.raises(
        DataError, match="shard-000001.tar: shard listed in its manifest is missing"
    ):
        make_loader(tmp_path, num_streams=2)


def test_missing_shard_behind_a_url_stops_steps(tmp_path):
    make_data(tmp_path, num_shards=2)
    loader = make_loader(f"pipe:cat {tmp_path}/manifest.json", num_streams=2)
    (tmp_path / "shard-000001.tar").unlink()
    with pytest.raises(DataError, match="shard-000001.tar.*missing"):
        next(loader.steps())


def _steps_until_error(shards_url: str) -> str:
    from tessera.data.loader import TrainLoader

    loader = TrainLoader(
        shards_url,
        seq_len=8,
        micro_batch_size=2,
        global_batch_size=8,
        num_streams=4,
        shuffle=False,
        dp_rank=__import__("torch").distributed.get_rank(),
        dp_size=2,
    )
    steps = loader.steps()
    try:
        for _ in range(3):
            next(steps)
    except DataError as e:
        return str(e)
    return "no error"


def test_an_error_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1's stream 3 cannot read its shard; rank 0's data is fine: both stop, same error."""
    make_data(tmp_path, num_shards=4, tokens_per_shard=200)
    url = f"pipe:cat {tmp_path}/manifest.json"
    read_manifest(tmp_path)  # resolved by each rank before the shard goes
    (tmp_path / "shard-000003.tar").write_bytes(b"")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][3]["num_samples"] = 500  # an empty file losing 500 samples: too many
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    errors = run_ranks(2, _steps_until_error, url, timeout_s=120)
    assert errors[0] == errors[1]
    assert errors[0].startswith("rank 1: ") and "shard-000003.tar" in errors[0]
