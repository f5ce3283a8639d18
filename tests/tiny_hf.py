"""Small Hugging Face model directories made on the spot (random weights, nothing downloaded),
and the one-line error `tessera convert from-hf` gives on a bad one."""

from __future__ import annotations

from pathlib import Path

from tessera.trainer.convert import convert_command


def small_hf(directory: Path, **changes) -> Path:
    """A random one-layer LlamaForCausalLM (vocabulary 40, hidden size 16) saved with
    save_pretrained: config.json and model.safetensors, no tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        **changes,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def from_hf_error(capsys, source: Path, out: Path, *extra: str) -> str:
    """The error line of `tessera convert from-hf SOURCE OUT EXTRA...`, which must fail with
    exit code 2 and exactly one line on stderr."""
    capsys.readouterr()  # drop what saving the fixture printed
    assert convert_command(["from-hf", str(source), str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err
