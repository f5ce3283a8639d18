"""Resilience overhead: the training step with the hang watchdog and straggler detection against
the same step without them, at the demo's shape (configs/demo.yaml: hidden 128, 4 layers, 128
tokens, tp=2 on 2 ranks).

"With" is what the train loop adds per step: the watchdog's phase marks (data, forward/backward,
optimizer, metrics), the forward passes timed for own time, and the straggler all-gather at each
log step: every 10 steps as the demo logs, and (a second figure) at every step, log.interval=1.
One engine in one run: steps rotate between the variants (the order rotating each round), so
load drifts onto all alike; the watchdog's thread (one heartbeat file per beat) runs for the whole
run, at the default resilience.hang_timeout_s. Figures: median step time without over median step
time with (>= 0.99: under 1% overhead).

Run: .venv/bin/python bench/resilience_overhead.py [--steps 40] [--warmup 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from common import (
    bench_config,
    launch_ranks,
    median,
    random_token_steps,
    write_json,
    write_rank_result,
)

DEMO = {
    "model.vocab_size": 4096, "model.hidden_size": 128, "model.num_layers": 4,
    "model.num_heads": 4, "model.num_kv_heads": 2, "model.ffn_hidden_size": 352,
    "model.seq_len": 128, "parallel.tp": 2, "parallel.zero_stage": 1,
    "train.global_batch_size": 16, "train.micro_batch_size": 8, "train.steps": 1000,
}
TARGET = 0.99


def rank_main(out_dir: str, warmup: int, steps: int) -> None:
    import torch.distributed as dist

    from tessera.launch.env import quiet_dependencies
    from tessera.launch.watchdog import Watchdog
    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.stragglers import ForwardClock, Stragglers
    from tessera.trainer.train import build_training_engine, train_step

    quiet_dependencies()
    run_dir = tempfile.mkdtemp(prefix="resilience-bench-")
    cfg = bench_config({**DEMO, "run.dir": run_dir})
    topo = init_distributed(tp=2, pp=1)
    engine, _, clipper = build_training_engine(cfg, topo)
    watchdog = Watchdog(run_dir, topo.rank, topo.world_size, cfg.resilience.hang_timeout_s).start()
    stragglers = Stragglers(cfg.resilience.straggler_factor, topo.rank, topo.world_size,
                            engine.device, run_dir)
    clock = ForwardClock(engine.device)

    def plain(step: int, micro_batches: list) -> None:
        train_step(engine, clipper, iter(micro_batches), len(micro_batches))

    def watched(step: int, micro_batches: list, log_interval: int) -> None:
        watchdog.phase(step, "data")
        started = time.perf_counter()
        watchdog.phase(step, "forward/backward")
        train_step(engine, clipper, iter(micro_batches), len(micro_batches), clock,
                   lambda: watchdog.phase(step, "optimizer"))
        watchdog.phase(step, "metrics")
        stragglers.add(time.perf_counter() - started + clock.take_s())
        if step % log_interval == 0:
            stragglers.check(step)

    variants = {"without": plain,
                "with": lambda step, batches: watched(step, batches, 10),
                "with_every_step": lambda step, batches: watched(step, batches, 1)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    per_step = cfg.train.global_batch_size // (cfg.train.micro_batch_size * topo.dp)
    data = random_token_steps(cfg, warmup + steps, per_step, seed=topo.dp_rank)
    for index, micro_batches in enumerate(data):
        shift = index % len(variants)
        names = list(variants)[shift:] + list(variants)[:shift]
        for name in names:
            dist.barrier()
            started = time.perf_counter()
            variants[name](index + 1, micro_batches)
            if index >= warmup:
                times[name].append(time.perf_counter() - started)
    watchdog.close("finished")
    write_rank_result(out_dir, times)
    destroy_distributed()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--json")
    parser.add_argument("--rank-body", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_body:
        rank_main(args.rank_body, args.warmup, args.steps)
        return 0
    ranks = launch_ranks(__file__, 2, ["--warmup", str(args.warmup), "--steps", str(args.steps)])
    times = {name: median(values) for name, values in ranks[0].items()}
    without, with_, every = times["without"], times["with"], times["with_every_step"]
    figures = {"without_s": without, "with_s": with_, "with_every_step_s": every,
               "ratio": without / with_, "ratio_every_step": without / every,
               "target": TARGET, "steps": args.steps}
    print(json.dumps(figures))
    print(f"resilience on/off at the demo shape: step {with_ * 1000:.1f} ms with vs "
          f"{without * 1000:.1f} ms without: ratio {without / with_:.3f} (target >= {TARGET}); "
          f"straggler check every step: {without / every:.3f}")
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
