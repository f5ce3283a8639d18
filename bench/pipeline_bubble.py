"""Pipeline bubble of DeepSpeed's 1F1B engine as Tessera drives it, against theory.

For pp=2 and pp=4 and 4, 8, 16 micro-batches per step, each stage's idle fraction of the
schedule's wall time is printed beside (p-1)/(m+p-1). The window of a step is common to all
stages, as in the theory: from the first forward pass to start on any stage to the last backward
pass to end on any stage (CLOCK_MONOTONIC, shared by the processes of one machine). A stage's
idle time is the window less its own forward and backward passes.

Two kinds of stage compute:
  sleep  every block sleeps a fixed time in forward (and twice that in backward), standing in for
         a GPU kernel: the schedule is measured without the CPU contention of several ranks
         sharing 2 cores. This is the figure to compare with theory.
  real   the Llama blocks compute for real on the CPU (hidden 256, seq 256): with pp=4 on a
         2-core machine, 4 ranks share 2 cores, so busy stages run slower than idle ones and the
         measured bubble shrinks below theory.

Run: .venv/bin/python bench/pipeline_bubble.py [--mode sleep|real|both] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

MICRO_BATCHES = (4, 8, 16)
STAGES = (2, 4)
SLEEP_FORWARD_S = 0.02  # per block; backward sleeps twice as long


def theory(p: int, m: int) -> float:
    return (p - 1) / (m + p - 1)


# ---------------------------------------------------------------------------------------------
# Rank body (inside a launch)


def _instrument(engine) -> dict:
    """Wrap the engine's forward and backward handlers to record busy time and its bounds."""
    from deepspeed.runtime.pipe import schedule

    timings = {"busy_s": 0.0, "first_start": None, "last_end": None}
    compute = (schedule.ForwardPass, schedule.BackwardPass)

    def timed(handler):
        def run(self, *args, **kwargs):
            start = time.monotonic()
            handler(self, *args, **kwargs)
            end = time.monotonic()
            timings["busy_s"] += end - start
            if timings["first_start"] is None:
                timings["first_start"] = start
            timings["last_end"] = end
        return run

    engine._INSTRUCTION_MAP = {kind: timed(h) if kind in compute else h
                               for kind, h in engine._INSTRUCTION_MAP.items()}
    return timings


def _sleepy_block_class():
    import torch

    from tessera.trainer import model as model_module

    class _Sleep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            time.sleep(SLEEP_FORWARD_S)
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            time.sleep(2 * SLEEP_FORWARD_S)
            return grad

    class SleepyBlock(model_module.Block):
        def forward(self, x_SBH):
            return _Sleep.apply(super().forward(x_SBH))

    return SleepyBlock


def _config(mode: str, p: int, m: int):
    from tessera.trainer.config import load_config

    hidden, seq = (256, 256) if mode == "real" else (64, 32)
    overrides = {
        "model.vocab_size": 512, "model.hidden_size": hidden, "model.num_heads": 4,
        "model.num_kv_heads": 4, "model.ffn_hidden_size": 3 * hidden, "model.seq_len": seq,
        "model.num_layers": 2 * p, "parallel.pp": p,
        "parallel.pipeline_partition": "[" + ",".join(["2"] * p) + "]",
        "train.micro_batch_size": 2, "train.global_batch_size": 2 * m, "train.grad_clip": 0,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def _measure(mode: str, p: int, m: int, steps: int) -> list[float]:
    import torch
    import torch.distributed as dist

    from tessera.parallel.topology import Topology
    from tessera.trainer.train import build_training_engine

    cfg = _config(mode, p, m)
    topo = Topology(world_size=dist.get_world_size(), rank=dist.get_rank(), local_rank=0, tp=1,
                    pp=p)
    engine, _, _ = build_training_engine(cfg, topo)
    generator = torch.Generator().manual_seed(0)

    def batches():
        while True:
            tokens = torch.randint(0, 512, (2, cfg.model.seq_len + 1), generator=generator)
            yield tokens[:, :-1], tokens[:, 1:]

    data = batches()
    engine.train_batch(data_iter=data)  # warm-up step, not measured
    timings = _instrument(engine)
    world = dist.get_world_size()
    busy_s = window_s = 0.0
    for _ in range(steps):
        timings.update(busy_s=0.0, first_start=None, last_end=None)
        dist.barrier()
        engine.train_batch(data_iter=data)
        bounds = torch.tensor([timings["first_start"], timings["last_end"]], dtype=torch.float64)
        every = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(every, bounds)
        window_s += max(float(b[1]) for b in every) - min(float(b[0]) for b in every)
        busy_s += timings["busy_s"]
    idle = torch.tensor([1.0 - busy_s / window_s])
    gathered = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(gathered, idle)
    return [float(t) for t in gathered]


def rank_main(mode: str, p: int, steps: int, out: Path) -> None:
    import torch.distributed as dist

    from tessera.parallel.topology import destroy_distributed, init_distributed

    if mode == "sleep":
        from tessera.trainer import model as model_module

        model_module.Block = _sleepy_block_class()  # the layer specs pick the sleeping block up
    init_distributed(tp=1, pp=p)
    rows = []
    for m in MICRO_BATCHES:
        idle = _measure(mode, p, m, steps)
        rows.append({"mode": mode, "p": p, "m": m, "idle_per_stage": idle})
    if dist.get_rank() == 0:
        out.write_text(json.dumps(rows))
    destroy_distributed()


# ---------------------------------------------------------------------------------------------
# Driver


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("sleep", "real", "both"), default="both")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank-body", nargs=3, metavar=("MODE", "P", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_body:
        mode, p, out = args.rank_body
        rank_main(mode, int(p), args.steps, Path(out))
        return 0

    from tessera.launch.env import quiet_dependencies
    from tessera.launch.local import launch_local

    quiet_dependencies()
    modes = ("sleep", "real") if args.mode == "both" else (args.mode,)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            for p in STAGES:
                out = Path(tmp) / f"{mode}-{p}.json"
                argv = [os.path.abspath(__file__), "--steps", str(args.steps),
                        "--rank-body", mode, str(p), str(out)]
                code = launch_local(p, argv, module=False)
                if code != 0:
                    return code
                results.extend(json.loads(out.read_text()))
    print_table(results)
    return 0


def print_table(results: list[dict]) -> None:
    print(f"\n{'mode':<6}{'pp':>4}{'m':>5}{'theory':>9}{'mean idle':>11}{'diff (pts)':>12}  "
          f"idle per stage")
    for row in results:
        p, m, idle = row["p"], row["m"], row["idle_per_stage"]
        mean = sum(idle) / len(idle)
        stages = " ".join(f"{x:.3f}" for x in idle)
        print(f"{row['mode']:<6}{p:>4}{m:>5}{theory(p, m):>9.3f}{mean:>11.3f}"
              f"{100 * (mean - theory(p, m)):>+12.1f}  {stages}")


if __name__ == "__main__":
    sys.exit(main())
