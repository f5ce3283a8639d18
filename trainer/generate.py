"""`tessera generate CKPT_DIR --prompt TEXT`: text from a checkpoint, to see what the model learned.

One process, whatever layout saved the checkpoint: its full tensors
(`convert.reader.load_canonical_state`) go into a tp = 1 model, which continues the prompt token
by token (greedy at temperature 0, else sampling from the top-k tokens), decoded with the run's
tokenizer (the one its training data was prepared with, which every checkpoint carries;
`--tokenizer` names another).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

from tessera.data.format import DataError
from tessera.parallel import tensor_parallel as tpl
from tessera.parallel.topology import distributed
from tessera.trainer import checkpoint
from tessera.trainer.checkpoint import CheckpointError
from tessera.trainer.config import ConfigError, ModelConfig
from tessera.trainer.convert.reader import load_canonical_state
from tessera.trainer.model import build_model

USAGE = (
    "tessera generate CKPT_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] "
    "[--top-k K] [--seed S] [--tokenizer PATH]"
)


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: the whole vocabulary
    seed: int = 0


def find_step_dir(path: str | Path) -> Path:
    """A valid step directory as given, or the newest valid one of a run or checkpoints
    directory (checksums verified)."""
    hint = (
        "give a step directory (RUN_DIR/checkpoints/step-NNNNNNNN), RUN_DIR/checkpoints or "
        "RUN_DIR; `tessera checkpoint list RUN_DIR` shows them"
    )
    if not Path(path).exists():
        raise CheckpointError(f"{path}: no such checkpoint; {hint}")
    try:
        checkpoint.resolve_step_dir(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {hint}") from None
    return checkpoint.valid_step_dir(path)


def build_generator(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A tp = 1 fp32 model holding `tensors`, on the GPU when there is one (needs a process
    group: `init_distributed(1, 1)`)."""
    model, _ = build_model(cfg, tp=1)
    with torch.no_grad():
        for param, parts in tpl.canonical_params(model):
            param.copy_(tpl.local_tensor(parts, lambda p: tensors[p.name].float(), 0, 1))
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


@torch.no_grad()
def continue_ids(
    model,
    prompt_ids: list[int],
    sampling: Sampling,
    eos_id: int | None,
    vocab_size: int,
    context_len: int,
) -> list[int]:
    """New token ids after `prompt_ids` (stops at EOS, which is not returned)."""
    generator = torch.Generator().manual_seed(sampling.seed)  # sampling on the host: the same
    device = next(model.parameters()).device  # tokens from a seed on any device
    ids = list(prompt_ids)
    new: list[int] = []
    for _ in range(sampling.max_new_tokens):
        window = torch.tensor([ids[-context_len:]], dtype=torch.long, device=device)
        logits_V = model.logits(window)[-1, 0, :vocab_size].float().cpu()  # logits: [S, B, V]
        if sampling.temperature <= 0:
            token = int(logits_V.argmax())
        else:
            if 0 < sampling.top_k < vocab_size:
                kth = logits_V.topk(sampling.top_k).values[-1]
                logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
            probs_V = torch.softmax(logits_V / sampling.temperature, dim=-1)
            token = int(torch.multinomial(probs_V, 1, generator=generator))
        if token == eos_id:
            break
        ids.append(token)
        new.append(token)
    return new


def generate(
    ckpt_dir: str | Path,
    prompt: str,
    sampling: Sampling = Sampling(),
    tokenizer_path: str | None = None,
) -> str:
    """The continuation of `prompt` (decoded text, without the prompt)."""
    step_dir = find_step_dir(ckpt_dir)
    cfg, tensors = load_canonical_state(step_dir, verify=False)  # find_step_dir verified it
    tokenizer = checkpoint.tokenizer_of(step_dir, tokenizer_path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise DataError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the model of "
            f"{step_dir} {cfg.vocab_size}: --tokenizer names another tokenizer than "
            f"the run's"
        )
    # which checkpoint, once it loaded (on stderr: not in the text; an error stays one line)
    print(f"tessera: generating with {step_dir}", file=sys.stderr, flush=True)
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        prompt_ids = [tokenizer.eos_id]  # an empty prompt starts a new document
    with distributed(1, 1, "gloo"):  # megatron-core's layers need their groups, even of one
        model = build_generator(cfg, tensors)
        new = continue_ids(
            model, prompt_ids, sampling, tokenizer.eos_id, cfg.vocab_size, cfg.seq_len
        )
    return tokenizer.decode(new)


def generate_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tessera generate",
        usage=USAGE,
        description="Continue a prompt with a trained checkpoint.",
    )
    parser.add_argument(
        "checkpoint", help="a step directory, a run's checkpoints/ or a run directory"
    )
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest; 0: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="a prepared data directory or a tokenizer.json")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    for name, value in (("--max-new-tokens", args.max_new_tokens), ("--top-k", args.top_k)):
        if value < 0:
            print(f"tessera generate: error: {name} must be >= 0, got {value}", file=sys.stderr)
            return 2
    if not 0 <= args.seed < 2**64:  # torch.Generator's range
        print(f"tessera generate: error: --seed must lie in [0, 2**64), got {args.seed}",
              file=sys.stderr)
        return 2
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        print(
            f"tessera generate: error: --temperature must be a number >= 0, got "
            f"{args.temperature}",
            file=sys.stderr,
        )
        return 2
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.seed)
    try:
        text = generate(args.checkpoint, args.prompt, sampling, args.tokenizer)
    except (CheckpointError, DataError, ConfigError) as e:
        print(f"tessera generate: error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0
