"""No host synchronization per micro-batch: reading a tensor's value on the host (`.item()`,
`float(t)`, `bool(t)`, ...) waits for the GPU to drain its queue. A step may do it a fixed
number of times (its loss, its gradient norm, on CPU AdamW's step counters), never once per
micro-batch. tests/gpu/ checks the same on CUDA with torch's sync debug mode."""

import pytest
import torch
from multiproc import run_ranks

from tessera.trainer.config import load_config

# Tensor methods that copy a value to the host, so wait for the device.
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


def count_host_reads(fn) -> int:
    """How many HOST_READS `fn()` makes (counted by wrapping them on torch.Tensor)."""
    count = [0]
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(original):
        def wrapper(self, *args, **kwargs):
            count[0] += 1
            return original(self, *args, **kwargs)
        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return count[0]


def reads_per_step(overrides: dict, micro_batch_counts: tuple[int, ...]) -> list[int]:
    """Rank body: the host reads of one train_step (after two warm-up steps) per micro-batch
    count, with the same micro-batch size."""
    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.train import build_training_engine, train_step

    counts = []
    for micro_batches in micro_batch_counts:
        values = {"model.vocab_size": 257, "model.seq_len": 32, "train.micro_batch_size": 2,
                  "train.global_batch_size": 2 * micro_batches, **overrides}
        cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
        topo = init_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp)
        try:
            engine, _, clipper = build_training_engine(cfg, topo)
            tokens = torch.randint(0, 257, (micro_batches, 2, 33),
                                   generator=torch.Generator().manual_seed(0))
            batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
            for _ in range(2):
                train_step(engine, clipper, iter(batches), micro_batches)
            counts.append(count_host_reads(
                lambda: train_step(engine, clipper, iter(batches), micro_batches)))
        finally:
            destroy_distributed(process_group_too=False)
    return counts


@pytest.mark.parametrize("overrides", [
    {"parallel.zero_stage": 0},  # our clipper
    {"parallel.zero_stage": 2},  # DeepSpeed's ZeRO optimizer and its grad norm
], ids=["zero0", "zero2"])
def test_host_reads_do_not_grow_with_micro_batches(overrides):
    two, six = run_ranks(1, reads_per_step, overrides, (2, 6))[0]
    assert two > 0  # the counting works: the step reads its loss
    assert two == six, f"{two} host reads at 2 micro-batches, {six} at 6"
