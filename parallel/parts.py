"""What a local parameter is cut from: plain descriptions, without torch, that the model's
architecture (tessera.trainer.architecture) states and tensor_parallel cuts by."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Part:
    """One full tensor that (a slice of) a local parameter is cut from."""

    name: str  # canonical tensor name, e.g. "layers.3.q.weight"
    shape: tuple[int, ...]  # the full tensor's shape
    split_dim: int | None  # dimension split across tensor-parallel ranks; None: replicated
    padded_rows: int | None = None  # full rows after zero-padding (vocabulary padding)
    init: str = "normal"  # how a fresh model fills it: normal (init_std) | ones | zeros


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Round the vocabulary up so every tensor-parallel rank holds an equal slice."""
    return -(-vocab_size // tp) * tp
