"""The config.json files of the checkpoints users continue from, as published (in
published_configs/), read by from-hf's parser: what its type checks accept must include them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tessera.trainer.architecture import model_fields_from_hf

PUBLISHED = Path(__file__).with_name("published_configs")
LLAMA3 = {"type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}

# name -> (hidden, layers, heads, kv heads, rope_theta, tied, family, sliding window, rope scaling)
EXPECTED = {
    "Llama-3.1-8B": (4096, 32, 32, 8, 500000.0, False, "llama", None, {**LLAMA3, "factor": 8.0}),
    "Llama-3.2-1B": (2048, 16, 32, 8, 500000.0, True, "llama", None, {**LLAMA3, "factor": 32.0}),
    "Qwen2.5-7B": (3584, 28, 28, 4, 1e6, False, "qwen2", None, None),  # use_sliding_window false
    "Qwen3-8B": (4096, 36, 32, 8, 1e6, False, "qwen3", None, None),  # rope_theta an int there
    "Mistral-7B-v0.1": (4096, 32, 32, 8, 1e4, False, "mistral", 4096, None),
    "Mistral-7B-v0.3": (4096, 32, 32, 8, 1e6, False, "mistral", None, None),
}


def fields_of(raw: dict) -> tuple:
    m = model_fields_from_hf(raw, max_seq_len=4096)
    return (m["hidden_size"], m["num_layers"], m["num_heads"], m["num_kv_heads"],
            m["rope_theta"], m["tie_embeddings"], m["family"], m["sliding_window"],
            m["rope_scaling"])


@pytest.mark.parametrize("name", EXPECTED)
def test_a_published_config_reads_as_its_model(name):
    raw = json.loads((PUBLISHED / f"{name}.json").read_text())
    assert fields_of(raw) == EXPECTED[name]


def test_qwen_long_context_recipe_with_the_legacy_type_key_reads_as_yarn():
    """Qwen2.5's model cards extend the context by adding rope_scaling with "type" (the key
    transformers read before "rope_type")."""
    raw = json.loads((PUBLISHED / "Qwen2.5-7B.json").read_text())
    raw["rope_scaling"] = {"factor": 4.0, "original_max_position_embeddings": 32768,
                           "type": "yarn"}
    assert fields_of(raw)[-1] == {"type": "yarn", "factor": 4.0,
                                  "original_max_position_embeddings": 32768}
