"""Activation memory with and without activation checkpointing (`train.activation_checkpointing`).

Each mode runs in a fresh process: one forward and backward of the Llama (one rank, CPU). The
figure is the growth of the process's peak resident memory over that step, past the model and
its gradient buffers: the activations kept for backward. Losses and gradients must be equal.

Run: .venv/bin/python bench/activation_memory.py [--layers 8 --hidden 256 --seq 1024 --batch 8]
"""

from __future__ import annotations

import argparse
import resource
import sys

from common import in_fresh_process


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(mode: str, layers: int, hidden: int, seq: int, batch: int) -> dict:
    """In this process: forward + backward once; returns peak growth (MB), loss, grad checksum."""
    import torch

    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.config import ModelConfig
    from tessera.trainer.model import build_model, init_weights

    init_distributed(tp=1, pp=1)
    cfg = ModelConfig(vocab_size=512, hidden_size=hidden, num_layers=layers, num_heads=4,
                      num_kv_heads=4, ffn_hidden_size=3 * hidden, seq_len=seq)
    model, _ = build_model(cfg, tp=1, checkpoint_activations=mode == "full")
    init_weights(model, cfg, seed=0)
    tokens = torch.randint(0, 512, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    for param in model.parameters():  # allocate gradient buffers before the baseline
        param.grad = torch.zeros_like(param)
    baseline_mb = _peak_rss_mb()
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    growth_mb = _peak_rss_mb() - baseline_mb
    checksum = sum(float(p.grad.double().abs().sum()) for p in model.parameters())
    destroy_distributed()
    return {"mode": mode, "growth_mb": growth_mb, "loss": loss.item(), "grad_checksum": checksum}


def compare(layers: int, hidden: int, seq: int, batch: int) -> tuple[dict, dict]:
    none = in_fresh_process("activation_memory", "measure", "none", layers, hidden, seq, batch)
    full = in_fresh_process("activation_memory", "measure", "full", layers, hidden, seq, batch)
    return none, full


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    a = parser.parse_args()
    none, full = compare(a.layers, a.hidden, a.seq, a.batch)
    print(f"layers={a.layers} hidden={a.hidden} seq={a.seq} batch={a.batch}")
    print(f"activation memory (peak RSS growth over one step): none {none['growth_mb']:.0f} MB, "
          f"full {full['growth_mb']:.0f} MB, "
          f"ratio full/none {full['growth_mb'] / none['growth_mb']:.2f}")
    equal = none["loss"] == full["loss"] and none["grad_checksum"] == full["grad_checksum"]
    print(f"loss none {none['loss']!r} full {full['loss']!r}; equal: {equal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
