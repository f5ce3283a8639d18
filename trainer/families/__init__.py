"""The Hugging Face architectures Tessera trains: one module each, listed here.

Every family is the same decoder (tessera.trainer.model) with some of its options: q/k/v
biases, q/k norms, a head size of its own, scaled rotary embeddings, a sliding window. A family
states which options are part of it and which it may have, and the names its config.json
gives them; tessera.trainer.architecture reads and writes config.json through it. Adding a
family is one module here (and its tests).
"""

from __future__ import annotations

from tessera.trainer.families import llama, mistral, qwen2, qwen3
from tessera.trainer.families.family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY,
                                                      qwen3.FAMILY)}

__all__ = ["FAMILIES", "Family"]
