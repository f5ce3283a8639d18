"""Mistral (7B v0.1 with a 4096-token sliding window, v0.3 without): `MistralForCausalLM`."""

from tessera.trainer.families.family import Family

FAMILY = Family(name="mistral", architecture="MistralForCausalLM", has_sliding_window=True)
