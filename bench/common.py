"""What the benchmarks share: launching a rank body on N local ranks, configs, robust statistics.

A benchmark script runs its measurement as `python <script> --rank-body ARGS...` on N ranks
through Tessera's own local launcher (torch's elastic launch), each rank writing its JSON result
to a file the driver reads back.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any


def launch_ranks(script: str, nproc: int, body_args: list[str]) -> list[Any]:
    """Run `python script --rank-body OUT_DIR *body_args` on `nproc` ranks; returns each rank's
    JSON result (rank order). Raises SystemExit with the launcher's code if a rank failed."""
    from tessera.launch.env import quiet_dependencies
    from tessera.launch.local import launch_local

    quiet_dependencies()
    with tempfile.TemporaryDirectory() as tmp:
        argv = [os.path.abspath(script), "--rank-body", tmp, *body_args]
        code = launch_local(nproc, argv, module=False)
        if code != 0:
            raise SystemExit(code)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(nproc)]


def write_rank_result(out_dir: str, result: Any) -> None:
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


def in_fresh_process(module: str, function: str, *args: Any) -> Any:
    """`module.function(*args)` (bench/ importable) in a new Python process, alone in its own
    process group (a caller's rendezvous variables are not passed on); its JSON result.

    For measurements of a process's peak memory, which only a fresh process gives."""
    import subprocess

    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from {module} import {function}; "
            f"print('RESULT', json.dumps({function}(*{args!r})))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        tail = "\n".join(out.stderr.splitlines()[-20:])
        raise RuntimeError(f"{module}.{function}{args} failed, exit {out.returncode}:\n{tail}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def write_json(path: str | None, figures: Any) -> None:
    """A benchmark's `--json PATH` output (nothing when no path was given)."""
    if path:
        Path(path).write_text(json.dumps(figures, indent=1) + "\n")


def bench_config(overrides: dict):
    """A Tessera Config from dotted overrides (no YAML file)."""
    from tessera.trainer.config import load_config

    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> dict:
    """The machine a result was measured on."""
    import deepspeed
    import torch

    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "load_avg_1min_at_start": round(load, 2),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def random_token_steps(cfg, num_steps: int, micro_batches: int, seed: int) -> list[list[tuple]]:
    """`num_steps` steps of `micro_batches` host (CPU, int64) micro-batches of random tokens,
    (input_ids, labels) as the loader hands them over."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    shape = (cfg.train.micro_batch_size, cfg.model.seq_len + 1)
    steps = []
    for _ in range(num_steps):
        step = []
        for _ in range(micro_batches):
            tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=generator)
            step.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
        steps.append(step)
    return steps
