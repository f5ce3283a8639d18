"""`tessera prepare --verify DIR`: every shard checked against the manifest.

Each shard is read once: its sha256, and, through the same member parsing the loader uses, its
sample count, token count and token ids (below the vocabulary size, whole tokens of the dtype).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from tessera.data.format import (
    DataError,
    ShardInfo,
    decode_tokens,
    read_manifest,
)
from tessera.data.progress import counted
from tessera.data.reader import BadSamples, check_payload, hashing_reader, iter_members

MAX_PROBLEMS_PER_SHARD = 5


@dataclasses.dataclass
class ShardReport:
    path: str
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shard(directory: Path, info: ShardInfo, dtype: str, vocab_size: int) -> ShardReport:
    path = directory / info.path
    report = ShardReport(info.path, [])
    if not path.is_file():  # (a fifo or device would never end)
        report.problems.append("not a regular file" if path.exists() else "missing")
        return report
    num_samples = num_tokens = 0
    with open(path, "rb") as f:
        stream, digest = hashing_reader(f)
        for item in iter_members(stream, info.path):
            if isinstance(item, BadSamples):
                report.problems.append(item.message.removeprefix(f"{info.path}: "))
                continue
            num_samples += 1
            problem = check_payload(item.payload, dtype, vocab_size)
            if problem is not None:
                report.problems.append(f"member {item.name}: {problem}")
                continue
            num_tokens += len(decode_tokens(item.payload, dtype))
        while stream.read(1 << 20):  # the tar's end padding belongs to the checksum too
            pass
    if digest.hexdigest() != info.sha256:
        report.problems.append("sha256 differs from the manifest")
    if num_samples != info.num_samples:
        report.problems.append(f"{num_samples} samples, the manifest says {info.num_samples}")
    if num_tokens != info.num_tokens:
        report.problems.append(f"{num_tokens} tokens, the manifest says {info.num_tokens}")
    return report


def verify(directory: str | os.PathLike) -> list[ShardReport]:
    """One report per shard listed in DIRECTORY's manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    return [
        verify_shard(directory, info, manifest.dtype, manifest.tokenizer.vocab_size)
        for info in manifest.shards
    ]


def verify_command(directory: str) -> int:
    """Print one line per bad shard and a summary; 0 if every shard matches, else 1."""
    try:
        reports = verify(directory)
    except DataError as e:
        print(f"tessera prepare: error: {e}", file=sys.stderr)
        return 2
    bad = [r for r in reports if not r.ok]
    for report in bad:
        shown = report.problems[:MAX_PROBLEMS_PER_SHARD]
        more = len(report.problems) - len(shown)
        suffix = f"; and {more} more" if more else ""
        print(f"{Path(directory) / report.path}: BAD: {'; '.join(shown)}{suffix}")
    if bad:
        print(f"{len(bad)} of {counted(len(reports), 'shard')} do not match the manifest in "
              f"{directory}")
        return 1
    print(f"{counted(len(reports), 'shard')} checked: all match the manifest in {directory}")
    return 0
