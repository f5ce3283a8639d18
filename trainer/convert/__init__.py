"""Checkpoint conversion: to and from Hugging Face, and between parallel layouts.

    reader.py    a checkpoint of any layout, read as full ("canonical") tensors, one at a time
    fill.py      canonical tensors into the engines of a target layout (weights, masters, Adam)
    hf.py        the Hugging Face side: config.json in both directions, safetensors, tokenizer
    commands.py  `tessera convert {to-hf,from-hf,reshard}`
"""

from tessera.trainer.convert.commands import (
    convert_command,
    from_hf,
    from_hf_config,
    reshard,
    reshard_config,
    to_hf,
)

__all__ = ["convert_command", "from_hf", "from_hf_config", "reshard", "reshard_config", "to_hf"]
