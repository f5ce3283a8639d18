"""Without Slurm: `torchrun --nnodes=2 --node_rank=0|1` on one host, two invocations, runs the
same entry point (`python -m tessera train`) as one 2-rank job."""

from __future__ import annotations

import subprocess
import sys

from training import read_metrics

from tessera.launch.local import free_port
from tessera.trainer import checkpoint


def test_two_torchrun_nodes_train_one_job(tmp_path, byte_shards):
    run_dir = tmp_path / "run"
    overrides = [f"{k}={v}" for k, v in {
        "run.dir": run_dir, "run.seed": 3, "data.shards": byte_shards, "data.streams": 2,
        "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.ffn_hidden_size": 176, "model.seq_len": 32,
        "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.steps": 4,
        "checkpoint.interval": 2,
    }.items()]
    port = free_port()
    logs = [tmp_path / f"node{node}.log" for node in (0, 1)]  # files: a full pipe would block
    nodes = []
    for node, log in enumerate(logs):
        with open(log, "w") as out:
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                 f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                 f"--master_port={port}", "-m", "tessera", "train", *overrides],
                stdout=out, stderr=subprocess.STDOUT))
    try:
        for proc in nodes:
            proc.wait(timeout=300)
    finally:
        for proc in nodes:
            if proc.poll() is None:
                proc.kill()
    outputs = [log.read_text() for log in logs]
    for node, proc in enumerate(nodes):
        assert proc.returncode == 0, f"node {node}:\n{outputs[node]}"
    assert "tessera: world=2 dp=2" in outputs[0]  # one job over both invocations
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2, 3, 4]
    latest = run_dir / "checkpoints" / checkpoint.latest_tag(run_dir / "checkpoints")
    assert latest.name == "step-00000004"
    assert sorted(p.name for p in (latest / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
