"""Model FLOPs utilization: N training steps of a Llama on one GPU; tokens/s, TFLOP/s and MFU.

Tessera's own training step (`build_training_engine` + `train_step`, exactly as `tessera train`
runs it: megatron-core layers, DeepSpeed engine, bf16) on random token ids, so nothing but the
model and the trainer is measured. Attention goes through torch SDPA pinned to its flash kernel
(`--sdpa`), so a silent fall-back to the math kernel is an error instead of a slow figure.

  FLOPs per token = 6 N + 12 L d T  (PaLM's count: matmuls forward and backward, plus attention
  scores and values; N = parameters except the input embedding, the output head counted once
  even when tied; L layers, d = hidden size, T = sequence length)
  MFU = tokens/s x FLOPs per token / peak, the peak taken from the device name (dense bf16).

Run on a GPU: .venv/bin/python bench/mfu.py [--config configs/llama-1b-1gpu.yaml]
              [--steps 20 --warmup 3] [--json out.json] [dotted.key=value ...]
On a CPU:     .venv/bin/python bench/mfu.py --smoke   (a tiny model, to show the script runs)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

from common import machine, random_token_steps, write_json

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "llama-1b-1gpu.yaml"
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, matched against
# torch.cuda.get_device_name in this order (the first substring found wins).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
)
SMOKE = {
    "model.vocab_size": 512, "model.hidden_size": 64, "model.num_layers": 2,
    "model.num_heads": 4, "model.num_kv_heads": 2, "model.ffn_hidden_size": 176,
    "model.seq_len": 64, "train.micro_batch_size": 2, "train.global_batch_size": 4,
}


def peak_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def model_flops_per_token(model) -> tuple[float, int]:
    """(6N + 12 L d T, N) from the config; N leaves out the input embedding."""
    hidden, ffn, layers = model.hidden_size, model.ffn_hidden_size, model.num_layers
    head_dim = model.head_dim
    per_block = (
        hidden * (model.num_heads + 2 * model.num_kv_heads) * head_dim  # qkv
        + model.num_heads * head_dim * hidden  # attention output
        + 3 * hidden * ffn  # gate, up, down
        + 2 * hidden  # two norms
    )
    n = layers * per_block + hidden + model.vocab_size * hidden  # + final norm + output head
    return 6 * n + 12 * layers * hidden * model.seq_len, n


def sdpa_backend(name: str, device_type: str):
    """A context pinning SDPA to one kernel (an error if it cannot run), or none for `any`."""
    if name == "any" or device_type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    return sdpa_kernel([backend])


def random_steps(cfg, count: int) -> list[list[tuple]]:
    """`count` distinct steps of host (CPU, int64) micro-batches, as the loader hands them over."""
    micro = cfg.train.global_batch_size // cfg.train.micro_batch_size
    return random_token_steps(cfg, count, micro, seed=cfg.run.seed)


def measure(cfg, steps: int, warmup: int, sdpa: str) -> dict:
    import torch

    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.config import ConfigError, validate, validate_layout
    from tessera.trainer.train import build_training_engine, train_step

    validate(cfg)
    topo = init_distributed(tp=1, pp=1, backend=cfg.launch.backend)
    try:
        validate_layout(cfg, topo.world_size)
        if topo.world_size != 1:
            raise ConfigError("bench/mfu.py measures one process on one device; run it alone")
        engine, _, clipper = build_training_engine(cfg, topo)
        on_gpu = engine.device.type == "cuda"
        data = random_steps(cfg, min(4, steps + warmup))
        micro = len(data[0])
        step_s, losses = [], []
        with sdpa_backend(sdpa, engine.device.type):
            for index in range(warmup + steps):
                if on_gpu:
                    torch.cuda.synchronize()
                started = time.perf_counter()
                loss, _ = train_step(engine, clipper, iter(data[index % len(data)]), micro)
                if on_gpu:
                    torch.cuda.synchronize()
                if index >= warmup:
                    step_s.append(time.perf_counter() - started)
                    losses.append(loss)
        memory_gb = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
        device = torch.cuda.get_device_name() if on_gpu else "cpu"
    finally:
        destroy_distributed()
    return {"step_s": step_s, "losses": losses, "device": device, "max_memory_gb": memory_gb}


def report(cfg, result: dict, peak_override: float | None) -> dict:
    flops_per_token, n = model_flops_per_token(cfg.model)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
    median_s = statistics.median(result["step_s"])
    tokens_per_s = tokens_per_step / median_s
    tflops = tokens_per_s * flops_per_token / 1e12
    peak = peak_override or peak_tflops(result["device"])
    return {
        "device": result["device"],
        "params_N_without_input_embedding": n,
        "flops_per_token": flops_per_token,
        "tokens_per_step": tokens_per_step,
        "median_step_s": median_s,
        "mean_step_s": statistics.fmean(result["step_s"]),
        "tokens_per_s": tokens_per_s,
        "tflops": tflops,
        "peak_tflops": peak,
        "mfu": tflops / peak if peak else None,
        "max_memory_gb": result["max_memory_gb"],
        "final_loss": result["losses"][-1],
        "steps_timed": len(result["step_s"]),
        "model": {k: getattr(cfg.model, k) for k in ("hidden_size", "num_layers", "num_heads",
                                                      "num_kv_heads", "ffn_hidden_size",
                                                      "seq_len", "vocab_size")},
        "train": {k: getattr(cfg.train, k) for k in ("micro_batch_size", "global_batch_size",
                                                      "precision", "activation_checkpointing")},
        "zero_stage": cfg.parallel.zero_stage,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--sdpa", choices=("flash", "cudnn", "efficient", "any"), default="flash",
                        help="SDPA kernel to pin on CUDA (default: flash)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, if not in the table")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model and 2+1 steps: checks that the script runs (CPU)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = parser.parse_args()

    from tessera.cli import quiet_dependencies
    from tessera.trainer.config import ConfigError, load_config

    quiet_dependencies()
    overrides = list(args.overrides)
    if args.smoke:
        overrides = [f"{k}={v}" for k, v in SMOKE.items()] + overrides
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    try:
        cfg = load_config(args.config, overrides)
        if cfg.model.vocab_size is None:
            raise ConfigError("config key 'model.vocab_size': bench/mfu.py trains on random "
                              "tokens, so the vocabulary size must be set")
        result = measure(cfg, args.steps, args.warmup, args.sdpa)
    except ConfigError as e:
        print(f"bench/mfu.py: {e}", file=sys.stderr)
        return 2
    figures = report(cfg, result, args.peak_tflops)
    figures["machine"] = machine()
    mfu = f"{100 * figures['mfu']:.1f}%" if figures["mfu"] is not None else \
        "n/a (no peak known for this device; pass --peak-tflops)"
    memory = f", max memory {figures['max_memory_gb']:.1f} GiB" if figures["max_memory_gb"] else ""
    print(f"{figures['device']}: N = {figures['params_N_without_input_embedding']:.4g} "
          f"(without the input embedding), {figures['flops_per_token']:.4g} FLOP/token, "
          f"{figures['tokens_per_step']} tokens/step")
    print(f"median step {figures['median_step_s']:.3f} s over {figures['steps_timed']} steps: "
          f"{figures['tokens_per_s']:.0f} tokens/s, {figures['tflops']:.4g} TFLOP/s, MFU {mfu}"
          f"{memory}; loss {figures['final_loss']:.3f}")
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
