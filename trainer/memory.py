"""Out of memory, said in one line that names the keys that set what a rank holds.

torch reports a CUDA allocation that fails (and a CPU one the kernel refuses at once) in a long
traceback from deep inside the model; what a user can change is a handful of our keys. A restart
would meet the same wall, so the error is fatal, as a config error is.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from tessera.data.progress import human_bytes
from tessera.trainer.config import Config, ConfigError

# what torch's CPU allocator says when malloc fails
CPU_ALLOCATION_FAILED = "DefaultCPUAllocator: can't allocate memory"


class OutOfMemory(ConfigError):
    """A rank ran out of memory; the message names the keys that lower what it needs."""


@contextlib.contextmanager
def out_of_memory_named(cfg: Config, step: int | None = None) -> Iterator[None]:
    """Turn an allocation failure inside into an OutOfMemory error: while building the model
    (step None), or in a training step."""
    try:
        yield
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(out_of_memory_line(cfg, step, str(e))) from None


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA allocation that failed (torch.OutOfMemoryError), or a CPU one malloc refused."""
    return isinstance(error, torch.OutOfMemoryError) or CPU_ALLOCATION_FAILED in str(error)


def out_of_memory_line(cfg: Config, step: int | None, message: str) -> str:
    t, p = cfg.train, cfg.parallel
    spread = (f"spread the model over more ranks: parallel.zero_stage ({p.zero_stage}), "
              f"parallel.tp ({p.tp}), parallel.pp ({p.pp})")
    if step is None:  # weights, gradients and optimizer state: no batch yet
        return (f"out of memory building the model{requested(message)}: {spread}, or make it "
                f"smaller (model.*)")
    keys = [f"lower train.micro_batch_size ({t.micro_batch_size}) or model.seq_len "
            f"({cfg.model.seq_len})"]
    if t.activation_checkpointing == "none":
        keys.append("set train.activation_checkpointing (now none)")
    if t.loss_chunk_tokens == 0:
        keys.append("set train.loss_chunk_tokens (the logits of a large vocabulary)")
    return f"out of memory at step {step}{requested(message)}: {'; '.join([*keys, spread])}"


def requested(message: str) -> str:
    """' (it asked for 2 GiB more)' from torch's message, or '' where it names no size."""
    cuda = re.search(r"Tried to allocate ([0-9.]+ [KMGT]?i?B)", message)
    cpu = re.search(r"you tried to allocate ([0-9]+) bytes", message)
    if cuda:
        return f" (it asked for {cuda.group(1)} more)"
    if cpu:
        return f" (it asked for {human_bytes(int(cpu.group(1)))} more)"
    return ""
