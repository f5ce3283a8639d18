"""Run one function on N fresh processes joined in one process group (gloo on CPU, or nccl with
one GPU per rank), like torchrun.

`fn` must be importable (module level): CPU ranks start from a fork server that has imported
torch, DeepSpeed, megatron-core and the trainer once (3 s of CPU a rank otherwise, the largest
cost of a test of a few steps), then take the caller's environment and working directory. Each
rank's return value comes back in rank order; an exception on any rank fails the caller with
that rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from typing import Any, Callable

from tessera.launch.local import free_port

RESULT_IN_FLIGHT_S = 5.0  # a result put right before a rank's exit may still be in the pipe


# imported once by the fork server, before it forks any rank
PRELOADED = ["tessera.trainer.train"]


def _context(backend: str) -> mp.context.BaseContext:
    """The fork server; spawn for CUDA ranks (a fork after anything touched the driver fails)."""
    if backend == "nccl":
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOADED)
    return ctx


def _entry(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple,
           results, environ: dict[str, str] | None = None, cwd: str | None = None) -> None:
    # the fork server's environment and directory are those of the first run_ranks of this
    # process: a rank takes the caller's (a test's monkeypatch.setenv included)
    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)
    if cwd is not None:
        os.chdir(cwd)
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
        # pickled here, tensors by value: the queue's own pickler shares a tensor's storage as a
        # file descriptor, which the parent cannot take once this rank has exited
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _silent_exits(procs: list, outcomes: dict, ended_at: dict[int, float],
                  timed_out: bool) -> list[str]:
    """Ranks that ended without a result (an os._exit, a signal): failed at once rather than
    waited for until the timeout. A result put just before the exit is given time to arrive;
    `ended_at` keeps when each rank was first seen ended."""
    now = time.monotonic()
    for rank, p in enumerate(procs):
        if p.exitcode is not None:
            ended_at.setdefault(rank, now)
    silent = [f"rank {rank} exited with code {procs[rank].exitcode} and no result"
              for rank, at in ended_at.items()
              if rank not in outcomes and now - at > RESULT_IN_FLIGHT_S]
    if timed_out:
        silent.append(f"no result from ranks {sorted(set(range(len(procs))) - set(outcomes))}")
    return silent


def run_ranks(world_size: int, fn: Callable, *args: Any, timeout_s: float = 600,
              backend: str = "gloo") -> list[Any]:
    ctx = _context(backend)
    results = ctx.Queue()
    port = free_port()
    caller = (dict(os.environ), os.getcwd())
    procs = [ctx.Process(target=_entry,
                         args=(r, world_size, port, backend, fn, args, results, *caller))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes: dict[int, Any] = {}
    failures = []
    try:
        deadline, ended_at = time.monotonic() + timeout_s, {}
        while len(outcomes) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                failures += _silent_exits(procs, outcomes, ended_at, time.monotonic() > deadline)
                if failures:
                    break
                continue
            if ok:
                outcomes[rank] = pickle.loads(value)
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
