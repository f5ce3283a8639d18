"""ZeRO memory: per-rank bytes of parameters, gradients and optimizer state, stages 0 to 3.

At dp=2 and dp=4 (one tp=1 process group each), Tessera builds its DeepSpeed engine for every
ZeRO stage in bf16 (mixed precision) and in fp32, and trains two steps. During the second step
the tensors the engine holds are collected (a walk over the engine's and its optimizers' objects;
each storage counted once) at three points: before the gradient reduction of the last
micro-batch, after its backward, and at the optimizer step. Of the first two, the point with the
most model-state bytes is reported, split into:

  params     this rank's copy of the model weights (ZeRO 3: its partition, `ds_tensor`, and
             any weight held whole at that moment)
  grads      model gradients and DeepSpeed's gradient partitions
  optimizer  Adam's m and v, and the fp32 master weights where the optimizer keeps a copy
  buffers    everything else: DeepSpeed's communication buckets (sized by its bucket settings,
             not by the model), reported apart and left out of the comparison

and compared with the formulas for Psi parameters and Adam (ZeRO paper, section 3). The third
point, inside the optimizer step, adds DeepSpeed's transient copies (in bf16 the fp32 copy of the
gradients it hands Adam): printed apart as the step's peak.

  mixed precision (bf16 weights and gradients, fp32 master + m + v = 12 bytes):
    stage 0: 2+2+12 = 16 Psi    1: 2+2 + 12/dp = 4 Psi + 12 Psi/dp
    stage 2: 2 + (2+12)/dp = 2 Psi + 14 Psi/dp    stage 3: (2+2+12)/dp = 16 Psi/dp
  fp32 (what CPU runs use): weights and gradients take 4 bytes, m + v 8. At stage 0 AdamW updates
  the fp32 weights in place: no master copy, 4+4+8 = 16 Psi. At stages 1-3 DeepSpeed's ZeRO
  optimizer keeps an fp32 master partition even though the weights already are fp32 (4 Psi/dp
  a hand-written fp32 ZeRO would not need):
    stage 1: 4+4 + (4+8)/dp = 8 Psi + 12 Psi/dp    stage 2: 4 + (4+4+8)/dp = 4 Psi + 16 Psi/dp
    stage 3: (4+4+4+8)/dp = 20 Psi/dp

Run: .venv/bin/python bench/zero_memory.py [--dp 2 4]
"""

from __future__ import annotations

import argparse
import collections
import sys

from common import bench_config, launch_ranks, random_token_steps, write_json, write_rank_result

# Matrices above DeepSpeed's stage3_param_persistence_threshold (1e5 elements; smaller tensors,
# here only the norm weights, stay whole on every rank at ZeRO 3), as in any real model.
MODEL = {
    "model.vocab_size": 2048, "model.hidden_size": 512, "model.num_layers": 4,
    "model.num_heads": 8, "model.num_kv_heads": 2, "model.ffn_hidden_size": 1408,
    "model.seq_len": 32,
}
STAGES = (0, 1, 2, 3)
PRECISIONS = ("bf16", "fp32")
TARGET_REL = 0.10


def formula(stage: int, dp: int, precision: str) -> dict[str, float]:
    """Bytes per parameter on one rank: params, grads, optimizer (master + m + v)."""
    weight = 2 if precision == "bf16" else 4
    master = 4 if precision == "bf16" or stage > 0 else 0  # see the module docstring
    optimizer = master + 8
    params = weight / dp if stage == 3 else weight
    grads = weight / dp if stage >= 2 else weight
    return {"params": params, "grads": grads, "optimizer": optimizer / dp if stage else optimizer}


# ---------------------------------------------------------------------------------------------
# Collecting the tensors an engine holds


def reachable_tensors(root, max_objects: int = 500_000) -> dict[int, tuple[str, object]]:
    """Breadth-first walk from `root` over attributes, containers, module parameters and
    tensor .grad / .ds_tensor; storage pointer -> (shortest path, a tensor on that storage)."""
    import torch

    found: dict[int, tuple[str, object]] = {}
    seen: set[int] = set()
    queue = collections.deque([("engine", root)])
    while queue and len(seen) < max_objects:
        path, obj = queue.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta" and obj.untyped_storage().nbytes():
                found.setdefault(obj.untyped_storage().data_ptr(), (path, obj))
            for attr in ("grad", "ds_tensor"):
                child = getattr(obj, attr, None)
                if child is not None:
                    queue.append((f"{path}.{attr}", child))
        elif isinstance(obj, dict):
            queue.extend((f"{path}[{k!r}]" if not isinstance(k, torch.Tensor) else f"{path}[t]", v)
                         for k, v in obj.items())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            queue.extend((f"{path}[{i}]", v) for i, v in enumerate(obj))
        elif isinstance(obj, torch.nn.Module):
            queue.extend((f"{path}.{n}", p) for n, p in obj.named_parameters())
            queue.extend((f"{path}.{k}", v) for k, v in vars(obj).items()
                         if k not in ("_parameters", "_modules"))
        elif type(obj).__module__.split(".")[0] in ("deepspeed", "torch", "tessera") and \
                hasattr(obj, "__dict__"):
            queue.extend((f"{path}.{k}", v) for k, v in vars(obj).items())
    return found


def storage_ptrs(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors
            if t is not None and t.device.type != "meta" and t.untyped_storage().nbytes()}


def classify(engine, inner_optimizer) -> dict[str, int]:
    """Bytes per category of what the engine holds now."""
    model_params = list(engine.module.parameters())
    # ZeRO 3: the partition (`ds_tensor`), and the whole tensor where it is kept or gathered
    param_ptrs = storage_ptrs(model_params + [getattr(p, "ds_tensor", None) for p in model_params])
    state = [t for s in inner_optimizer.state.values() for t in s.values()
             if hasattr(t, "untyped_storage") and t.dim() > 0]
    # the optimizer's own parameters (the master weights, if not the model's); ZeRO 3 lends
    # them to param_groups only during its step, but they key the state
    opt_params = [p for g in inner_optimizer.param_groups for p in g["params"]]
    opt_params += list(inner_optimizer.state)
    optimizer_ptrs = storage_ptrs(state) | (storage_ptrs(opt_params) - param_ptrs)
    buckets = getattr(engine.optimizer, "ipg_buckets", None)  # ZeRO's gradient staging buckets
    bucket_ptrs = set(reachable_tensors(buckets)) if buckets is not None else set()
    totals = collections.Counter()
    for ptr, (path, tensor) in reachable_tensors(engine).items():
        num_bytes = tensor.untyped_storage().nbytes()
        if ptr in bucket_ptrs:
            totals["buffers"] += num_bytes
        elif ptr in param_ptrs:
            totals["params"] += num_bytes
        elif ptr in optimizer_ptrs:
            totals["optimizer"] += num_bytes
        elif "grad" in path:  # .grad, averaged_gradients, grad_partitions_flat_buffer, ...
            totals["grads"] += num_bytes
        else:
            totals["buffers"] += num_bytes
    return dict(totals)


def measure_step(engine, clipper, batches, micro_batches: int) -> dict:
    """Train one step, snapshotting the categories at three points; the fullest snapshot."""
    from tessera.trainer.train import train_step

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    snapshots: list[tuple[str, dict]] = []

    def snap(point: str) -> None:
        snapshots.append((point, classify(engine, inner)))

    original_reduce, original_backward = engine.allreduce_gradients, engine.backward

    def reduce(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            snap("before gradient reduction")
        return original_reduce(*args, **kwargs)

    def backward(*args, **kwargs):
        out = original_backward(*args, **kwargs)
        if engine.is_gradient_accumulation_boundary():
            snap("after backward")
        return out

    hook = inner.register_step_pre_hook(
        lambda *_: snap("optimizer step") if not any(p == "optimizer step" for p, _ in snapshots)
        else None)
    engine.allreduce_gradients, engine.backward = reduce, backward
    try:
        train_step(engine, clipper, batches, micro_batches)
    finally:
        engine.allreduce_gradients, engine.backward = original_reduce, original_backward
        hook.remove()

    def model_states(item):
        return sum(item[1].get(k, 0) for k in ("params", "grads", "optimizer"))

    at_rest = [item for item in snapshots if item[0] != "optimizer step"]
    point, totals = max(at_rest, key=model_states)
    return {"point": point, **{k: totals.get(k, 0) for k in ("params", "grads", "optimizer",
                                                                "buffers")},
            "step_peak": max(model_states(item) for item in snapshots)}


def rank_main(out_dir: str) -> None:
    import torch.distributed as dist

    from tessera.launch.env import quiet_dependencies
    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.train import build_training_engine, train_step

    quiet_dependencies()
    topo = init_distributed(tp=1, pp=1)
    results = []
    for precision in PRECISIONS:
        for stage in STAGES:
            cfg = bench_config({**MODEL, "parallel.zero_stage": stage,
                                "train.precision": precision, "train.micro_batch_size": 2,
                                "train.global_batch_size": 4 * topo.dp})
            engine, _, clipper = build_training_engine(cfg, topo)
            psi = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
            micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * topo.dp)
            first, second = random_token_steps(cfg, 2, micro, seed=topo.rank)
            train_step(engine, clipper, iter(first), micro)  # Adam's state exists from here on
            measured = measure_step(engine, clipper, iter(second), micro)
            results.append({"dp": topo.dp, "stage": stage, "precision": precision, "psi": psi,
                            "optimizer_class": type(engine.optimizer).__name__, **measured})
            del engine, clipper
            dist.barrier()
    write_rank_result(out_dir, results)
    destroy_distributed()


# ---------------------------------------------------------------------------------------------
# Driver


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        expected = formula(r["stage"], r["dp"], r["precision"])
        measured_total = r["params"] + r["grads"] + r["optimizer"]
        expected_total = sum(expected.values()) * r["psi"]
        rows.append({**r, **{f"{k}_per_psi": r[k] / r["psi"] for k in expected},
                     **{f"{k}_formula_per_psi": v for k, v in expected.items()},
                     "buffers_per_psi": r["buffers"] / r["psi"],
                     "total_per_psi": measured_total / r["psi"],
                     "step_peak_per_psi": r["step_peak"] / r["psi"],
                     "formula_per_psi": expected_total / r["psi"],
                     "ratio": measured_total / expected_total})
    return rows


def print_rows(rows: list[dict]) -> None:
    print("bytes per parameter on rank 0 (Psi = model parameters), measured / formula")
    print(f"{'prec':<6}{'dp':>3}{'zero':>5}{'params':>12}{'grads':>12}{'optimizer':>14}"
          f"{'total':>14}{'ratio':>7}{'buffers':>9}{'step peak':>10}  point, optimizer")
    def pair(r: dict, key: str) -> str:
        return f"{r[key + '_per_psi']:.2f}/{r[key + '_formula_per_psi']:.2f}"

    for r in rows:
        print(f"{r['precision']:<6}{r['dp']:>3}{r['stage']:>5}{pair(r, 'params'):>12}"
              f"{pair(r, 'grads'):>12}{pair(r, 'optimizer'):>14}"
              f"{r['total_per_psi']:>6.2f}/{r['formula_per_psi']:<7.2f}{r['ratio']:>7.3f}"
              f"{r['buffers_per_psi']:>9.2f}{r['step_peak_per_psi']:>10.2f}  {r['point']}, "
              f"{r['optimizer_class']}")
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"largest deviation of the total from its formula: {100 * worst:.1f}% "
          f"(target within {100 * TARGET_REL:.0f}%); Psi = {rows[0]['psi']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--rank-body", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_body:
        rank_main(args.rank_body[0])
        return 0
    rows = []
    for dp in args.dp:
        rows.extend(summarize(launch_ranks(__file__, dp, [])[0]))
    print_rows(rows)
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
