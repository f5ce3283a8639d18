"""Helpers for end-to-end training tests: a tiny config, and a rank body that trains configs."""

from __future__ import annotations

import json
from pathlib import Path

from tessera.trainer.config import Config, ModelConfig, load_config


def tiny_config(run_dir: Path, shards: Path, **overrides) -> Config:
    """A 2-layer, hidden-64 Llama on byte-level shards; `overrides` are dotted keys."""
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


def tiny_model_config(**overrides) -> ModelConfig:
    """The same 2-layer, hidden-64 Llama as a ModelConfig, for tests of the model alone."""
    fields = dict(vocab_size=255, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=176, seq_len=32)
    return ModelConfig(**{**fields, **overrides})


def read_metrics(run_dir: str | Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_each(configs: list[Config]) -> list[list[dict] | None]:
    """Rank body for tests.multiproc.run_ranks: train each config in turn in the same process
    group; rank 0 returns each run's metrics rows."""
    import torch.distributed as dist

    from tessera.trainer.train import train

    runs = []
    for cfg in configs:
        train(cfg)
        runs.append(read_metrics(cfg.run.dir) if dist.get_rank() == 0 else None)
    return runs


def losses(rows: list[dict]) -> list[float]:
    return [row["loss"] for row in rows]


def last_losses(run_dir: str | Path) -> list[float]:
    """The loss of each step as last logged (steps run again after a restart log again)."""
    by_step = {row["step"]: row["loss"] for row in read_metrics(run_dir)}
    return [by_step[step] for step in sorted(by_step)]


def rank_pid(run_dir: str | Path, rank: int) -> int:
    """The pid in the rank's heartbeat of the newest launch (tessera.launch.faults)."""
    from tessera.launch import faults

    beats = sorted((Path(run_dir) / faults.RESILIENCE_DIR / "launches").glob(
        f"*/*/rank-{rank:05d}.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(beats[-1].read_text())["pid"]
