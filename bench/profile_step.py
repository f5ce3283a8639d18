"""Profile a training step on the CPU (torch.profiler): where does a step's time go?

Builds the trainer-overhead benchmark's model and variant (Tessera at a ZeRO stage, or the plain
PyTorch baseline) on 1 or 2 ranks, runs warm-up steps, then profiles a few steps on rank 0 and
prints the operators with the most self time, and how much of the step no operator accounts for
(Python in our code and in DeepSpeed, waiting on collectives).

Run: .venv/bin/python bench/profile_step.py [--nproc 1] [--zero-stage 0 | --plain] [--steps 3]
     [--threads 1] [--rows 25] [--trace out.json]   (a Chrome trace of rank 0, for Perfetto)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import launch_ranks, write_rank_result
from trainer_overhead import TRAIN, Batch, PlainRunner, TesseraRunner, make_steps


def rank_main(out_dir: str, options: dict) -> None:
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from tessera.launch.env import quiet_dependencies
    from tessera.parallel.topology import destroy_distributed, init_distributed

    quiet_dependencies()
    topo = init_distributed(tp=1, pp=1)
    torch.set_num_threads(options["threads"])
    batch = Batch(TRAIN["train.global_batch_size"], TRAIN["train.micro_batch_size"])
    if options["plain"]:
        runner = PlainRunner(topo.dp, batch)
    else:
        runner = TesseraRunner(options["zero_stage"], topo, batch)
    steps = options["steps"]
    data = make_steps(runner.cfg, topo.dp_rank, topo.dp, 2 + steps)
    for micro_batches in data[:2]:
        runner.step(micro_batches)
    dist.barrier()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for micro_batches in data[2:]:
            runner.step(micro_batches)
    wall_s = time.perf_counter() - started
    if topo.rank == 0:
        events = prof.key_averages()
        print(f"\n{runner.name}, {topo.describe()}, rank 0:")
        print(events.table(sort_by="self_cpu_time_total", row_limit=options["rows"]))
        op_self_s = sum(e.self_cpu_time_total for e in events) / 1e6
        print(f"{steps} steps: {wall_s / steps:.3f} s/step under the profiler; operators' self "
              f"time {op_self_s / steps:.3f} s/step ({100 * op_self_s / wall_s:.0f}% of wall)")
        if options["trace"]:
            prof.export_chrome_trace(options["trace"])
    write_rank_result(out_dir, None)
    destroy_distributed()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--plain", action="store_true", help="profile the plain baseline instead")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1, help="compute threads per process")
    parser.add_argument("--trace")
    parser.add_argument("--rank-body", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_body:
        rank_main(args.rank_body[0], json.loads(args.rank_body[1]))
        return 0
    options = {"zero_stage": args.zero_stage, "plain": args.plain, "steps": args.steps,
               "rows": args.rows, "trace": args.trace, "threads": args.threads}
    launch_ranks(__file__, args.nproc, [json.dumps(options)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
