"""Qwen2 and Qwen2.5: biases on the q, k and v projections; `Qwen2ForCausalLM`."""

from tessera.trainer.families.family import Family

FAMILY = Family(name="qwen2", architecture="Qwen2ForCausalLM", qkv_bias=True,
                layered_sliding_window_key=True, head_dim_key=False)
