"""The DeepSpeed config generated from ours."""

from tessera.parallel.engine import deepspeed_config
from tessera.trainer.config import load_config


def config(**overrides):
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def test_gradient_reduction_overlaps_backward_only_on_gpus_with_data_parallel_peers():
    cfg = config(**{"parallel.zero_stage": 2})
    overlapped = deepspeed_config(cfg, dp=2, cuda=True)["zero_optimization"]
    assert overlapped["overlap_comm"] and overlapped["contiguous_gradients"]
    for dp, cuda in ((2, False), (1, True)):
        assert "overlap_comm" not in deepspeed_config(cfg, dp=dp, cuda=cuda)["zero_optimization"]
    no_zero = deepspeed_config(config(**{"parallel.zero_stage": 0}), dp=2, cuda=True)
    assert "overlap_comm" not in no_zero["zero_optimization"]


def test_batch_sizes_come_from_ours():
    cfg = config(**{"train.global_batch_size": 32, "train.micro_batch_size": 4})
    ds = deepspeed_config(cfg, dp=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"]) == (32, 4, 4)
