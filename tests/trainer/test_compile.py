"""train.compile: each transformer block compiled whole (no graph breaks), with activation
checkpointing and every ZeRO stage, trains as eager does; and a clear error where it cannot run."""

import pytest
from multiproc import run_ranks
from training import losses, read_metrics, tiny_config

STEPS = 10
# name -> overrides, at dp=2; the eager run of the same stage is the reference of each
LAYOUTS = {
    "zero0": {"parallel.zero_stage": 0},
    "zero0-checkpointing": {"parallel.zero_stage": 0, "train.activation_checkpointing": "full"},
    "zero1": {"parallel.zero_stage": 1},
    "zero2": {"parallel.zero_stage": 2},
    "zero3": {"parallel.zero_stage": 3},
    "zero3-checkpointing": {"parallel.zero_stage": 3, "train.activation_checkpointing": "full"},
}


def train_counting_graphs(configs) -> list[tuple[list[dict], dict]] | None:
    """Rank body: train each config; rank 0 returns its metrics and dynamo's counters of it."""
    import torch._dynamo
    import torch.distributed as dist

    from tessera.trainer.train import train

    results = []
    for cfg in configs:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        train(cfg)
        counters = {key: dict(value) for key, value in torch._dynamo.utils.counters.items()}
        results.append((read_metrics(cfg.run.dir), counters))
    return results if dist.get_rank() == 0 else None


def test_compiled_blocks_train_as_eager(tmp_path, byte_shards):
    configs, names = [], []
    for name, overrides in LAYOUTS.items():
        for compiled in (False, True):
            names.append((name, compiled))
            configs.append(tiny_config(tmp_path / f"{name}-{compiled}", byte_shards,
                                       **overrides, **{"train.steps": STEPS, "model.num_layers": 3,
                                                       "train.compile": compiled}))
    runs = dict(zip(names, run_ranks(2, train_counting_graphs, configs)[0]))
    for name in LAYOUTS:
        (eager_rows, eager_counters), (rows, counters) = runs[name, False], runs[name, True]
        assert len(rows) == STEPS, name
        assert losses(rows) == pytest.approx(losses(eager_rows), rel=1e-5), name
        assert not eager_counters.get("stats", {}).get("unique_graphs"), name
        # Two graphs: check_compile_works' probe, and one the three blocks share (fullgraph:
        # no breaks inside a block)
        assert counters["stats"]["unique_graphs"] == 2, (name, counters)
        assert not counters.get("graph_break"), (name, counters["graph_break"])


def test_compile_without_a_compiler_is_one_line(monkeypatch):
    import torch
    import torch._inductor.config as inductor_config

    from tessera.trainer.config import ConfigError
    from tessera.trainer.model import check_compile_works

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/g++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    torch._dynamo.reset()
    try:
        with pytest.raises(ConfigError, match="config key 'train.compile'.*C\\+\\+ compiler"):
            check_compile_works()
    finally:
        torch._dynamo.reset()
