"""The speed levers on a CPU: `train.compile` and `train.loss_chunk_tokens`, each against the
default, side by side in one run; and the cost of `data.document_masking` against plain causal
attention.

- compile: one process builds two engines of the same model (eager, compiled blocks) and times
  their steps interleaved (so a slower minute of the machine slows both). The compile cost is
  the compiled engine's first step minus its steady step; the speedup is the ratio of median
  steady steps. Losses must agree (1e-5 relative).
- chunked loss: with a 128k vocabulary at a small width the logits are the step's largest
  activation. Each mode runs one forward and backward in a fresh process; the figure is the
  growth of its peak resident memory over that step (the activations kept for backward plus
  what the loss allocates). Losses must agree (1e-6 relative).
- document masking: two engines of the same model, one fed its batches with document ids (a
  document ends every 64 tokens on average, at random), timed interleaved as for compile; the
  figure is masked tokens/s over causal tokens/s. On a CPU both run SDPA's math kernel: a
  [B, 1, S, S] mask against the causal flag, plus the per-row rotary tables.

Run: .venv/bin/python bench/speed_levers.py [--steps 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import bench_config, in_fresh_process, random_token_steps, write_json

COMPILE_MODEL = {
    "model.vocab_size": 512, "model.hidden_size": 256, "model.num_layers": 4,
    "model.num_heads": 4, "model.num_kv_heads": 4, "model.ffn_hidden_size": 704,
    "model.seq_len": 256, "train.micro_batch_size": 4, "train.global_batch_size": 8,
    "train.grad_clip": 0,
}
# Llama 3's vocabulary at a small width: 2 x 1,024 tokens of fp32 logits are 1 GiB.
LOSS_MODEL = {"vocab_size": 128256, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
              "num_kv_heads": 4, "ffn_hidden_size": 176, "seq_len": 1024}
LOSS_BATCH = 2
LOSS_CHUNK_TOKENS = 256


def measure_compile(steps: int) -> dict:
    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.train import build_training_engine, train_step

    topo = init_distributed(tp=1, pp=1)
    try:
        runners = {}
        for name, compiled in (("eager", False), ("compiled", True)):
            cfg = bench_config({**COMPILE_MODEL, "train.compile": compiled})
            engine, _, clipper = build_training_engine(cfg, topo)
            runners[name] = (engine, clipper)
        micro = COMPILE_MODEL["train.global_batch_size"] // COMPILE_MODEL["train.micro_batch_size"]
        data = random_token_steps(cfg, steps + 1, micro, seed=0)
        seconds = {name: [] for name in runners}
        losses = {name: [] for name in runners}
        for batches in data:
            for name, (engine, clipper) in runners.items():
                started = time.perf_counter()
                loss, _ = train_step(engine, clipper, iter(batches), micro)
                seconds[name].append(time.perf_counter() - started)
                losses[name].append(loss)
    finally:
        destroy_distributed()
    steady = {name: statistics.median(s[1:]) for name, s in seconds.items()}
    return {
        "first_step_s": {name: s[0] for name, s in seconds.items()},
        "steady_step_s": steady,
        "compile_cost_s": seconds["compiled"][0] - steady["compiled"],
        "speedup_ratio": steady["eager"] / steady["compiled"],
        "max_loss_rel_diff": max(abs(a - b) / abs(a) for a, b in
                                 zip(losses["eager"], losses["compiled"])),
    }


def measure_masking(steps: int) -> dict:
    import torch

    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.batches import with_documents
    from tessera.trainer.train import build_training_engine, train_step

    topo = init_distributed(tp=1, pp=1)
    try:
        cfg = bench_config(COMPILE_MODEL)
        eos = cfg.model.vocab_size - 1
        runners = {name: build_training_engine(cfg, topo) for name in ("causal", "masked")}
        micro = COMPILE_MODEL["train.global_batch_size"] // COMPILE_MODEL["train.micro_batch_size"]
        generator = torch.Generator().manual_seed(1)
        data = random_token_steps(cfg, steps + 1, micro, seed=0)
        for batches in data:  # an EOS at 1 in 64 positions
            for input_ids, _ in batches:
                ends = torch.rand(input_ids.shape, generator=generator) < 1 / 64
                input_ids[ends] = eos
        seconds = {name: [] for name in runners}
        for batches in data:
            for name, (engine, _, clipper) in runners.items():
                fed = with_documents(iter(batches), eos) if name == "masked" else iter(batches)
                started = time.perf_counter()
                train_step(engine, clipper, fed, micro)
                seconds[name].append(time.perf_counter() - started)
    finally:
        destroy_distributed()
    steady = {name: statistics.median(s[1:]) for name, s in seconds.items()}
    return {"steady_step_s": steady, "throughput_ratio": steady["causal"] / steady["masked"],
            "tokens_per_step": COMPILE_MODEL["train.global_batch_size"] * cfg.model.seq_len}


def loss_step(chunk_tokens: int) -> dict:
    """In this process: one forward and backward; the peak RSS growth over it (MB)."""
    import resource

    import torch

    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.config import ModelConfig
    from tessera.trainer.model import build_model, init_weights

    def peak_rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    init_distributed(tp=1, pp=1)
    cfg = ModelConfig(**LOSS_MODEL)
    model, _ = build_model(cfg, tp=1, loss_chunk_tokens=chunk_tokens)
    init_weights(model, cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (LOSS_BATCH, cfg.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    for param in model.parameters():  # gradient buffers before the baseline
        param.grad = torch.zeros_like(param)
    baseline = peak_rss_mb()
    started = time.perf_counter()
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    seconds = time.perf_counter() - started
    destroy_distributed()
    return {"growth_mb": peak_rss_mb() - baseline, "loss": loss.item(), "step_s": seconds}


def measure_loss() -> dict:
    whole = in_fresh_process("speed_levers", "loss_step", 0)
    chunked = in_fresh_process("speed_levers", "loss_step", LOSS_CHUNK_TOKENS)
    return {
        "tokens": LOSS_BATCH * LOSS_MODEL["seq_len"], "vocab_size": LOSS_MODEL["vocab_size"],
        "chunk_tokens": LOSS_CHUNK_TOKENS, "whole_mb": whole["growth_mb"],
        "chunked_mb": chunked["growth_mb"],
        "memory_ratio": chunked["growth_mb"] / whole["growth_mb"],
        "step_time_ratio": chunked["step_s"] / whole["step_s"],
        "loss_rel_diff": abs(chunked["loss"] - whole["loss"]) / whole["loss"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps after the first")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    from tessera.launch.env import quiet_dependencies

    quiet_dependencies()
    figures = {"compile": measure_compile(args.steps), "loss": measure_loss(),
               "document_masking": measure_masking(args.steps)}
    c, loss, masking = figures["compile"], figures["loss"], figures["document_masking"]
    print(f"compile: first step {c['first_step_s']['compiled']:.1f} s compiled vs "
          f"{c['first_step_s']['eager']:.2f} s eager (compile cost {c['compile_cost_s']:.1f} s); "
          f"steady step {c['steady_step_s']['compiled']:.3f} s vs "
          f"{c['steady_step_s']['eager']:.3f} s: speedup x{c['speedup_ratio']:.2f}; "
          f"losses within {c['max_loss_rel_diff']:.1e}")
    print(f"loss over {loss['tokens']} tokens x {loss['vocab_size']} vocabulary: peak memory "
          f"growth {loss['whole_mb']:.0f} MB whole, {loss['chunked_mb']:.0f} MB in chunks of "
          f"{loss['chunk_tokens']} (ratio {loss['memory_ratio']:.2f}); step time ratio "
          f"{loss['step_time_ratio']:.2f}; losses within {loss['loss_rel_diff']:.1e}")
    print(f"document masking: steady step {masking['steady_step_s']['masked']:.3f} s vs "
          f"{masking['steady_step_s']['causal']:.3f} s causal: tokens/s ratio "
          f"{masking['throughput_ratio']:.2f}")
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
