"""Trainer overhead: Tessera's training step against a plain PyTorch loop on the same Llama.

One process: Tessera at ZeRO 0 (megatron-core layers, DeepSpeed engine, `train_step` exactly as
the training loop calls it) against `plain_llama.PlainLlama` (plain torch.nn, same shapes and
math, the same AdamW and schedule, grad clipping, no DeepSpeed) started from the same weights.
Two processes: Tessera at ZeRO 0, 1, 2 and 3 against DistributedDataParallel of the plain model
(gloo, `no_sync` over the accumulation micro-batches), with gradient accumulation (2 micro-batches
per rank per step) and without (1): ZeRO 2 and 3 keep only a partition of the gradients, so they
reduce at every micro-batch (DeepSpeed has no `no_sync` for them) where DDP reduces once per step;
the second comparison shows what that costs apart from everything else. A third compares ZeRO 2
and 3 at micro-batches of 4,096 tokens (16 sequences; our 1B configs use 8,192 and 16,384): their
costs are per micro-batch (collectives, DeepSpeed's per-module hooks), so this shows how much of
the gap at 512-token micro-batches remains at a pretraining-sized micro-batch. Beside each ZeRO 3
row: the ratio it would reach if only its collectives cost anything (timed bare over all the
parameters in the same run, `zero3_bound`): on a CPU they cannot overlap compute.

Every variant lives in the same process for the whole run and sees the same data tensors; steps
alternate between variants (the order rotates each round), so machine load drifts onto all of
them alike. Each process computes on one thread (`--threads`). The whole comparison runs twice, the
baseline built first and then last (the order of construction alone moves a CPU timing by up to
10%), and the two ratios are combined by their geometric mean. The figure is tokens/s of Tessera
over tokens/s of the baseline, from median step times (ratio >= 1: Tessera is faster). Beside it,
the same ratio from the CPU time each process used per step (`time.process_time`), which other
jobs on a shared machine disturb less than wall time: on a quiet machine the two agree. The loss
of each variant must follow the baseline's: the largest relative difference over the run is
printed with the ratios.

Run: .venv/bin/python bench/trainer_overhead.py [--steps 6] [--warmup 1] [--dp 1 2] [--threads 1]
     [--large-micro-batch 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from common import (
    bench_config,
    launch_ranks,
    median,
    random_token_steps,
    write_json,
    write_rank_result,
)

# Big enough that compute dominates on a CPU core, small enough for a few-minute run.
MODEL = {
    "model.vocab_size": 2048, "model.hidden_size": 256, "model.num_layers": 4,
    "model.num_heads": 4, "model.num_kv_heads": 2, "model.ffn_hidden_size": 704,
    "model.seq_len": 256,
}
TRAIN = {
    "train.micro_batch_size": 2, "train.global_batch_size": 8, "train.grad_clip": 1.0,
    "train.warmup_steps": 2, "train.steps": 1000, "run.seed": 7,
}
TARGETS = {1: 0.95, 2: 0.90}


@dataclasses.dataclass(frozen=True)
class Batch:
    """Sequences per step (all ranks) and per micro-batch."""
    global_size: int
    micro_size: int


def tessera_config(zero_stage: int, batch: Batch):
    return bench_config({**MODEL, **TRAIN, "train.global_batch_size": batch.global_size,
                         "train.micro_batch_size": batch.micro_size,
                         "parallel.zero_stage": zero_stage})


def make_steps(cfg, dp_rank: int, dp: int, num_steps: int) -> list[list[tuple]]:
    """Each step's micro-batches for this data-parallel rank (int64 token ids)."""
    micro_batches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    return random_token_steps(cfg, num_steps, micro_batches, seed=1000 + dp_rank)


class TesseraRunner:
    def __init__(self, zero_stage: int, topo, batch: Batch):
        from tessera.trainer.train import build_training_engine

        self.name = f"tessera-zero{zero_stage}"
        self.cfg = tessera_config(zero_stage, batch)
        self.engine, _, self.clipper = build_training_engine(self.cfg, topo)

    def step(self, micro_batches: list[tuple]) -> float:
        from tessera.trainer.train import train_step

        loss, _ = train_step(self.engine, self.clipper, iter(micro_batches), len(micro_batches))
        return loss


class PlainRunner:
    """The plain model (DDP-wrapped on more than one rank), trained the way a plain loop does."""

    def __init__(self, dp: int, batch: Batch):
        import torch
        from plain_llama import PlainLlama, load_from_tessera

        from tessera.trainer.model import build_model, init_weights
        from tessera.trainer.optim import build_optimizer, build_scheduler

        cfg = tessera_config(0, batch)
        self.name = "plain-ddp" if dp > 1 else "plain"
        self.cfg = cfg
        self.dp = dp
        reference, _ = build_model(cfg.model, tp=1)  # Tessera's initial weights, from the seed
        init_weights(reference, cfg.model, cfg.run.seed)
        model = PlainLlama(cfg.model)
        load_from_tessera(model, reference)
        self.params = list(model.parameters())
        self.model = torch.nn.parallel.DistributedDataParallel(model) if dp > 1 else model
        self.optimizer = build_optimizer(model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)

    def step(self, micro_batches: list[tuple]) -> float:
        import contextlib

        import torch
        import torch.distributed as dist

        loss_sum = torch.zeros(())
        for index, (input_ids, labels) in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.dp == 1 else self.model.no_sync()
            with sync:
                loss = self.model(input_ids, labels)
                (loss / len(micro_batches)).backward()
            loss_sum += loss.detach()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean = loss_sum / len(micro_batches)
        if self.dp > 1:
            dist.all_reduce(mean)
        return mean.item() / self.dp


def collective_seconds(numel: int, repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median seconds of bare gloo collectives over `numel` fp32 elements, all ranks: DDP's
    gradient all-reduce, and ZeRO 3's traffic per micro-batch (a gradient reduce-scatter, a
    parameter all-gather for the forward and one for the backward)."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    full = torch.randn(numel - numel % world)
    shard = torch.empty(full.numel() // world)
    ops = {"all_reduce": lambda: dist.all_reduce(full),
           "reduce_scatter": lambda: dist.reduce_scatter_single(shard, full),
           "all_gather": lambda: dist.all_gather_single(full, shard)}
    seconds = {}
    for name, op in ops.items():
        times = []
        for _ in range(warmup + repeats):
            dist.barrier()
            started = time.perf_counter()
            op()
            times.append(time.perf_counter() - started)
        seconds[name] = median(times[warmup:])
    return seconds


def build_runners(stages: list[int], topo, plain_first: bool, batch: Batch) -> list:
    """The variants, built in the given order. The order matters by itself on a CPU (the first
    model built ran up to 10% slower than an identical one built after it, in one process), so
    the driver runs both orders and combines them."""
    names = ["plain", *stages] if plain_first else [*stages, "plain"]
    return [PlainRunner(topo.dp, batch) if name == "plain"
            else TesseraRunner(name, topo, batch) for name in names]


def rank_main(out_dir: str, stages: list[int], warmup: int, steps: int, threads: int,
              plain_first: bool, batch: Batch) -> None:
    import torch
    import torch.distributed as dist

    from tessera.launch.env import quiet_dependencies
    from tessera.parallel.topology import destroy_distributed, init_distributed

    quiet_dependencies()
    topo = init_distributed(tp=1, pp=1)
    # One compute thread per process by default: no thread then waits (spinning) on a descheduled
    # sibling when other jobs share the cores, so CPU time measures work.
    torch.set_num_threads(threads)
    runners = build_runners(stages, topo, plain_first, batch)
    data = make_steps(runners[0].cfg, topo.dp_rank, topo.dp, warmup + steps)
    times = {r.name: [] for r in runners}
    cpu_times = {r.name: [] for r in runners}
    losses = {r.name: [] for r in runners}
    for index, micro_batches in enumerate(data):
        shift = index % len(runners)  # rotate the order: each variant runs first, then last
        for runner in runners[shift:] + runners[:shift]:
            dist.barrier()
            started, started_cpu = time.perf_counter(), time.process_time()
            loss = runner.step(micro_batches)
            elapsed, elapsed_cpu = time.perf_counter() - started, time.process_time() - started_cpu
            losses[runner.name].append(loss)
            if index >= warmup:
                times[runner.name].append(elapsed)
                cpu_times[runner.name].append(elapsed_cpu)
    cfg = runners[0].cfg
    plain = next(r for r in runners if isinstance(r, PlainRunner))
    collectives = collective_seconds(sum(p.numel() for p in plain.params)) if topo.dp > 1 else {}
    write_rank_result(out_dir, {
        "dp": topo.dp, "micro_batches": batch.global_size // (topo.dp * batch.micro_size),
        "micro_batch_tokens": batch.micro_size * cfg.model.seq_len, "times": times,
        "cpu_times": cpu_times, "losses": losses, "collective_s": collectives,
        "tokens_per_step": batch.global_size * cfg.model.seq_len})
    destroy_distributed()


def zero3_bound(base_s: float, collective_s: dict[str, float], micro_batches: int) -> float:
    """The ratio ZeRO 3 would reach if everything but its collectives cost nothing and none of them
    overlapped compute (the CPU accelerator has no streams; DeepSpeed calls its gradient
    reduce-scatter synchronously): DDP's step against DDP's step plus ZeRO 3's bare traffic (per
    micro-batch: a reduce-scatter of the gradients, two all-gathers of the parameters)."""
    zero3_s = micro_batches * (collective_s["reduce_scatter"] + 2 * collective_s["all_gather"])
    return base_s / (base_s + zero3_s)


def summarize(result: dict) -> list[dict]:
    """One row per Tessera variant: tokens/s of both, the ratio, the loss agreement."""
    baseline = "plain-ddp" if result["dp"] > 1 else "plain"
    base_s = median(result["times"][baseline])
    rows = []
    for name, times in result["times"].items():
        if name == baseline:
            continue
        step_s = median(times)
        diffs = [abs(a - b) / abs(b) for a, b in zip(result["losses"][name],
                                                      result["losses"][baseline])]
        cpu_ratio = median(result["cpu_times"][baseline]) / median(result["cpu_times"][name])
        rows.append({
            "name": (f"{name} vs {baseline}, dp={result['dp']}, {result['micro_batches']} x "
                     f"{result['micro_batch_tokens']}-token micro-batch(es)/rank"),
            "tessera_tokens_per_s": result["tokens_per_step"] / step_s,
            "baseline_tokens_per_s": result["tokens_per_step"] / base_s,
            "ratio": base_s / step_s,
            "cpu_time_ratio": cpu_ratio,
            "target": TARGETS[result["dp"]],
            "max_loss_rel_diff": max(diffs),
            "steps_timed": len(times),
        })
        if name == "tessera-zero3":
            rows[-1]["bound_without_overlap"] = zero3_bound(base_s, result["collective_s"],
                                                            result["micro_batches"])
            rows[-1]["collective_ms"] = {k: 1000 * v for k, v in result["collective_s"].items()}
    return rows


def combine(first: list[dict], second: list[dict]) -> list[dict]:
    """Rows of the two build orders: ratios by geometric mean, tokens/s by mean."""
    rows = []
    second_by_name = {row["name"]: row for row in second}
    for a in first:
        b = second_by_name[a["name"]]
        row = {**a, "ratio_each_order": [a["ratio"], b["ratio"]],
               "steps_timed": a["steps_timed"] + b["steps_timed"],
               "max_loss_rel_diff": max(a["max_loss_rel_diff"], b["max_loss_rel_diff"])}
        for key in ("ratio", "cpu_time_ratio", "bound_without_overlap"):
            if key in a:
                row[key] = (a[key] * b[key]) ** 0.5
        for key in ("tessera_tokens_per_s", "baseline_tokens_per_s"):
            row[key] = (a[key] + b[key]) / 2
        rows.append(row)
    return rows


def comparisons(dps: list[int], large_micro_batch: int) -> list[tuple[int, list[int], Batch]]:
    """(dp, ZeRO stages, batch) of each side-by-side run."""
    default = Batch(TRAIN["train.global_batch_size"], TRAIN["train.micro_batch_size"])
    runs = [(1, [0], default)] if 1 in dps else []
    if 2 in dps:  # with accumulation, then one micro-batch per rank per step
        runs += [(2, [0, 1, 2, 3], default), (2, [0, 1, 2, 3], Batch(2 * default.micro_size,
                                                                     default.micro_size))]
        if large_micro_batch:  # the per-micro-batch costs of ZeRO 2 and 3 against more tokens
            runs.append((2, [2, 3], Batch(2 * large_micro_batch, large_micro_batch)))
    return runs


def run(dps: list[int], warmup: int, steps: int, threads: int,
        large_micro_batch: int) -> list[dict]:
    rows = []
    for dp, stages, batch in comparisons(dps, large_micro_batch):
        per_order = []
        for plain_first in (False, True):
            body = [json.dumps(stages), str(warmup), str(steps), str(threads), str(plain_first),
                    str(batch.global_size), str(batch.micro_size)]
            per_order.append(summarize(launch_ranks(__file__, dp, body)[0]))
        rows.extend(combine(*per_order))
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'variant':<60}{'tessera tok/s':>14}{'baseline tok/s':>15}{'ratio':>7}{'target':>8}"
          f"{'each order':>13}{'cpu-time ratio':>16}{'loss rel diff':>15}")
    for r in rows:
        orders = "/".join(f"{x:.2f}" for x in r["ratio_each_order"])
        print(f"{r['name']:<60}{r['tessera_tokens_per_s']:>14.0f}{r['baseline_tokens_per_s']:>15.0f}"
              f"{r['ratio']:>7.3f}{r['target']:>8.2f}{orders:>13}{r['cpu_time_ratio']:>16.3f}"
              f"{r['max_loss_rel_diff']:>15.1e}")
    for r in rows:
        if "bound_without_overlap" in r:
            ms = r["collective_ms"]
            print(f"{r['name']}: at most {r['bound_without_overlap']:.3f} with its collectives "
                  f"on the critical path (bare gloo over all parameters: reduce-scatter "
                  f"{ms['reduce_scatter']:.1f} ms, all-gather {ms['all_gather']:.1f} ms; DDP's "
                  f"all-reduce {ms['all_reduce']:.1f} ms, overlapped with its backward)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6,
                        help="timed steps per variant and build order (two orders)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2], choices=(1, 2))
    parser.add_argument("--threads", type=int, default=1, help="compute threads per process")
    parser.add_argument("--large-micro-batch", type=int, default=16,
                        help="sequences per micro-batch of the extra ZeRO 2/3 comparison at dp=2 "
                             "(0: skip it)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--rank-body", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_body:
        out_dir, stages, warmup, steps, threads, plain_first, global_size, micro_size = \
            args.rank_body
        rank_main(out_dir, json.loads(stages), int(warmup), int(steps), int(threads),
                  plain_first == "True", Batch(int(global_size), int(micro_size)))
        return 0
    rows = run(args.dp, args.warmup, args.steps, args.threads, args.large_micro_batch)
    print_rows(rows)
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
