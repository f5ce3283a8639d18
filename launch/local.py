"""Local launch: N ranks on this machine through torch's elastic launcher (what torchrun runs).

Each rank re-runs `python -m tessera train ...` with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set, so
a local launch, `torchrun -m tessera train ...` and (later) srun all reach the same entry point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Callable, Iterator

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from tessera.launch.restarts import run_with_restarts
from tessera.launch.signals import PREEMPTED_EXIT_CODE, USER_ERROR_EXIT_CODE

# what torch's elastic agent logs with while it runs the ranks
AGENT_LOGGERS = ("torch.distributed.elastic.multiprocessing.api",
                 "torch.distributed.elastic.agent.server.api",
                 "torch.distributed.elastic.agent.server.local_elastic_agent")


def inside_distributed_launch() -> bool:
    """True when a launcher (torchrun, our elastic launch, srun wrapper) already set the ranks."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_or_run(nproc_per_node: int, argv: list[str], run: Callable[[], int],
                  run_dir: str | None = None, max_restarts: int = 0) -> int:
    """`nproc_per_node` local ranks of `python -m tessera <argv>`, started again up to
    `max_restarts` times after a crash or a hang (tessera.launch.restarts; `run_dir` holds their
    heartbeats); or `run()` in this process when it is the only rank, or a rank already (started
    by torchrun, srun or us)."""
    if nproc_per_node > 1 and not inside_distributed_launch():
        if run_dir is None or max_restarts == 0:
            return launch_local(nproc_per_node, argv)
        code, _ = run_with_restarts(lambda: launch_local(nproc_per_node, argv), run_dir,
                                    max_restarts)
        return code
    return run()


def failure_to_name(exit_codes: dict[int, int], first_reaped: int) -> int:
    """The failed rank the launcher's line names: the lowest that stopped on an error of the
    user's, which it printed (a rank that met rank 0's error leaves it to rank 0 to say), else
    the first whose failure torch's agent saw (a crash, before its peers left after it)."""
    said = [rank for rank, code in exit_codes.items() if code == USER_ERROR_EXIT_CODE]
    return min(said) if said else first_reaped


def how_ranks_ended(rank: int, exit_code: int) -> str | None:
    """The launcher's line after its first failed rank, which has said why itself where it
    could; None where the rank's own lines say it all (stopped and saved: run again)."""
    if exit_code == PREEMPTED_EXIT_CODE:
        return None
    if exit_code == USER_ERROR_EXIT_CODE:
        return f"stopped by rank {rank}'s error above"
    if exit_code == -signal.SIGKILL:  # what the kernel sends when the machine's memory is out
        return (f"rank {rank} was killed by SIGKILL (by the out-of-memory killer where `dmesg` "
                f"says so); its output is above")
    if exit_code < 0:
        return f"rank {rank} was killed by {signal_name(-exit_code)}; its output is above"
    return f"rank {rank} failed with exit code {exit_code}; its output is above"


def signal_name(number: int) -> str:
    """SIGKILL for 9; 'signal 40' for a real-time signal, which has no name of its own."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@contextlib.contextmanager
def _agent_quiet() -> Iterator[None]:
    """Torch's agent logs each rank's failure and every signal it sends the others, a line
    each in glog format; the ranks and the line above say it for a user."""
    loggers = [logging.getLogger(name) for name in AGENT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def launch_local(nproc_per_node: int, args: list[str], module: bool = True) -> int:
    """Start `nproc_per_node` ranks of `python -m tessera <args>` (or `python <args>` with
    module=False, for a script); returns the exit code."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc_per_node,
        run_id=f"tessera-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        rdzv_configs={"is_host": True},
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    try:
        argv = ["-m", "tessera", *args] if module else args
        with _agent_quiet():
            elastic_launch(config, entrypoint=sys.executable)(*argv)
    except ChildFailedError as e:
        exit_codes = {r: failure.exitcode for r, failure in e.failures.items()}
        rank = failure_to_name(exit_codes, first_reaped=e.get_first_failure()[0])
        exit_code = exit_codes[rank]
        ending = how_ranks_ended(rank, exit_code)
        if ending:
            print(f"tessera: {ending}", file=sys.stderr)
        return exit_code if exit_code > 0 else 1
    except SignalException as e:  # Ctrl-C or a kill of this launcher: the ranks got SIGTERM
        print(f"tessera: stopped on {e.sigval.name}; the ranks' lines above say where they "
              f"saved (at a step boundary, if they reached one in time)", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0
