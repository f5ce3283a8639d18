"""Training end to end on real DeepSpeed engines (gloo, CPU): loss falls, ZeRO matches one
process, a stopped run resumes where it left off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from multiproc import run_ranks

from tessera.trainer.config import Config, load_config


def tiny_config(run_dir: Path, shards: Path, **overrides) -> Config:
    base = {
        "run.dir": str(run_dir), "run.seed": 3, "data.shards": str(shards), "data.streams": 2,
        "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.ffn_hidden_size": 176, "model.seq_len": 32,
        "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.lr": 3e-3,
        "train.min_lr": 3e-4, "train.warmup_steps": 2, "train.steps": 10,
        "checkpoint.interval": 0, "log.interval": 1,
    }
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def read_metrics(run_dir: str | Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_each(configs: list[Config]) -> list[list[dict]]:
    """Rank body: train each config in turn; rank 0 returns each run's metrics rows."""
    import torch.distributed as dist

    from tessera.trainer.train import train

    runs = []
    for cfg in configs:
        train(cfg)
        runs.append(read_metrics(cfg.run.dir) if dist.get_rank() == 0 else None)
    return runs


def losses(rows: list[dict]) -> list[float]:
    return [row["loss"] for row in rows]


def test_two_ranks_lower_the_loss(tmp_path, byte_shards):
    cfg = tiny_config(tmp_path / "run", byte_shards, **{"parallel.tp": 2, "train.steps": 20})
    (rows,), _ = run_ranks(2, train_each, [cfg])
    assert [r["step"] for r in rows] == list(range(1, 21))
    first, last = rows[0]["loss"], sum(losses(rows[-3:])) / 3
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    for row in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "consumed_samples"} <= row.keys()
    assert rows[-1]["consumed_samples"] == 20 * 8
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000020"


def test_zero_stages_at_dp2_match_one_process(tmp_path, byte_shards):
    """Same global batch, clipping off, fp32: step 1 equal to 1e-6, 10 steps within rtol 1e-4."""
    common = {"train.grad_clip": 0}
    (single,) = run_ranks(1, train_each, [tiny_config(tmp_path / "single", byte_shards, **common)])[0]
    configs = [tiny_config(tmp_path / f"zero{stage}", byte_shards, **common,
                           **{"parallel.zero_stage": stage}) for stage in (0, 1, 2, 3)]
    runs = run_ranks(2, train_each, configs)[0]
    reference = losses(single)
    for stage, rows in zip((0, 1, 2, 3), runs):
        got = losses(rows)
        assert abs(got[0] - reference[0]) <= 1e-6 * abs(reference[0]), f"ZeRO-{stage} step 1"
        assert got == pytest.approx(reference, rel=1e-4), f"ZeRO-{stage}"


def test_stopped_run_resumes_from_its_checkpoint(tmp_path, byte_shards):
    """6 steps straight against 3 + restart + 3: the resumed run starts at step 4 and its losses
    are bitwise those of the uninterrupted run."""
    straight = tiny_config(tmp_path / "straight", byte_shards, **{"train.steps": 6})
    first_half = tiny_config(tmp_path / "resumed", byte_shards, **{"train.steps": 3})
    second_half = tiny_config(tmp_path / "resumed", byte_shards, **{"train.steps": 6})
    straight_rows, _, resumed_rows = run_ranks(1, train_each, [straight, first_half, second_half])[0]
    resumed_steps = [r["step"] for r in resumed_rows]
    assert resumed_steps == [1, 2, 3, 4, 5, 6]  # one metrics file: 1-3, then 4-6 after the restart
    assert losses(resumed_rows) == losses(straight_rows)
    assert resumed_rows[-1]["consumed_samples"] == straight_rows[-1]["consumed_samples"]
