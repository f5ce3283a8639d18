"""Metrics without training: FLOPs per token, the peak table, MFU, the console line, TensorBoard
files read back, the resolved-config block, rank-tagged warnings, the non-finite guard and the
loss-spike detector."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tessera.trainer.architecture import flops_per_token, non_embedding_params
from tessera.trainer.config import load_config
from tessera.trainer.health import LossSpikes, NonFiniteError, NonFiniteGuard
from tessera.trainer.metrics import (
    MetricsLog,
    StepTimes,
    console_line,
    peak_by_name,
    resolved_config_text,
)


def model_config(**overrides):
    cfg = load_config(
        None, [f"{k}={v}" for k, v in {"model.vocab_size": 1000, **overrides}.items()]
    )
    return cfg


@pytest.mark.parametrize("overrides", [
    {"model.tie_embeddings": False}, {"model.tie_embeddings": True},
    {"model.qkv_bias": True, "model.qk_norm": True, "model.head_dim": 32},
], ids=["untied", "tied", "options"])
def test_non_embedding_params_count_every_matrix_but_the_input_embedding(overrides):
    cfg = model_config(**{"model.num_kv_heads": 2, **overrides}).model
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    block = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h
    block += (q + 2 * kv) * cfg.qkv_bias + 2 * d * cfg.qk_norm
    # the output projection counts, tied or not: it still multiplies by a vocab x d matrix
    assert non_embedding_params(cfg) == cfg.num_layers * block + h + cfg.vocab_size * h


def test_flops_per_token_is_6n_plus_attention():
    cfg = model_config().model
    n = non_embedding_params(cfg)
    expected = 6 * n + 12 * cfg.num_layers * cfg.hidden_size * cfg.seq_len
    assert flops_per_token(cfg) == expected
    windowed = model_config(**{"model.sliding_window": 16}).model  # a query sees 16 tokens
    assert flops_per_token(windowed) == 6 * n + 12 * cfg.num_layers * cfg.hidden_size * 16


def test_llama_1b_config_has_about_a_billion_non_embedding_parameters():
    cfg = load_config("configs/llama-1b.yaml", ["model.vocab_size=32000"]).model
    assert 0.9e9 < non_embedding_params(cfg) < 1.4e9


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("Tesla T4", None),
    ],
)
def test_peak_table_by_device_name(name, peak):
    assert peak_by_name(name) == peak


def test_mfu_only_with_a_peak_and_from_the_formula():
    cfg = model_config(**{"train.global_batch_size": 8, "model.seq_len": 64})
    times = StepTimes(cfg, world_size=2, device=torch.device("cpu"), start_step=0)
    times.add(step_s=0.5, data_s=0.1, samples=cfg.train.global_batch_size)
    times.add(step_s=1.5, data_s=0.3, samples=cfg.train.global_batch_size)
    row = times.row(2)
    assert "throughput/mfu" not in row  # CPU, no log.peak_tflops
    tokens_per_s = 2 * 8 * 64 / 2.0
    assert row["tokens_per_s"] == pytest.approx(tokens_per_s)
    assert row["throughput/tokens_per_s_per_device"] == pytest.approx(tokens_per_s / 2)
    assert row["time/data_wait"] == pytest.approx(0.4 / 2.0)
    assert row["step_s"] == pytest.approx(1.0)
    assert row["memory/peak_gb"] > 0.01  # this process's RSS
    cfg = model_config(
        **{"train.global_batch_size": 8, "model.seq_len": 64, "log.peak_tflops": 0.5}
    )
    times = StepTimes(cfg, world_size=2, device=torch.device("cpu"), start_step=0)
    times.add(step_s=2.0, data_s=0.0, samples=cfg.train.global_batch_size)
    row = times.row(1)
    expected = (8 * 64 / 2.0) / 2 * flops_per_token(cfg.model) / 1e12 / 0.5  # one 2 s step
    assert row["throughput/mfu"] == pytest.approx(expected)
    assert row["throughput/tflops"] == pytest.approx(expected * 0.5)


def test_console_line_is_compact_and_complete():
    row = {
        "step": 40,
        "total_steps": 1000,
        "loss": 3.21234,
        "lr": 3e-4,
        "grad_norm": 0.75,
        "tokens_per_s": 123456.0,
        "throughput/mfu": 0.412,
        "memory/peak_gb": 12.345,
        "time/eta_s": 3725.0,
    }
    line = console_line(row)
    assert line == (
        "step   40/1000 | loss 3.2123 | lr 3.00e-04 | gnorm 0.750 | 123.5k tok/s | "
        "MFU 41.2% | mem 12.35 GB | ETA 1:02:05"
    )
    skipped = console_line(
        {
            **row,
            "loss": float("nan"),
            "grad_norm": float("inf"),
            "train/skipped": 1,
            "eval/loss": 3.0,
            "eval/perplexity": 20.09,
        }
    )
    assert "loss nan" in skipped and "gnorm nan" in skipped and "SKIPPED" in skipped
    assert skipped.splitlines()[1].strip() == "eval: loss 3.0000  perplexity 20.09"


def test_metrics_reach_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = model_config(**{"run.dir": str(tmp_path)})
    log = MetricsLog(tmp_path, enabled=True, cfg=cfg, console=False)
    for step in (1, 2):
        log.write(
            {
                "step": step,
                "total_steps": 2,
                "loss": 5.0 - step,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "tokens_per_s": 100.0,
                "consumed_samples": 8 * step,
                "eval/loss": 4.5,
                "throughput/mfu": 0.25,
                "data/tokens/default": 256 * step,
            }
        )
    log.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "optim/lr",
        "train/grad_norm",
        "throughput/tokens_per_s",
        "throughput/mfu",
        "eval/loss",
        "data/tokens/default",
    } <= tags
    assert [e.value for e in events.Scalars("train/loss")] == [4.0, 3.0]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


def test_resolved_config_names_every_key():
    cfg = load_config("configs/demo.yaml", [])
    text = resolved_config_text(cfg)
    assert text.splitlines()[0].startswith("tessera: resolved config")
    for key in ("hidden_size=", "eval_interval=", "valid_shards=", "peak_tflops=", "nodes="):
        assert key in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_a_resume_prints_one_line_of_what_changed(capsys):
    """The whole config at a first start; on a resume its hash and the keys that changed."""
    import hashlib

    from tessera.trainer.config import to_yaml
    from tessera.trainer.metrics import print_resolved_config

    saved = load_config("configs/demo.yaml", [])
    longer = load_config("configs/demo.yaml", ["train.steps=600", "log.interval=5"])
    print_resolved_config(longer, resumed_config=saved)
    out = capsys.readouterr().out
    digest = hashlib.sha256(to_yaml(longer).encode()).hexdigest()[:12]
    assert out == (f"tessera: config {digest} (run.dir/config.yaml), changed since the "
                   f"checkpoint: train.steps 300 -> 600; log.interval 10 -> 5\n")
    print_resolved_config(saved, resumed_config=saved)
    assert capsys.readouterr().out.endswith("unchanged since the checkpoint\n")
    print_resolved_config(saved)
    assert len(capsys.readouterr().out.splitlines()) > 5  # a first start: every section


def test_warnings_of_other_ranks_carry_the_rank():
    code = (
        "import warnings\n"
        "from tessera.trainer.metrics import tag_warnings_with_rank, warn\n"
        "tag_warnings_with_rank(3, 4)\n"
        "warn('disk almost full')\n"
        "warnings.warn('something odd')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    lines = result.stderr.strip().splitlines()
    assert "[rank 3] tessera: warning: disk almost full" in lines
    assert "[rank 3] UserWarning: something odd" in lines


def test_guard_counts_skips_and_stops_after_too_many_in_a_row():
    cfg = model_config(**{"train.max_nonfinite_steps": 2})
    guard = NonFiniteGuard(cfg)
    assert guard.check(1, 2.0, 1.0, applied=True) == {
        "train/skipped": 0,
        "train/nonfinite_steps": 0,
    }
    assert guard.check(2, float("nan"), float("inf"), applied=False)["train/skipped"] == 1
    assert guard.check(3, 2.0, 1.0, applied=True)["train/nonfinite_steps"] == 1  # streak broken
    guard.check(4, float("nan"), float("nan"), applied=False)
    guard.check(5, float("inf"), float("inf"), applied=False)
    with pytest.raises(NonFiniteError) as stopped:
        guard.check(6, float("nan"), float("nan"), applied=False)
    message = str(stopped.value)
    assert message.startswith("step 6: 3 steps in a row (steps 4-6)")
    assert "train.max_nonfinite_steps=2" in message and "train.lr" in message
    strict = NonFiniteGuard(model_config(**{"train.skip_nonfinite": False}))
    with pytest.raises(NonFiniteError, match=r"^step 9: .*train.skip_nonfinite=false"):
        strict.check(9, float("nan"), float("nan"), applied=False)


def test_a_skipped_update_still_steps_the_schedule():
    from tessera.trainer.optim import count_skipped_update

    class Schedule:
        steps = 0

        def step(self):
            self.steps += 1

    class Engine:
        lr_scheduler = Schedule()
        applied = True

        def was_step_applied(self):
            return self.applied

    engine = Engine()
    count_skipped_update(engine)
    assert engine.lr_scheduler.steps == 0  # DeepSpeed stepped it with the update
    engine.applied = False
    count_skipped_update(engine)
    assert engine.lr_scheduler.steps == 1  # skipped update: we step it


def test_loss_spikes_against_the_running_mean():
    spikes = LossSpikes(factor=2.0)
    for _ in range(12):
        assert spikes.check(1.0) is None
    assert spikes.check(1.9) is None
    assert spikes.check(float("nan")) is None
    assert spikes.check(2.5) == pytest.approx((12 + 1.9) / 13)
    assert spikes.count == 1
    off = LossSpikes(factor=0.0)
    for _ in range(12):
        off.check(1.0)
    assert off.check(100.0) is None


def test_wandb_offline_keeps_one_run_id_across_resumes(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")  # optional: `pip install wandb`
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = model_config(
        **{
            "run.dir": str(tmp_path),
            "log.wandb": True,
            "log.wandb_mode": "offline",
            "log.tensorboard": False,
        }
    )
    ids = []
    for start in (0, 2):  # a first start, then a resume
        log = MetricsLog(tmp_path, enabled=True, cfg=cfg, start_step=start, console=False)
        ids.append(log._wandb.id)
        log.write(
            {
                "step": start + 1,
                "total_steps": 4,
                "loss": 3.0,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "tokens_per_s": 10.0,
                "consumed_samples": 8,
            }
        )
        log.close()
    assert ids[0] == ids[1] == (tmp_path / "wandb_run_id").read_text().strip()
    assert wandb.run is None  # finished
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{ids[0]}"))


def test_wandb_missing_names_the_fix(tmp_path, monkeypatch):
    import builtins

    from tessera.trainer.config import ConfigError

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    cfg = model_config(**{"run.dir": str(tmp_path), "log.wandb": True, "log.tensorboard": False})
    with pytest.raises(
        ConfigError,
        match=r"'log.wandb': the wandb package is not installed; "
        r"`pip install wandb`, or set log.wandb=false",
    ):
        MetricsLog(tmp_path, enabled=True, cfg=cfg, console=False)


RANK_1_PROBE = """
import logging, warnings
import deepspeed.utils
from tessera.trainer.metrics import tag_output_with_rank
tag_output_with_rank(1)
deepspeed.utils.logger.warning("probe from DeepSpeed's logger")
logging.getLogger("megatron.core").warning("probe from megatron-core")
warnings.warn("probe warning")
print("probe print\\nsecond line")
"""


def test_every_line_of_a_rank_other_than_0_names_the_rank():
    """Dependencies' messages included: DeepSpeed's logger holds its own handler, made at
    import, on the original stream."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}  # (as quiet_dependencies sets before imports)
    done = subprocess.run([sys.executable, "-c", RANK_1_PROBE], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    probes = [line for line in lines if "probe" in line or "second line" in line]
    assert len(probes) == 5, lines
    assert all(line.startswith("[rank 1] ") for line in lines), lines


class _Writes:
    def __init__(self):
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


def test_a_rank_writes_whole_lines_to_the_pipe_it_shares():
    """print() writes a line and its newline apart: another rank's line must not land between."""
    from tessera.trainer.metrics import _RankLines

    sink = _Writes()
    stream = _RankLines(sink, rank=3)
    print("tessera train: error: bad", file=stream)
    stream.write("two\nlines\nand a part")
    assert sink.writes == ["[rank 3] tessera train: error: bad\n", "[rank 3] two\n[rank 3] lines\n"]
    stream.flush()  # a progress line without its newline yet
    stream.write(" ended\n")
    assert sink.writes[2:] == ["[rank 3] and a part", " ended\n"]
