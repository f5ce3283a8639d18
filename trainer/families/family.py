"""What a family is made of (see the package's docstring)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # model.family, and the Hugging Face model_type
    architecture: str  # the transformers class of the exported config.json
    qkv_bias: bool = False  # its q, k and v projections always carry biases
    qk_norm: bool = False  # it always normalizes q and k per head
    has_sliding_window: bool = False  # config.json's sliding_window applies to every layer
    attention_bias_key: bool = False  # config.json has attention_bias (q, k, v and o): False
    layered_sliding_window_key: bool = False  # config.json has use_sliding_window: False
    head_dim_key: bool = True  # config.json states head_dim even when it is hidden / heads

    @property
    def model_type(self) -> str:
        return self.name
