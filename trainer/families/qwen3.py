"""Qwen3 (dense): RMSNorm over each head of q and k, a head size of its own;
`Qwen3ForCausalLM`."""

from tessera.trainer.families.family import Family

FAMILY = Family(name="qwen3", architecture="Qwen3ForCausalLM", qk_norm=True,
                attention_bias_key=True, layered_sliding_window_key=True)
