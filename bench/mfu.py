"""Model FLOPs utilization of one GPU: Tessera's training step against a plain PyTorch loop.

Side by side in one process, on random token ids (nothing but the model and the trainer is
measured), at the config's sequence length:

  tessera            `build_training_engine` + `train_step`, exactly as `tessera train` runs them
                     (megatron-core layers, DeepSpeed engine, bf16)
  tessera-chunked    the same engine with train.loss_chunk_tokens (the memory-lean loss)
  tessera-compiled   the same engine after `compile_blocks`, what train.compile=true applies
  tessera-compiled-chunked  both
  plain              bench/plain_llama.py: the same shapes in plain torch.nn, fp32 weights under
                     bf16 autocast, fused AdamW (a careful PyTorch user's eager loop)

The Tessera variants share one engine (built once: a 1B model's seeded initialization takes
seconds); each variant's figures start after its own warm-up steps (compilation included).
Attention runs through torch SDPA pinned to its flash kernel (`--sdpa`), so a fall-back to the
math kernel is an error rather than a slow figure.

  FLOPs per token = 6 N + 12 L d T  (tessera.trainer.metrics.flops_per_token)
  MFU = tokens/s x FLOPs per token / the device's dense bf16 peak (H100/H200: 989 TFLOP/s)

Run on a GPU: python bench/mfu.py [--config configs/llama-1b-1gpu.yaml] [--steps 5 --warmup 2]
              [--variants tessera,plain] [--json out.json] [dotted.key=value ...]
On a CPU:     python bench/mfu.py --smoke   (a tiny model, to show the script runs)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path

from common import machine, random_token_steps, write_json

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "llama-1b-1gpu.yaml"
VARIANTS = ("tessera", "tessera-chunked", "tessera-compiled", "tessera-compiled-chunked", "plain")
SMOKE = {
    "model.vocab_size": 512, "model.hidden_size": 64, "model.num_layers": 2,
    "model.num_heads": 4, "model.num_kv_heads": 2, "model.ffn_hidden_size": 176,
    "model.seq_len": 64, "train.micro_batch_size": 2, "train.global_batch_size": 4,
}
LOSS_CHUNK_TOKENS = 4096  # tessera-chunked, unless the config sets train.loss_chunk_tokens


def sdpa_backend(name: str, device_type: str):
    """A context pinning SDPA to one kernel (an error if it cannot run), or none for `any`."""
    if name == "any" or device_type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    return sdpa_kernel([backend])


def time_steps(step_fn, data: list[list[tuple]], steps: int, warmup: int) -> dict:
    """Seconds per step after `warmup` steps, the losses, and the peak GPU memory."""
    import torch

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step_s, losses = [], []
    for index in range(warmup + steps):
        if on_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = step_fn(data[index % len(data)])
        if on_gpu:
            torch.cuda.synchronize()
        if index >= warmup:
            step_s.append(time.perf_counter() - started)
        losses.append(loss)
    memory_gib = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    return {"step_s": step_s, "losses": losses, "max_memory_gib": memory_gib}


def measure_tessera(cfg, data, variants: list[str], steps: int, warmup: int) -> dict[str, dict]:
    """The Tessera variants on one engine, in the order of VARIANTS."""
    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.model import ChunkedLoss, compile_blocks, lm_loss
    from tessera.trainer.train import build_training_engine, train_step

    topo = init_distributed(tp=1, pp=1, backend=cfg.launch.backend)
    try:
        engine, _, clipper = build_training_engine(cfg, topo)
        model = engine.module
        chunk = cfg.train.loss_chunk_tokens or LOSS_CHUNK_TOKENS
        chunked = ChunkedLoss(cfg.model.vocab_size, False, chunk)
        results, compiled = {}, False
        for variant in [v for v in VARIANTS if v in variants and v != "plain"]:
            model.loss = chunked if "chunked" in variant else lm_loss
            if "compiled" in variant and not compiled:
                compile_blocks(model)
                compiled = True
            started = time.perf_counter()
            results[variant] = time_steps(
                lambda batches: train_step(engine, clipper, iter(batches), len(batches))[0],
                data, steps, warmup)
            results[variant]["wall_s"] = time.perf_counter() - started
            print(f"  {variant}: median step {statistics.median(results[variant]['step_s']):.3f} s,"
                  f" peak {results[variant]['max_memory_gib'] or 0:.1f} GiB, "
                  f"{results[variant]['wall_s']:.0f} s with warm-up", flush=True)
    finally:
        destroy_distributed()
        gc.collect()
    return results


def measure_plain(cfg, data, steps: int, warmup: int) -> dict:
    import torch
    from plain_llama import PlainLlama, param_groups

    from tessera.trainer.optim import build_scheduler

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = PlainLlama(cfg.model).to(device)
    with torch.no_grad():  # the same distribution as Tessera's initialization
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, cfg.model.init_std)
    t = cfg.train
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr,
                                  betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                  fused=device == "cuda")
    scheduler = build_scheduler(optimizer, t)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=t.precision == "bf16")

    def step(batches: list[tuple]) -> float:
        loss_sum = torch.zeros((), device=device)
        for input_ids, labels in batches:
            with autocast:
                loss = model(input_ids.to(device, non_blocking=True),
                             labels.to(device, non_blocking=True))
            (loss / len(batches)).backward()
            loss_sum += loss.detach()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return (loss_sum / len(batches)).item()

    started = time.perf_counter()
    result = time_steps(step, data, steps, warmup)
    result["wall_s"] = time.perf_counter() - started
    print(f"  plain: median step {statistics.median(result['step_s']):.3f} s", flush=True)
    return result


def figures(cfg, result: dict, peak_tflops: float | None) -> dict:
    from tessera.trainer.architecture import flops_per_token, non_embedding_params

    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
    median_s = statistics.median(result["step_s"])
    tokens_per_s = tokens_per_step / median_s
    tflops = tokens_per_s * flops_per_token(cfg.model) / 1e12
    return {
        "tokens_per_step": tokens_per_step,
        "params_N_without_input_embedding": non_embedding_params(cfg.model),
        "flops_per_token": flops_per_token(cfg.model),
        "median_step_s": median_s,
        "tokens_per_s": tokens_per_s,
        "tflops": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        "max_memory_gib": result["max_memory_gib"],
        "first_loss": result["losses"][0],
        "last_loss": result["losses"][-1],
        "steps_timed": len(result["step_s"]),
        "wall_s": result["wall_s"],
    }


def run(cfg, variants: list[str], steps: int, warmup: int, sdpa: str,
        peak_override: float | None) -> dict:
    import torch

    from tessera.trainer.metrics import peak_by_name

    micro_batches = cfg.train.global_batch_size // cfg.train.micro_batch_size
    data = random_token_steps(cfg, min(4, steps + warmup), micro_batches, seed=cfg.run.seed)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.cuda.get_device_name() if device_type == "cuda" else "cpu"
    peak = peak_override or (peak_by_name(device) if device_type == "cuda" else None)
    with sdpa_backend(sdpa, device_type):
        results = measure_tessera(cfg, data, variants, steps, warmup)
        if "plain" in variants:
            results["plain"] = measure_plain(cfg, data, steps, warmup)
    rows = {name: figures(cfg, result, peak) for name, result in results.items()}
    if "plain" in rows:
        for row in rows.values():
            row["tokens_per_s_vs_plain"] = row["tokens_per_s"] / rows["plain"]["tokens_per_s"]
    return {
        "device": device, "peak_tflops": peak, "sdpa": sdpa, "variants": rows,
        "model": {k: getattr(cfg.model, k) for k in (
            "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
            "seq_len", "vocab_size", "tie_embeddings")},
        "train": {k: getattr(cfg.train, k) for k in (
            "micro_batch_size", "global_batch_size", "precision", "activation_checkpointing")},
        "loss_chunk_tokens": cfg.train.loss_chunk_tokens or LOSS_CHUNK_TOKENS,
        "zero_stage": cfg.parallel.zero_stage,
    }


def print_rows(result: dict) -> None:
    m = result["model"]
    print(f"{result['device']}: seq {m['seq_len']}, "
          f"{result['train']['global_batch_size'] * m['seq_len']} tokens/step, "
          f"micro-batch {result['train']['micro_batch_size']}, SDPA {result['sdpa']}")
    for name, row in result["variants"].items():
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        ratio = row.get("tokens_per_s_vs_plain")
        print(f"  {name:<17} {row['tokens_per_s']:>9.0f} tokens/s  {row['tflops']:7.1f} TFLOP/s"
              f"  MFU {mfu:>6}  peak {row['max_memory_gib'] or 0:5.1f} GiB"
              f"  loss {row['last_loss']:.3f}"
              + (f"  x{ratio:.3f} of plain" if ratio is not None else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--sdpa", choices=("flash", "cudnn", "efficient", "any"), default="flash",
                        help="SDPA kernel to pin on CUDA (default: flash)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, if not in the table")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model and 1+1 steps: checks that the script runs (CPU)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = parser.parse_args()

    from tessera.launch.env import quiet_dependencies
    from tessera.trainer.config import ConfigError, load_config, validate

    quiet_dependencies()
    overrides = list(args.overrides)
    variants = args.variants.split(",")
    if args.smoke:
        overrides = [f"{k}={v}" for k, v in SMOKE.items()] + overrides
        args.steps, args.warmup = min(args.steps, 1), min(args.warmup, 1)
    try:
        unknown = set(variants) - set(VARIANTS)
        if unknown:
            raise ConfigError(f"--variants: unknown {sorted(unknown)}; choose from {VARIANTS}")
        cfg = load_config(args.config, overrides)
        validate(cfg, world_size=1)
        if cfg.model.vocab_size is None:
            raise ConfigError("config key 'model.vocab_size': bench/mfu.py trains on random "
                              "tokens, so the vocabulary size must be set")
        result = run(cfg, variants, args.steps, args.warmup, args.sdpa, args.peak_tflops)
    except ConfigError as e:
        print(f"bench/mfu.py: {e}", file=sys.stderr)
        return 2
    result["machine"] = machine()
    print_rows(result)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
