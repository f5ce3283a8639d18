"""Helpers for checkpoint tests: compare two checkpoints tensor by tensor, damage files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tessera.trainer import checkpoint

# Files whose content legitimately differs between two saves of the same state.
NOT_STATE = {checkpoint.MANIFEST_FILE, checkpoint.CONFIG_FILE}


def assert_same(a, b, where: str) -> None:
    """Recursively equal: tensors bitwise (torch.equal, same dtype), everything else ==."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        assert type(a) is type(b), f"{where}: types differ"
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_checkpoint(dir_a: Path, dir_b: Path) -> int:
    """Every model, optimizer, schedule and RNG tensor equal; returns the tensors compared."""
    files_a = checkpoint.read_manifest(dir_a)["files"]
    files_b = checkpoint.read_manifest(dir_b)["files"]
    assert files_a.keys() == files_b.keys(), "the two checkpoints hold different files"
    count = 0
    for name in sorted(files_a):
        if name in NOT_STATE:
            continue
        if name.endswith(".pt"):
            a, b = checkpoint.safe_load(dir_a / name), checkpoint.safe_load(dir_b / name)
            count += _count_tensors(a)
        else:
            a, b = json.loads((dir_a / name).read_text()), json.loads((dir_b / name).read_text())
        assert_same(a, b, name)
    return count


def _count_tensors(obj) -> int:
    if torch.is_tensor(obj):
        return 1
    if isinstance(obj, dict):
        return sum(_count_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v) for v in obj)
    return 0


def flip_byte(path: Path, offset_fraction: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, num_bytes: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - num_bytes])


def largest_file(directory: Path) -> Path:
    return max((p for p in directory.glob("*.pt")), key=lambda p: p.stat().st_size)
