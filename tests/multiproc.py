"""Run one function on N fresh processes joined in one process group (gloo on CPU, or nccl with
one GPU per rank), like torchrun.

`fn` must be importable (module level) because processes are spawned. Each rank's return value
comes back in rank order; an exception on any rank fails the caller with that rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from typing import Any, Callable

from tessera.launch.local import free_port


def _entry(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple,
           results) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        import torch
        import torch.distributed as dist

        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        results.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world_size: int, fn: Callable, *args: Any, timeout_s: float = 600,
              backend: str = "gloo") -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, backend, fn, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes: dict[int, Any] = {}
    failures = []
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout_s)
            if ok:
                outcomes[rank] = value
            else:
                failures.append(f"rank {rank} failed:\n{value}")
                break  # the others may now wait forever on a collective
    finally:
        for p in procs:
            p.join(timeout=5 if failures else 60)
            if p.is_alive():
                p.kill()
    if failures:
        raise AssertionError("\n".join(failures))
    return [outcomes[r] for r in range(world_size)]
