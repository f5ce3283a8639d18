"""Shared fixtures: a small prepared dataset, made on the spot (nothing is downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from textdata import make_text_files


@pytest.fixture(scope="session")
def byte_shards(tmp_path_factory) -> Path:
    """About 40k byte-level tokens in 8 shards, prepared by `tessera prepare`'s own code."""
    from tessera.data.prepare import prepare

    root = tmp_path_factory.mktemp("byte-shards")
    files = make_text_files(root / "text", num_files=8, sentences_per_file=60)
    output = root / "prepared"
    prepare([str(p) for p in files], str(output), shard_bytes=10_000, log=lambda _: None)
    return output


@pytest.fixture(scope="session")
def one_shard(tmp_path_factory) -> Path:
    """A small corpus as `prepare` writes it at the default shard size: one shard."""
    from tessera.data.prepare import prepare

    root = tmp_path_factory.mktemp("one-shard")
    files = make_text_files(root / "text", num_files=4, sentences_per_file=40)
    prepare([str(p) for p in files], str(root / "prepared"), log=lambda _: None)
    assert len(json.loads((root / "prepared" / "manifest.json").read_text())["shards"]) == 1
    return root / "prepared"


@pytest.fixture(scope="session")
def short_documents(tmp_path_factory) -> Path:
    """Documents of 4 to 40 bytes: a 33-token window holds two to several of them."""
    from tessera.data.prepare import prepare

    root = tmp_path_factory.mktemp("short-documents")
    words = ["tessera", "shard", "rank", "token", "window", "pipe", "zero", "adam", "mask"]
    rng = random.Random(5)
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(1500)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare([str(root / "docs.jsonl")], root / "prepared", shard_bytes=8_000, log=lambda _: None)
    return root / "prepared"
