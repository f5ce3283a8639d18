"""Tensor-parallel traffic: the bytes all-reduced in one training step, measured against theory.

Tessera trains at tp=2 x dp=2 (4 ranks, ZeRO 0, no sequence parallelism). During one step every
collective call (torch.distributed.all_reduce and the other collectives, which megatron-core,
DeepSpeed and our own code all go through) is recorded on rank 0 with its process group, payload
(numel x element size: the tensor handed to the collective, not the bytes on the wire) and where
it came from: module hooks say which layer and whether in forward or backward, the call stack says
whether the loss or our grad-norm code made it. Each term is printed beside its theory, per step
of m micro-batches of b sequences of s tokens, hidden h, L blocks, activations of e bytes:

  block forward     2L*m all-reduces of b*s*h*e: the outputs of the row-parallel attention output
                    and MLP down projections (each rank holds a partial sum)
  block backward    2L*m of b*s*h*e: the input gradients of the column-parallel qkv and gate_up
                    projections (each rank computed a part from its column slice)
  embedding         m of b*s*h*e, forward only: the vocabulary-parallel embedding (each rank looks
                    up the ids in its vocabulary slice, zeros elsewhere); its backward is local
  output head       m of b*s*h*e, backward only: the input gradient of the column-parallel head
  loss              3m of b*s*4 bytes: vocabulary-parallel cross entropy all-reduces the max logit,
                    the target's logit and the sum of exponentials per token (fp32), forward only
  grad norm         1 fp32 scalar over the TP group (ZeRO 0 in fp32: our clipper sums squares)
  gradient (DP)     this rank's parameters' gradients (fp32), once per step over the data-parallel
                    group (DeepSpeed at ZeRO 0): the matrices' 1/tp slices and the whole norms
  loss (DP)         1 fp32 scalar over the data-parallel group (the logged mean loss)

The issue's theory, "two all-reduces of b*s*h per block forward and two backward, per
micro-batch", is the two block rows; the other rows are the rest of the step, explained above.
Outside the measured `train_step`, the training loop adds two tiny all-reduces per step over all
ranks: the loader's error/skip flags (2 int64) and the stop-signal flag (1 int32).
With bf16 (GPU runs) the activation terms halve (e = 2); the loss terms stay fp32.

Run: .venv/bin/python bench/tp_traffic.py
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback

from common import bench_config, launch_ranks, write_json, write_rank_result

MODEL = {
    "model.vocab_size": 1024, "model.hidden_size": 128, "model.num_layers": 4,
    "model.num_heads": 4, "model.num_kv_heads": 2, "model.ffn_hidden_size": 352,
    "model.seq_len": 64,
}
TRAIN = {"train.micro_batch_size": 2, "train.global_batch_size": 8, "train.grad_clip": 1.0,
         "parallel.tp": 2, "parallel.zero_stage": 0}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "all_reduce_coalesced", "_all_gather_base",
               "_reduce_scatter_base")


class Recorder:
    """Wraps torch.distributed's collectives; while `active`, records each call on this rank."""

    def __init__(self, groups: dict):
        import torch.distributed as dist

        self.groups = groups  # name -> process group
        self.where = ("", "")  # (layer, phase) set by module hooks
        self.active = False
        self.calls: list[dict] = []
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name: str, func):
        def wrapped(*args, **kwargs):
            if self.active:
                self._record(name, args, kwargs)
            return func(*args, **kwargs)
        return wrapped

    def _group_name(self, group) -> str:
        import torch.distributed as dist

        if group is None or group == dist.group.WORLD:
            return "world"
        for name, candidate in self.groups.items():
            if group == candidate:
                return name
        return "other"

    def _record(self, name: str, args, kwargs) -> None:
        import torch

        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        lists = [a for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple))]
        tensors += [t for seq in lists for t in seq if isinstance(t, torch.Tensor)]
        payload = tensors[-1] if name in ("all_gather_into_tensor", "_all_gather_base") else \
            tensors[0]
        stack = "".join(traceback.format_stack(limit=25))
        self.calls.append({
            "op": name, "group": self._group_name(kwargs.get("group", _positional_group(args))),
            "numel": payload.numel(), "bytes": payload.numel() * payload.element_size(),
            "layer": self.where[0], "phase": self.where[1],
            "from_loss": "cross_entropy" in stack,
            "from_grad_norm": "grad_norm_of" in stack,
        })


def _positional_group(args):
    for a in args[1:]:
        if type(a).__name__ in ("ProcessGroup", "ProcessGroupGloo", "ProcessGroupNCCL"):
            return a
    return None


def install_layer_hooks(model, recorder: Recorder) -> None:
    """Forward and backward pre-hooks that tell the recorder which layer runs, in which phase."""
    from tessera.trainer import model as llama

    kinds = {llama.Embedding: "embedding", llama.Block: "block", llama.FinalNorm: "final_norm",
             llama.OutputLayer: "output head"}
    for module in model.modules():
        kind = kinds.get(type(module))
        if kind is None:
            continue

        def forward_pre(mod, inputs, kind=kind):
            recorder.where = (kind, "forward")

        def forward_post(mod, inputs, output, kind=kind):
            # The gradient of a layer's output arrives right before the layer's own backward.
            # (A tensor hook, not a module backward hook: those wrap the output in a view that
            # megatron-core's cross entropy, modifying the logits in place, refuses.)
            if output.requires_grad:
                output.register_hook(lambda grad: setattr(recorder, "where", (kind, "backward")))

        module.register_forward_pre_hook(forward_pre)
        module.register_forward_hook(forward_post)


def classify(call: dict) -> str:
    if call["from_loss"]:
        return "loss (vocab-parallel cross entropy)"
    if call["from_grad_norm"]:
        return "grad norm"
    if call["group"] == "dp":
        return "loss (DP mean)" if call["numel"] == 1 else "gradient (DP)"
    if call["group"] == "tp":
        return f"{call['layer']} {call['phase']}"
    return f"other ({call['op']} over {call['group']})"


def local_params(model, tp: int) -> int:
    """Parameters one tensor-parallel rank holds: matrices split tp ways (the vocabulary padded
    to a multiple of tp), norm weights whole."""
    h, ffn, head_dim = model.hidden_size, model.ffn_hidden_size, model.head_size
    vocab = -(-model.vocab_size // tp) * tp
    block = (h * (model.num_heads + 2 * model.num_kv_heads) * head_dim
             + model.num_heads * head_dim * h + 3 * h * ffn) // tp + 2 * h
    heads = 1 if model.tie_embeddings else 2  # input embedding and output head
    return model.num_layers * block + h + heads * vocab * h // tp


def theory(cfg, dp: int, element_bytes: int) -> dict[str, tuple[int, int]]:
    """term -> (calls, bytes) per step on one rank."""
    m = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    b, s, h, L = cfg.train.micro_batch_size, cfg.model.seq_len, cfg.model.hidden_size, \
        cfg.model.num_layers
    act = b * s * h * element_bytes
    return {
        "block forward": (2 * L * m, 2 * L * m * act),
        "block backward": (2 * L * m, 2 * L * m * act),
        "embedding forward": (m, m * act),
        "output head backward": (m, m * act),
        "loss (vocab-parallel cross entropy)": (3 * m, 3 * m * b * s * 4),
        "grad norm": (1, 4),
        "gradient (DP)": (1, local_params(cfg.model, cfg.parallel.tp) * 4),
        "loss (DP mean)": (1, 4),
    }


def rank_main(out_dir: str) -> None:
    import torch

    from tessera.launch.env import quiet_dependencies
    from tessera.parallel.mcore import parallel_state
    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.train import build_training_engine, train_step

    quiet_dependencies()
    cfg = bench_config({**MODEL, **TRAIN})
    topo = init_distributed(tp=cfg.parallel.tp, pp=1)
    recorder = Recorder({"tp": parallel_state.get_tensor_model_parallel_group(),
                         "dp": parallel_state.get_data_parallel_group()})
    engine, _, clipper = build_training_engine(cfg, topo)
    install_layer_hooks(engine.module, recorder)
    micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * topo.dp)
    generator = torch.Generator().manual_seed(topo.dp_rank)

    def step_batches():
        for _ in range(micro):
            tokens = torch.randint(0, cfg.model.vocab_size,
                                   (cfg.train.micro_batch_size, cfg.model.seq_len + 1),
                                   generator=generator)
            yield tokens[:, :-1], tokens[:, 1:]

    train_step(engine, clipper, step_batches(), micro)  # first step: one-time set-up aside
    recorder.active = True
    train_step(engine, clipper, step_batches(), micro)
    recorder.active = False
    terms: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for call in recorder.calls:
        term = terms[classify(call)]
        term[0] += 1
        term[1] += call["bytes"]
    element_bytes = torch.finfo(torch.float32).bits // 8  # fp32 activations on CPU
    write_rank_result(out_dir, {
        "measured": dict(terms),
        "theory": theory(cfg, topo.dp, element_bytes),
        "shape": {"tp": topo.tp, "dp": topo.dp, "b": cfg.train.micro_batch_size,
                  "s": cfg.model.seq_len, "h": cfg.model.hidden_size,
                  "L": cfg.model.num_layers, "m": micro, "element_bytes": element_bytes},
    })
    destroy_distributed()


def summarize(result: dict) -> list[dict]:
    rows = []
    names = list(result["theory"]) + [n for n in result["measured"] if n not in result["theory"]]
    for name in names:
        calls, num_bytes = result["measured"].get(name, (0, 0))
        t_calls, t_bytes = result["theory"].get(name, (0, 0))
        rows.append({"term": name, "calls": calls, "theory_calls": t_calls, "bytes": num_bytes,
                     "theory_bytes": t_bytes,
                     "ratio": num_bytes / t_bytes if t_bytes else float("inf")})
    return rows


def print_rows(result: dict, rows: list[dict]) -> None:
    s = result["shape"]
    print(f"tp={s['tp']} dp={s['dp']}: b={s['b']} s={s['s']} h={s['h']} L={s['L']} m={s['m']} "
          f"micro-batches, {s['element_bytes']}-byte activations; one step on rank 0")
    print(f"{'term':<38}{'calls':>7}{'theory':>8}{'bytes':>12}{'theory':>12}{'ratio':>8}")
    for r in rows:
        print(f"{r['term']:<38}{r['calls']:>7}{r['theory_calls']:>8}{r['bytes']:>12}"
              f"{r['theory_bytes']:>12}{r['ratio']:>8.3f}")
    blocks = [r for r in rows if r["term"].startswith("block")]
    measured = sum(r["bytes"] for r in blocks)
    expected = sum(r["theory_bytes"] for r in blocks)
    print(f"block all-reduces (the issue's theory: 2 forward + 2 backward of b*s*h per block and "
          f"micro-batch): {measured} bytes measured / {expected} theory = "
          f"{measured / expected:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--rank-body", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_body:
        rank_main(args.rank_body[0])
        return 0
    result = launch_ranks(__file__, 4, [])[0]
    rows = summarize(result)
    print_rows(result, rows)
    write_json(args.json, {"shape": result["shape"], "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
