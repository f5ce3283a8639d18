"""Llama (2, 3, 3.1-3.3; SmolLM and others of its shape): `LlamaForCausalLM`."""

from tessera.trainer.families.family import Family

FAMILY = Family(name="llama", architecture="LlamaForCausalLM", attention_bias_key=True)
