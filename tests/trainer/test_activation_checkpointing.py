"""Activation checkpointing recomputes each block in backward: same numbers, less memory."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from activation_memory import compare  # noqa: E402


def test_full_checkpointing_keeps_numerics_and_saves_activation_memory():
    none, full = compare(layers=12, hidden=128, seq=512, batch=8)
    assert full["loss"] == none["loss"]
    assert full["grad_checksum"] == none["grad_checksum"]
    assert full["growth_mb"] < 0.6 * none["growth_mb"], (none, full)
