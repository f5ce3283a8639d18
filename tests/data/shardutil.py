"""Helpers for the data tests: small shard sets written on the spot, and loader readouts."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tessera.data.format import (
    Manifest,
    ShardInfo,
    TokenizerInfo,
    encode_tokens,
    write_manifest,
)
from tessera.data.loader import TrainLoader

EOS_ID = 0
SEQ_LEN = 8
WINDOW_TOKENS = SEQ_LEN + 1
VOCAB_SIZE = 1000


def tar_bytes(members: Sequence[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def doc_members(docs: Sequence[np.ndarray], dtype: str) -> list[tuple[str, bytes]]:
    members = []
    for index, doc in enumerate(docs):
        meta = json.dumps({"source": "test", "doc": index}).encode()
        members += [(f"{index:09d}.json", meta), (f"{index:09d}.tokens", encode_tokens(doc, dtype))]
    return members


def write_shards(
    directory: Path,
    shard_docs: Sequence[Sequence[np.ndarray]],
    dtype: str = "uint16",
    vocab_size: int = VOCAB_SIZE,
) -> list[np.ndarray]:
    """Write one shard per entry of `shard_docs` plus the manifest; returns each shard's tokens."""
    directory.mkdir(parents=True, exist_ok=True)
    infos, shard_tokens = [], []
    for index, docs in enumerate(shard_docs):
        name = f"shard-{index:06d}.tar"
        data = tar_bytes(doc_members(docs, dtype))
        (directory / name).write_bytes(data)
        tokens = np.concatenate(docs) if len(docs) else np.empty(0, dtype=np.int64)
        infos.append(
            ShardInfo(
                path=name,
                num_tokens=len(tokens),
                num_samples=len(docs),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
        shard_tokens.append(tokens.astype(np.int64))
    tokenizer = TokenizerInfo(kind="bytes", vocab_size=vocab_size, eos_id=EOS_ID)
    write_manifest(directory, Manifest(tokenizer=tokenizer, dtype=dtype, shards=tuple(infos)))
    return shard_tokens


def random_docs(
    rng: np.random.Generator,
    num_tokens: int,
    max_doc_tokens: int = 30,
    low: int = 1,
    high: int = VOCAB_SIZE,
) -> list:
    """Documents of random lengths (some longer than a window) summing to `num_tokens`."""
    docs = []
    while num_tokens > 0:
        length = min(int(rng.integers(1, max_doc_tokens + 1)), num_tokens)
        doc = rng.integers(low, high, size=length)
        doc[-1] = EOS_ID
        docs.append(doc)
        num_tokens -= length
    return docs


def make_data(
    directory: Path,
    num_shards: int,
    tokens_per_shard: int | None = None,
    seed: int = 0,
    low: int = 1,
    high: int = VOCAB_SIZE,
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [tokens_per_shard or int(rng.integers(40, 160)) for _ in range(num_shards)]
    return write_shards(directory, [random_docs(rng, size, low=low, high=high) for size in sizes])


def make_loader(directory, **overrides) -> TrainLoader:
    kwargs = {
        "seq_len": SEQ_LEN,
        "micro_batch_size": 2,
        "global_batch_size": 8,
        "num_streams": 4,
        "seed": 3,
        "shuffle": True,
    }
    kwargs.update(overrides)
    spec = directory if isinstance(directory, list) else str(directory)
    return TrainLoader(spec, **kwargs)


def take_steps(loader: TrainLoader, num_steps: int) -> list[torch.Tensor]:
    """Per step, the rank's rows as full windows [rows, seq_len + 1]."""
    batches = iter(loader)
    steps = []
    seq_len = loader.seq_len
    for k in range(num_steps):
        rows = []
        for _ in range(loader.micro_batches_at(loader.start_step + k)):
            input_ids, labels = next(batches)
            assert input_ids.dtype == labels.dtype == torch.int64
            assert input_ids.shape == labels.shape == (loader.micro_batch_size, seq_len)
            assert torch.equal(input_ids[:, 1:], labels[:, :-1])
            rows.append(torch.cat([input_ids, labels[:, -1:]], dim=1))
        steps.append(torch.cat(rows))
    return steps


def global_steps(directory, dp_size: int, num_steps: int, **overrides) -> list:
    """Each step's global rows: rank 0's rows, then rank 1's, ..."""
    per_rank = [
        take_steps(make_loader(directory, dp_rank=r, dp_size=dp_size, **overrides), num_steps)
        for r in range(dp_size)
    ]
    return [torch.cat([rank_steps[k] for rank_steps in per_rank]) for k in range(num_steps)]


def assert_steps_equal(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for k, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"step {k} differs"
