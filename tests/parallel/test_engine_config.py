"""The DeepSpeed config generated from ours."""

from tessera.parallel.engine import EngineOptions, deepspeed_config


def options(**changes) -> EngineOptions:
    fields = dict(global_batch_size=8, micro_batch_size=4, grad_clip=1.0, precision="fp32",
                  zero_stage=0)
    return EngineOptions(**{**fields, **changes})


def test_gradient_reduction_overlaps_backward_only_on_gpus_with_data_parallel_peers():
    zero2 = options(zero_stage=2)
    overlapped = deepspeed_config(zero2, dp=2, cuda=True)["zero_optimization"]
    assert overlapped["overlap_comm"] and overlapped["contiguous_gradients"]
    for dp, cuda in ((2, False), (1, True)):
        assert "overlap_comm" not in deepspeed_config(zero2, dp=dp, cuda=cuda)["zero_optimization"]
    no_zero = deepspeed_config(options(zero_stage=0), dp=2, cuda=True)
    assert "overlap_comm" not in no_zero["zero_optimization"]


def test_batch_sizes_come_from_ours():
    ds = deepspeed_config(options(global_batch_size=32, micro_batch_size=4), dp=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"]) == (32, 4, 4)


def test_we_clip_only_where_deepspeed_does_not():
    assert options(zero_stage=0, precision="fp32").clips_own_gradients()
    assert deepspeed_config(options(zero_stage=0), dp=1)["gradient_clipping"] == 0.0
    assert not options(zero_stage=1).clips_own_gradients()
    assert not options(precision="bf16").clips_own_gradients()
    assert deepspeed_config(options(zero_stage=1, grad_clip=0.5), dp=1)["gradient_clipping"] == 0.5


def test_zero3_gathers_the_leaf_module_whole():
    class Block:
        pass

    zero = deepspeed_config(options(zero_stage=3, leaf_module=Block), dp=2)["zero_optimization"]
    assert zero["leaf_module"]["classes"] == [f"{Block.__module__}.{Block.__qualname__}"]
    assert "leaf_module" not in deepspeed_config(options(zero_stage=2, leaf_module=Block),
                                                 dp=2)["zero_optimization"]
