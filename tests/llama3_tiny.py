"""A tiny Llama 3.2 as a Hugging Face directory holds it: Llama-3.2-1B's shape scaled down, and
a tokenizer that frames documents as Llama 3's does (a BOS from its post-processor, the EOS its
tokenizer_config.json names, added special tokens counted in the vocabulary)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
TEXTS = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(40)]


def llama3_like_tokenizer(directory: Path) -> Tokenizer:
    """A byte-level BPE with Llama 3's special tokens and post-processor, saved with a
    tokenizer_config.json naming its EOS (as a Hugging Face model directory has it)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXTS, trainer=trainer)
    tokenizer.add_special_tokens([EOT, "<|reserved_special_token_0|>"])
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizer


def save_llama32_like(directory: Path, vocab_size: int) -> None:
    """Llama-3.2-1B's shape scaled down: llama3 RoPE (factor 32, theta 500000), tied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
        rope_parameters={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                         "rope_theta": 500000.0})
    LlamaForCausalLM(config).save_pretrained(directory)
