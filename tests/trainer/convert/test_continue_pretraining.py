"""The README's "Continue pretraining from a Hugging Face model", end to end through the CLI: a
tiny Llama-3.2-shaped model whose tokenizer frames documents as Llama 3's does (a BOS from its
post-processor, the EOS its tokenizer_config.json names, added special tokens counted in the
vocabulary), imported at tp=2 x pp=2, data prepared with the tokenizer the import carries,
trained, exported, and loaded and run by transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tessera.data.format import read_manifest

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


def tessera(*args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tessera", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"tessera {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.mark.slow
def test_continue_pretraining_from_a_hugging_face_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = tmp_path / "hf" / "llama-3.2-tiny"
    hf_dir.mkdir(parents=True)
    tokenizer = llama3_like_tokenizer(hf_dir)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    save_llama32_like(hf_dir, vocab_size)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))

    # the README's commands, in order
    tessera("convert", "from-hf", "hf/llama-3.2-tiny", "imported", "parallel.tp=2",
            "parallel.pp=2", "model.seq_len=32", cwd=tmp_path)
    tessera("prepare", "corpus.jsonl", "--output", "data", "--tokenizer", "imported",
            cwd=tmp_path)
    tessera("train", "--config", "imported/config.yaml", "run.dir=runs/continued",
            "data.shards=data", "checkpoint.load_from=imported",
            "checkpoint.load_weights_only=true", "train.steps=4", "train.warmup_steps=1",
            "train.global_batch_size=4", "train.micro_batch_size=2", cwd=tmp_path)
    tessera("convert", "to-hf", "runs/continued", "export", cwd=tmp_path)

    # prepare framed each document as Llama 3 was trained: BOS, the text, its EOS
    manifest = read_manifest(tmp_path / "data")
    assert manifest.tokenizer.vocab_size == vocab_size
    assert manifest.tokenizer.eos_id == tokenizer.token_to_id(EOS)
    with tarfile.open(tmp_path / "data" / manifest.shards[0].path) as tar:
        first = np.frombuffer(tar.extractfile("000000000.tokens").read(), dtype=manifest.dtype)
    text_ids = tokenizer.encode(TEXTS[0], add_special_tokens=False).ids
    assert list(first[: len(text_ids) + 2]) == [tokenizer.token_to_id(BOS), *text_ids,
                                                 tokenizer.token_to_id(EOS)]

    # the export is the same architecture, and trained: its weights moved from the import's
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["architectures"] == ["LlamaForCausalLM"]
    assert exported["rope_parameters"]["rope_type"] == "llama3"
    assert exported["vocab_size"] == vocab_size
    original = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    embed = "model.embed_tokens.weight"
    assert not torch.equal(original.state_dict()[embed], model.state_dict()[embed])

    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert hf_tokenizer.eos_token == EOS and hf_tokenizer.bos_token == BOS
    ids = hf_tokenizer("the quick brown", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.token_to_id(BOS)
    out = model.generate(ids, max_new_tokens=8, do_sample=False,
                         pad_token_id=hf_tokenizer.eos_token_id)
    assert out.shape[1] > ids.shape[1]
    assert isinstance(hf_tokenizer.decode(out[0]), str)
