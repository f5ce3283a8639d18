"""Training end to end on real DeepSpeed engines (gloo, CPU): loss falls on 2 ranks, a stopped
run resumes where it left off. Layout parity (ZeRO stages, tp, pp) is in tests/parity."""

from __future__ import annotations

import pytest
from multiproc import run_ranks
from training import losses, tiny_config, train_each


def test_two_ranks_lower_the_loss(tmp_path, byte_shards):
    cfg = tiny_config(tmp_path / "run", byte_shards, **{"parallel.tp": 2, "train.steps": 20})
    (rows,), _ = run_ranks(2, train_each, [cfg])
    assert [r["step"] for r in rows] == list(range(1, 21))
    first, last = rows[0]["loss"], sum(losses(rows[-3:])) / 3
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    for row in rows:
        assert {"step", "time", "loss", "lr", "grad_norm", "tokens_per_s", "consumed_samples",
                "global_batch_size"} <= row.keys()
    assert all(rows[i]["time"] <= rows[i + 1]["time"] for i in range(len(rows) - 1))
    assert rows[-1]["consumed_samples"] == 20 * 8
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000020\n"


@pytest.mark.parametrize("masking", [False, True], ids=["causal", "document-masking"])
def test_stopped_run_resumes_from_its_checkpoint(tmp_path, byte_shards, short_documents,
                                                 masking):
    """6 steps straight against 3 + restart + 3: the resumed run starts at step 4 and its losses
    are bitwise those of the uninterrupted run (with document masking too: its mask is a
    function of the batch; on short documents, so that windows cross them)."""
    shards, extra = (short_documents, {"data.document_masking": "true"}) if masking else \
        (byte_shards, {})
    straight = tiny_config(tmp_path / "straight", shards, **{"train.steps": 6}, **extra)
    first_half = tiny_config(tmp_path / "resumed", shards,
                             **{"train.steps": 6, "train.stop_at": 3}, **extra)
    second_half = tiny_config(tmp_path / "resumed", shards, **{"train.steps": 6}, **extra)
    configs = [straight, first_half, second_half]
    straight_rows, _, resumed_rows = run_ranks(1, train_each, configs)[0]
    resumed_steps = [r["step"] for r in resumed_rows]
    assert resumed_steps == [1, 2, 3, 4, 5, 6]  # one metrics file: 1-3, then 4-6 after the restart
    assert losses(resumed_rows) == losses(straight_rows)
    assert resumed_rows[-1]["consumed_samples"] == straight_rows[-1]["consumed_samples"]


def test_run_summary_names_run_dir_metrics_and_checkpoints(tmp_path):
    from tessera.trainer.checkpoint import TrainState
    from tessera.trainer.train import run_summary

    cfg = tiny_config(tmp_path / "run", tmp_path / "data")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-00000010")
    text = run_summary(cfg, TrainState(step=10))
    assert "finished at step 10/10" in text
    assert f"run directory  {tmp_path / 'run'}" in text
    assert str(tmp_path / "run" / "metrics.jsonl") in text
    assert "(latest: step-00000010)" in text
    assert "stopped (run again to resume)" in run_summary(cfg, TrainState(step=4))


def zero3_gather_units(cfg) -> list[str]:
    """Rank body: the modules a ZeRO-3 engine gathers as one unit (DeepSpeed's leaf modules)."""
    from deepspeed.utils import z3_leaf_module

    from tessera.data.format import read_manifest
    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.train import build_training_engine

    cfg.model.vocab_size = read_manifest(cfg.data.shards).tokenizer.vocab_size
    topo = init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.launch.backend)
    engine, _, _ = build_training_engine(cfg, topo)
    units = [name for name, module in engine.module.named_modules() if z3_leaf_module(module)]
    destroy_distributed()
    return units


def test_zero3_gathers_each_block_whole(tmp_path, byte_shards):
    cfg = tiny_config(tmp_path / "run", byte_shards, **{"parallel.zero_stage": 3})
    for units in run_ranks(2, zero3_gather_units, cfg):
        assert units == ["blocks.0", "blocks.1"]


def test_a_fresh_train_compiles_no_deepspeed_op(tmp_path, byte_shards):
    """DeepSpeed's CPU backend would JIT-compile its shared-memory op at start (20 s to minutes
    in every new environment); training never uses it, so nothing is built."""
    import os
    import subprocess
    import sys

    extensions = tmp_path / "torch_extensions"  # where torch's JIT builds, fresh
    overrides = {"run.dir": tmp_path / "run", "data.shards": byte_shards, "data.streams": 2,
                 "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4,
                 "model.num_kv_heads": 2, "model.ffn_hidden_size": 176, "model.seq_len": 32,
                 "train.global_batch_size": 4, "train.micro_batch_size": 2, "train.steps": 1}
    done = subprocess.run(
        [sys.executable, "-m", "tessera", "train", *(f"{k}={v}" for k, v in overrides.items())],
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}, capture_output=True,
        text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "built successfully" not in done.stdout + done.stderr
    assert not extensions.exists() or not any(extensions.iterdir())
