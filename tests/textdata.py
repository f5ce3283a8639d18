"""Text made on the spot for tests (nothing is downloaded)."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the model reads tokens from shards and learns which word follows which in a "
         "sentence that repeats with small changes so that the loss can fall").split()


def synthetic_text(seed: int, num_sentences: int) -> str:
    """Sentences over a small vocabulary with a fixed word order: learnable in a few steps."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(num_sentences):
        start = rng.randrange(len(WORDS))
        length = rng.randrange(6, 20)
        sentences.append(" ".join(WORDS[(start + i) % len(WORDS)] for i in range(length)) + ".")
    return "\n".join(sentences)


def make_text_files(directory: Path, num_files: int, sentences_per_file: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(num_files):
        path = directory / f"doc-{index:03d}.txt"
        path.write_text(synthetic_text(index, sentences_per_file))
        paths.append(path)
    return paths
