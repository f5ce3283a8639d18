"""Out of memory: one line naming the keys that lower what a rank holds, not torch's traceback."""

from __future__ import annotations

import pytest
import torch
from training import tiny_config

from tessera.trainer.config import ConfigError
from tessera.trainer.memory import OutOfMemory, out_of_memory_named


def test_a_model_too_large_for_the_machine_fails_in_one_line(tmp_path, byte_shards, capsys):
    """A real allocation failure: an MLP of 2**33 units (terabytes of weights) on CPU."""
    from tessera.cli import main

    args = [f"{key}={value}" for key, value in {
        "run.dir": tmp_path / "run", "data.shards": byte_shards, "model.hidden_size": 64,
        "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.ffn_hidden_size": 2**33, "model.seq_len": 32, "train.global_batch_size": 4,
        "train.micro_batch_size": 2, "train.steps": 1}.items()]
    capsys.readouterr()
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tessera train: error: out of memory building the model (it asked "
                          "for "), err
    # no batch yet: what spreads the weights, gradients and optimizer state
    assert err.endswith(" more): spread the model over more ranks: parallel.zero_stage (0), "
                        "parallel.tp (1), parallel.pp (1), or make it smaller (model.*)"), err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_cuda_out_of_memory_names_its_size_and_the_keys(tmp_path, byte_shards):
    cfg = tiny_config(tmp_path / "run", byte_shards, **{"train.activation_checkpointing": "full",
                                                         "train.loss_chunk_tokens": 1024})
    with pytest.raises(OutOfMemory) as raised:
        with out_of_memory_named(cfg, step=7):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 "
                                         "has a total capacity of 79.11 GiB of which 1.2 GiB is "
                                         "free.")
    said = str(raised.value)
    assert said == ("out of memory at step 7 (it asked for 2.00 GiB more): lower "
                    "train.micro_batch_size (2) or model.seq_len (32); spread the model over more "
                    "ranks: parallel.zero_stage (0), parallel.tp (1), parallel.pp (1)")
    assert isinstance(raised.value, ConfigError)  # fatal: a restart would meet it again


def test_other_runtime_errors_pass_through(tmp_path, byte_shards):
    cfg = tiny_config(tmp_path / "run", byte_shards)
    with pytest.raises(RuntimeError, match="^shapes do not match$"):
        with out_of_memory_named(cfg, step=1):
            raise RuntimeError("shapes do not match")
