"""What only a GPU can show: one rank with nccl and bf16, CUDA checkpoints and generation, the
kernels SDPA picks, host syncs, bf16 against fp32, and two ranks sharing one GPU for sequence
parallelism. `make gpu-check` runs these (and bench/mfu.py) in one call.

Without CUDA they are skipped. TESSERA_GPU_TESTS_ON_CPU=1 runs their logic on the CPU (gloo,
bf16 where DeepSpeed allows it) so that a GPU minute is not spent on a typo; the checks that
read CUDA itself (kernel names, sync debug mode, two processes on one device) still skip.
TESSERA_GPU_REPORT_DIR, when set, receives each measured figure as JSON for the report.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from multiproc import run_ranks
from training import losses, read_metrics, tiny_config, train_each

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA and os.environ.get("TESSERA_GPU_TESTS_ON_CPU") != "1",
                       reason="needs CUDA"),
]
needs_cuda_itself = pytest.mark.skipif(not CUDA, reason="reads CUDA itself")
BACKEND = "nccl" if CUDA else "gloo"
# A model big enough to run real kernels, small enough for seconds per run.
GPU_MODEL = {
    "model.hidden_size": 256, "model.num_layers": 4, "model.num_heads": 4,
    "model.num_kv_heads": 2, "model.ffn_hidden_size": 704, "model.seq_len": 128,
    "train.global_batch_size": 16, "train.micro_batch_size": 4, "train.lr": 1e-3,
    "train.min_lr": 1e-4, "train.warmup_steps": 2, "data.streams": 4,
}
# bf16 against fp32 over 50 steps, same data and initial weights: each step's loss within 0.05
# nats, the mean difference over the 50 steps within 0.02. The small synthetic set is learned
# fast (5.5 to about 1 nat), so relative differences grow late; nats compare steps fairly. On a
# CPU (TESSERA_GPU_TESTS_ON_CPU) ZeRO 1 bf16 ran at most 0.004 nats from fp32, 0.002 on average;
# ZeRO 0 bf16 0.11 and 0.043.
BF16_STEP_ATOL, BF16_MEAN_ATOL = 0.05, 0.02


def gpu_config(run_dir: Path, shards: Path, **overrides):
    return tiny_config(run_dir, shards, **{**GPU_MODEL, "train.precision": "bf16", **overrides})


def report(name: str, figures: dict) -> None:
    """Hand a measured figure to `make gpu-check`'s report."""
    directory = os.environ.get("TESSERA_GPU_REPORT_DIR")
    if directory:
        Path(directory, f"{name}.json").write_text(json.dumps(figures, indent=1))


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, byte_shards) -> dict:
    """6 steps straight; 3 + resume + 3 with synchronous and with asynchronous checkpoints."""
    base = tmp_path_factory.mktemp("gpu-runs")
    names = ["straight", "sync-first", "sync-second", "async-first", "async-second"]
    configs = [
        gpu_config(base / "straight", byte_shards, **{"train.steps": 6}),
        gpu_config(base / "sync", byte_shards, **{"train.steps": 6, "train.stop_at": 3}),
        gpu_config(base / "sync", byte_shards, **{"train.steps": 6}),
        gpu_config(base / "async", byte_shards,
                   **{"train.steps": 6, "train.stop_at": 3, "checkpoint.async": True}),
        gpu_config(base / "async", byte_shards, **{"train.steps": 6, "checkpoint.async": True}),
    ]
    rows = run_ranks(1, train_each, configs, backend=BACKEND)[0]
    return {"configs": dict(zip(names, configs)), "rows": dict(zip(names, rows))}


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_bf16_run_resumes_bitwise(bf16_runs, kind):
    straight, resumed = bf16_runs["rows"]["straight"], bf16_runs["rows"][f"{kind}-second"]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert losses(resumed) == losses(straight)  # bitwise, bf16 on the GPU
    assert all(math.isfinite(loss) for loss in losses(straight))
    assert losses(straight)[-1] < losses(straight)[0]


def test_to_hf_from_a_bf16_gpu_checkpoint(bf16_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.convert import to_hf
    from tessera.trainer.convert.reader import load_canonical_state
    from tessera.trainer.generate import build_generator, find_step_dir

    run_dir = bf16_runs["configs"]["straight"].run.dir
    to_hf(run_dir, tmp_path / "hf")
    device = "cuda" if CUDA else "cpu"
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    hf_model = hf_model.to(device).eval()
    cfg, tensors = load_canonical_state(find_step_dir(run_dir))
    ids_BS = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    init_distributed(1, 1, "gloo")
    try:
        ours = build_generator(cfg, tensors)
        with torch.no_grad():
            ours_BSV = ours.logits(ids_BS.to(device)).transpose(0, 1).float()
            hf_BSV = hf_model(ids_BS.to(device)).logits.float()
    finally:
        destroy_distributed()
    kl = torch.nn.functional.kl_div(ours_BSV.log_softmax(-1), hf_BSV.log_softmax(-1),
                                    log_target=True, reduction="batchmean").item() / ids_BS.shape[1]
    report("to_hf_kl", {"mean_kl": kl, "device": device})
    assert kl < 1e-6, f"mean KL {kl:.3e} between transformers and Tessera on {device}"


def test_generate_on_cuda(bf16_runs):
    from tessera.trainer.generate import Sampling, generate

    run_dir = bf16_runs["configs"]["straight"].run.dir
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    text = generate(run_dir, "the model reads", Sampling(max_new_tokens=16))
    assert isinstance(text, str)
    if CUDA:
        assert torch.cuda.max_memory_allocated() > 0, "generate did not run on the GPU"


def attention_kernels(dtype: torch.dtype) -> list[str]:
    """Names of the CUDA kernels of one block's forward and backward, at the GPU config's shape,
    with SDPA left to choose its own kernel (as training does)."""
    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.config import ModelConfig
    from tessera.trainer.model import build_model, init_weights

    cfg = ModelConfig(vocab_size=257, hidden_size=256, num_layers=1, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=704, seq_len=128)
    init_distributed(1, 1, "gloo")
    try:
        model, _ = build_model(cfg, tp=1)
        init_weights(model, cfg, 0)
        block = model.blocks[0].to(device="cuda", dtype=dtype)  # as DeepSpeed casts in bf16
        x_SBH = torch.randn(128, 4, 256, device="cuda", dtype=dtype, requires_grad=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            block(x_SBH).float().sum().backward()
            torch.cuda.synchronize()
    finally:
        destroy_distributed()
    return sorted({event.name for event in prof.events()
                   if event.device_type == torch.autograd.DeviceType.CUDA})


# Fused flash-attention kernels by their names: PyTorch's FlashAttention-2 (pytorch_flash::
# flash_fwd_kernel...) or cuDNN's (cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma...,
# which SDPA picked on an H200 with torch 2.11). The memory-efficient kernel (fmha_cutlass...,
# efficient_attention...) and the math path (softmax and bmm kernels) are not.
FLASH_KERNEL = re.compile(r"pytorch_flash::flash_|flash_fwd|cudnn\w*sdpa\w*flash_fprop", re.I)


@needs_cuda_itself
def test_sdpa_chooses_a_flash_kernel_in_bf16():
    names = attention_kernels(torch.bfloat16)
    attention = [n for n in names if re.search(r"flash|attention|fmha|sdpa", n, re.I)]
    flash = [n for n in attention if FLASH_KERNEL.search(n)]
    report("sdpa_kernels", {"bf16_attention_kernels": attention, "flash_forward": flash})
    assert flash, f"no flash-attention forward kernel ran; attention kernels: {attention}"


def micro_batch_sync_warnings(micro_batch_counts: tuple[int, ...]) -> list[Counter]:
    """Rank body: CUDA's synchronizing calls of one bf16 train_step (after warm-up), counted by
    torch's sync debug mode per calling line, per micro-batch count."""
    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.config import load_config
    from tessera.trainer.train import build_training_engine, train_step

    counts = []
    for micro_batches in micro_batch_counts:
        values = {**GPU_MODEL, "model.vocab_size": 257, "train.precision": "bf16",
                  "parallel.zero_stage": 1, "train.global_batch_size": 4 * micro_batches}
        cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
        topo = init_distributed(1, 1)
        try:
            engine, _, clipper = build_training_engine(cfg, topo)
            tokens = torch.randint(0, 257, (micro_batches, 4, 129),
                                   generator=torch.Generator().manual_seed(0))
            batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
            for _ in range(2):
                train_step(engine, clipper, iter(batches), micro_batches)
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    train_step(engine, clipper, iter(batches), micro_batches)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            counts.append(Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs))
        finally:
            destroy_distributed(process_group_too=False)
    return counts


@needs_cuda_itself
def test_no_host_sync_per_micro_batch_on_cuda():
    """A sync per micro-batch would add 4 between 2 and 6 micro-batches; one more or fewer is
    the caching allocators' (a new pinned host block at times)."""
    two, six = run_ranks(1, micro_batch_sync_warnings, (2, 6), backend=BACKEND)[0]
    report("host_syncs_per_step", {"micro_batches_2": dict(two), "micro_batches_6": dict(six)})
    assert abs(six.total() - two.total()) <= 1, f"2 micro-batches: {two}; 6: {six}"


def test_bf16_follows_fp32_for_50_steps(tmp_path, byte_shards):
    """ZeRO 1 (DeepSpeed's BF16_Optimizer: fp32 masters, fp32 gradient accumulation) is held to
    the tolerance; ZeRO 0 in bf16 (DeepSpeed accumulates the micro-batches' gradients in bf16)
    is measured beside it for the report."""
    runs = {"fp32": {"train.precision": "fp32", "parallel.zero_stage": 1},
            "bf16": {"train.precision": "bf16", "parallel.zero_stage": 1},
            "bf16-zero0": {"train.precision": "bf16", "parallel.zero_stage": 0}}
    configs = [gpu_config(tmp_path / name, byte_shards, **{"train.steps": 50}, **overrides)
               for name, overrides in runs.items()]
    curves = dict(zip(runs, map(losses, run_ranks(1, train_each, configs, backend=BACKEND)[0])))
    fp32 = curves["fp32"]
    figures = {"step_atol": BF16_STEP_ATOL, "mean_atol": BF16_MEAN_ATOL, "curves": curves}
    for name in ("bf16", "bf16-zero0"):
        step_diff = [abs(b - f) for b, f in zip(curves[name], fp32)]
        figures[name] = {"max_step_diff": max(step_diff),
                         "mean_diff": sum(step_diff) / len(step_diff)}
    report("bf16_vs_fp32", figures)
    assert len(curves["bf16"]) == 50 and fp32[-1] < 0.7 * fp32[0]  # it learned
    assert figures["bf16"]["max_step_diff"] <= BF16_STEP_ATOL, figures["bf16"]
    assert figures["bf16"]["mean_diff"] <= BF16_MEAN_ATOL, figures["bf16"]


def test_compiled_and_chunked_loss_train_as_eager_on_the_gpu(tmp_path, byte_shards):
    """fp32 (TF32 matmuls on CUDA), 10 steps: compiled blocks and the chunked loss within 1e-3
    of the eager whole-logits run."""
    variants = {"eager": {}, "compiled": {"train.compile": True},
                "chunked": {"train.loss_chunk_tokens": 200}}
    configs = [gpu_config(tmp_path / name, byte_shards, **{"train.precision": "fp32",
                                                            "train.steps": 10, **overrides})
               for name, overrides in variants.items()]
    runs = dict(zip(variants, run_ranks(1, train_each, configs, backend=BACKEND)[0]))
    for name in ("compiled", "chunked"):
        assert losses(runs[name]) == pytest.approx(losses(runs["eager"]), rel=1e-3), name


def train_sharing_one_gpu(configs) -> list | None:
    """Rank body: every rank on GPU 0 (DeepSpeed sets the device from LOCAL_RANK)."""
    os.environ["LOCAL_RANK"] = "0"
    torch.cuda.set_device(0)
    return train_each(configs)


@needs_cuda_itself
def test_tp2_sequence_parallel_on_two_ranks_sharing_one_gpu(tmp_path, byte_shards):
    """NCCL refuses two ranks on one device; gloo carries the CUDA tensors between them."""
    fp32 = {"train.precision": "fp32", "train.steps": 10, "launch.backend": "gloo"}
    (single,) = run_ranks(1, train_each, [gpu_config(tmp_path / "tp1", byte_shards, **fp32)],
                          backend="gloo")[0]
    configs = [gpu_config(tmp_path / name, byte_shards, **fp32, **{"parallel.tp": 2, **o})
               for name, o in (("tp2", {}), ("tp2-sp", {"parallel.sequence_parallel": True}))]
    tp2, tp2_sp = run_ranks(2, train_sharing_one_gpu, configs, backend="gloo")[0]
    report("tp2_sequence_parallel", {"tp1": losses(single), "tp2": losses(tp2),
                                     "tp2_sequence_parallel": losses(tp2_sp)})
    assert losses(tp2) == pytest.approx(losses(single), rel=1e-3)
    assert losses(tp2_sp) == pytest.approx(losses(tp2), rel=1e-3)


def test_metrics_report_mfu_on_the_gpu(bf16_runs):
    rows = read_metrics(bf16_runs["configs"]["straight"].run.dir)
    if CUDA:
        assert rows[-1]["throughput/mfu"] > 0


def flex_and_dense_on_cuda() -> dict:
    """One rank on the GPU: a packed bf16 batch's loss and first-block gradient through
    FlexAttention's block mask (the CUDA path of document masking) and through SDPA's dense
    mask; and the step time of each."""
    import time

    import tessera.trainer.model as model_module
    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.config import ModelConfig
    from tessera.trainer.model import build_model, document_ids, init_weights

    cfg = ModelConfig(vocab_size=512, hidden_size=256, num_layers=4, num_heads=4,
                      num_kv_heads=2, ffn_hidden_size=704, seq_len=2048)
    init_distributed(tp=1, pp=1)
    try:
        model, _ = build_model(cfg, tp=1)
        init_weights(model, cfg, seed=7)
        model = model.cuda()
        generator = torch.Generator().manual_seed(1)
        window = torch.randint(0, 511, (4, cfg.seq_len + 1), generator=generator)
        window[torch.rand(window.shape, generator=generator) < 1 / 256] = 511  # EOS
        window = window.cuda()
        inputs = (window[:, :-1], document_ids(window[:, :-1], 511))
        results = {}
        for name, flex in (("dense", False), ("flex", True)):
            model_module.uses_flex_attention = lambda device, flex=flex: flex
            times = []
            for _ in range(4):
                model.zero_grad()
                torch.cuda.synchronize()
                started = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(inputs, window[:, 1:])
                loss.backward()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            results[name] = {"loss": loss.item(), "step_s": min(times[1:]),
                             "grad": model.blocks[0].qkv.weight.grad.float().cpu()}
        return results
    finally:
        destroy_distributed(process_group_too=False)


@needs_cuda_itself
def test_document_masking_flex_attention_on_cuda():
    (results,) = run_ranks(1, flex_and_dense_on_cuda, backend=BACKEND)
    dense, flex = results["dense"], results["flex"]
    report("document_masking_flex", {"flex_step_s": flex["step_s"],
                                     "dense_step_s": dense["step_s"],
                                     "loss_rel_diff": abs(flex["loss"] - dense["loss"])
                                     / dense["loss"]})
    assert flex["loss"] == pytest.approx(dense["loss"], rel=1e-2)  # bf16 kernels differ
    cosine = torch.nn.functional.cosine_similarity(flex["grad"].flatten(),
                                                   dense["grad"].flatten(), dim=0)
    assert cosine > 0.99


def flight_recorded_all_reduce() -> list[dict]:
    """Run in a rank: one all-reduce on the rank's device, then torch's Flight Recorder trace as
    a hang's report writes it."""
    import pickle

    import torch.distributed as dist

    from tessera.launch.watchdog import flight_recorder_trace

    dist.all_reduce(torch.ones(8, device="cuda" if CUDA else "cpu"))
    if CUDA:
        torch.cuda.synchronize()
    return pickle.loads(flight_recorder_trace())["entries"]


def test_the_hang_report_holds_the_flight_recorder_trace_of_nccl(monkeypatch):
    """A hang writes torch's Flight Recorder trace (launch/watchdog.py): with NCCL, NCCL's own
    record, as on CPU gloo's (tests/launch/test_resilience.py)."""
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "64")  # as a run with hang_timeout_s sets it
    entries = run_ranks(1, flight_recorded_all_reduce, backend=BACKEND)[0]
    names = [entry["profiling_name"] for entry in entries]
    report("flight_recorder", {"profiling_names": names})
    assert f"{BACKEND}:all_reduce" in names, names
