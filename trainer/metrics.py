"""Metrics: per logged step one JSON object in run.dir/metrics.jsonl, the same values as TensorBoard
scalars (and optionally Weights & Biases), and one console line, all on rank 0.

Row keys: the flat ones of the run-directory contract (step, loss, lr, grad_norm, tokens_per_s,
consumed_samples, global_batch_size, step_s, total_steps, time) and namespaced ones
("throughput/mfu", "eval/loss", "data/tokens/NAME", ...). TensorBoard tags are the namespaced
keys as they are, the flat ones mapped by `TAGS`.

Model FLOPs per token: 6N + 12·L·d·T (N = parameters except the input embedding: the 6N of the
matrix multiplies forward and backward, 12·L·d·T the attention scores and values), so MFU =
tokens/s per device x FLOPs per token / peak. The peak comes from `log.peak_tflops` or, on CUDA,
from `PEAK_BF16_TFLOPS` by device name; without either, no MFU is reported (a CPU has no
meaningful tensor-core peak).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import secrets
import string
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tessera.data.progress import clock_text, human_count
from tessera.trainer.architecture import flops_per_token
from tessera.trainer.config import Config, ConfigError, LogConfig, _as_dict, to_yaml

# bf16 dense tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name();
# the first match wins, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (the name reads "NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)

# Flat row keys and their TensorBoard tags; keys that hold a "/" are tags already.
TAGS = {
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "lr": "optim/lr",
    "tokens_per_s": "throughput/tokens_per_s",
    "step_s": "time/step",
    "consumed_samples": "train/consumed_samples",
    "global_batch_size": "train/global_batch_size",
}
NOT_SCALARS = ("step", "time", "total_steps")


# ---------------------------------------------------------------------------------------------
# FLOPs, MFU, memory


def device_peak_tflops(
    log: LogConfig, precision: str, device: torch.device | None = None
) -> float | None:
    """One device's peak TFLOP/s: log.peak_tflops, else the bf16 table entry of this CUDA device
    (bf16 runs only: fp32 matmuls do not reach tensor-core peaks); None when unknown."""
    if log.peak_tflops is not None:
        return log.peak_tflops
    if precision != "bf16" or not torch.cuda.is_available():
        return None
    return peak_by_name(torch.cuda.get_device_name(device))


def peak_by_name(device_name: str) -> float | None:
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment in device_name:
            return tflops
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the most memory tensors held on this device; CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# Per-step throughput and timing, aggregated over the log interval


class StepTimes:
    """Step and data-wait seconds since the last logged row, and the clock for the ETA."""

    def __init__(self, cfg: Config, world_size: int, device: torch.device, start_step: int):
        self.seq_len = cfg.model.seq_len
        self.total_steps = cfg.train.steps
        self.world_size = world_size
        self.device = device
        self.flops_per_token = flops_per_token(cfg.model)
        self.peak_tflops = device_peak_tflops(cfg.log, cfg.train.precision, device)
        self.start_step = start_step
        self.started = time.perf_counter()
        self._steps, self._step_s, self._data_s, self._samples = 0, 0.0, 0.0, 0
        self._save_s: float | None = None

    def add(self, step_s: float, data_s: float, samples: int) -> None:
        """A step of `samples` sequences (the global batch: a batch-size ramp changes it)."""
        self._steps += 1
        self._step_s += step_s
        self._data_s += data_s
        self._samples += samples

    def saved(self, seconds: float) -> None:
        self._save_s = seconds

    def eta_s(self, step: int) -> float | None:
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.started) / done * (self.total_steps - step)

    def row(self, step: int) -> dict[str, float]:
        """Collective (a max over ranks for memory): the timing part of a metrics row; resets."""
        steps, step_s = max(self._steps, 1), max(self._step_s, 1e-12)
        tokens_per_s = self._samples * self.seq_len / step_s
        per_device = tokens_per_s / self.world_size
        tflops = per_device * self.flops_per_token / 1e12
        memory = torch.tensor(
            [peak_memory_bytes(self.device)], dtype=torch.float64, device=self.device
        )
        if dist.is_initialized():
            dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        row = {
            "tokens_per_s": tokens_per_s,
            "step_s": step_s / steps,
            "throughput/tokens_per_s_per_device": per_device,
            "throughput/tflops": tflops,
            "time/data_wait": self._data_s / step_s,
            "memory/peak_gb": memory.item() / 1e9,
        }
        if self.peak_tflops:
            row["throughput/mfu"] = tflops / self.peak_tflops
        eta = self.eta_s(step)
        if eta is not None:
            row["time/eta_s"] = eta
        if self._save_s is not None:
            row["checkpoint/save_seconds"] = self._save_s
        self._steps, self._step_s, self._data_s, self._save_s = 0, 0.0, 0.0, None
        self._samples = 0
        return row


# ---------------------------------------------------------------------------------------------
# The console


def _number(value: float, spec: str) -> str:
    return "nan" if value is None or not math.isfinite(value) else format(value, spec)


def console_line(row: dict) -> str:
    """One compact line: step/total, loss, lr, grad norm, tokens/s, MFU, memory, ETA."""
    parts = [
        f"step {row['step']:>{len(str(row['total_steps']))}}/{row['total_steps']}",
        f"loss {_number(row['loss'], '.4f')}",
        f"lr {row['lr']:.2e}",
        f"gnorm {_number(row['grad_norm'], '.3f')}",
        f"{human_count(row['tokens_per_s'])} tok/s",
    ]
    if "throughput/mfu" in row:
        parts.append(f"MFU {100 * row['throughput/mfu']:.1f}%")
    if "memory/peak_gb" in row:
        parts.append(f"mem {row['memory/peak_gb']:.2f} GB")
    if "time/eta_s" in row:
        parts.append(f"ETA {clock_text(row['time/eta_s'])}")
    if row.get("train/skipped"):
        parts.append("SKIPPED (non-finite)")
    line = " | ".join(parts)
    if "eval/loss" in row:
        line += (
            f"\n  eval: loss {_number(row['eval/loss'], '.4f')}  perplexity "
            f"{_number(row['eval/perplexity'], '.2f')}"
        )
    return line


def resolved_config_text(cfg: Config, width: int = 100) -> str:
    """The whole config, one wrapped block per section: `  model: hidden_size=64 ...`."""
    lines = ["tessera: resolved config (also in run.dir/config.yaml)"]
    for section, values in _as_dict(cfg).items():
        items = " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())
        lines.extend(
            textwrap.wrap(
                items,
                width,
                initial_indent=f"  {section}: ",
                subsequent_indent=" " * (len(section) + 4),
                break_on_hyphens=False,
            )
        )
    return "\n".join(lines)


def config_changes(before: Config, after: Config) -> list[str]:
    """`section.key old -> new` for each key whose value differs."""
    old, new = _as_dict(before), _as_dict(after)
    return [f"{section}.{key} {json.dumps(old[section][key])} -> {json.dumps(value)}"
            for section, values in new.items() for key, value in values.items()
            if old.get(section, {}).get(key) != value]


def print_resolved_config(cfg: Config, resumed_config: Config | None = None) -> None:
    """The whole config at a first start; on a resume one line: its hash (the checkpoint
    manifest's config_sha256) and what changed since the checkpoint."""
    if resumed_config is None:
        print(resolved_config_text(cfg), flush=True)
        return
    digest = hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:12]
    changes = config_changes(resumed_config, cfg)
    said = "changed since the checkpoint: " + "; ".join(changes) if changes else \
        "unchanged since the checkpoint"
    print(f"tessera: config {digest} (run.dir/config.yaml), {said}", flush=True)


# ---------------------------------------------------------------------------------------------
# Warnings that say which rank they come from


class _RankPrefix(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__("%(message)s")
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        return f"[rank {self.rank}] {super().format(record)}"


def tag_warnings_with_rank(rank: int, world_size: int) -> None:
    """In a job of several ranks, prefix this process's `tessera.*` log records and Python
    warnings with its rank, so a warning printed by rank 5 says so."""
    if world_size <= 1:
        return
    logger = logging.getLogger("tessera")
    if not any(getattr(h, "_tessera_rank", None) is not None for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_RankPrefix(rank))
        handler._tessera_rank = rank  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if getattr(original, "_tessera_rank", None) is not None:
            return original(message, category, filename, lineno, file, line)
        print(f"[rank {rank}] {category.__name__}: {message}", file=file or sys.stderr, flush=True)

    show._tessera_rank = rank  # type: ignore[attr-defined]
    if getattr(original, "_tessera_rank", None) is None:
        warnings.showwarning = show


class _RankLines:
    """A text stream that starts every line with "[rank N] " (lines that already name a rank
    are left alone), written through to the stream it wraps a whole line at a time: ranks share
    one pipe, and print() writes a line and its newline apart."""

    def __init__(self, stream: Any, rank: int):
        self.stream = stream
        self.prefix = f"[rank {rank}] "
        self.partial = ""  # the start of a line not yet ended, held back
        self.at_line_start = True  # of what went through

    def write(self, text: str) -> int:
        self.partial += text
        complete, newline, self.partial = self.partial.rpartition("\n")
        if newline:
            self._emit(complete + newline)
        return len(text)

    def flush(self) -> None:
        if self.partial:
            self._emit(self.partial)
            self.partial = ""
        self.stream.flush()

    def _emit(self, text: str) -> None:
        out = []
        for line in text.splitlines(keepends=True):
            if self.at_line_start and not line.startswith("[rank "):
                out.append(self.prefix)
            out.append(line)
            self.at_line_start = line.endswith("\n")
        self.stream.write("".join(out))

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...
        return getattr(self.stream, name)


def tag_output_with_rank(rank: int) -> None:
    """On a rank other than 0, every line this process prints through Python (its own and its
    dependencies': DeepSpeed's logger, megatron-core's, torch's warnings, print) starts with
    "[rank N]". Output written by native code straight to the file descriptors is not seen."""
    if rank == 0 or isinstance(sys.stdout, _RankLines):
        return
    originals = {id(sys.stdout): _RankLines(sys.stdout, rank),
                 id(sys.stderr): _RankLines(sys.stderr, rank)}
    loggers = [logging.getLogger(), *(logger for logger in logging.root.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    for logger in loggers:  # handlers made at import time hold the streams themselves
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and id(stream) in originals:
                handler.setStream(originals[id(stream)])
    sys.stdout, sys.stderr = originals[id(sys.stdout)], originals[id(sys.stderr)]


def warn(message: str) -> None:
    """A warning on stderr from this rank (prefixed with the rank in multi-rank jobs)."""
    logging.getLogger("tessera.trainer").warning("tessera: warning: %s", message)


# ---------------------------------------------------------------------------------------------
# Sinks: metrics.jsonl, TensorBoard, Weights & Biases


def scalars(row: dict) -> dict[str, float]:
    """A row's numeric entries under their TensorBoard tags."""
    out = {}
    for key, value in row.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[TAGS.get(key, key)] = float(value)
    return out


class MetricsLog:
    """Rank 0 writes; on other ranks every method does nothing."""

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool,
        cfg: Config | None = None,
        start_step: int = 0,
        console: bool = True,
    ):
        self.enabled = enabled
        self.console = console
        self._file = None
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        self._file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - open for the run
        if cfg is not None and cfg.log.tensorboard:
            from torch.utils.tensorboard import (
                SummaryWriter,  # lazy: only with log.tensorboard (it imports TensorBoard)
            )

            # purge_step hides events a crashed start wrote past the step this start resumes at
            self._tensorboard = SummaryWriter(
                str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
        if cfg is not None and cfg.log.wandb:
            self._wandb = open_wandb(cfg, run_dir)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        values = scalars(row)
        if self._tensorboard is not None:
            for tag, value in values.items():
                self._tensorboard.add_scalar(tag, value, row["step"])
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=row["step"])
        if self.console:
            print(console_line(row), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


WANDB_ID_FILE = "wandb_run_id"


def open_wandb(cfg: Config, run_dir: Path) -> Any:
    """A W&B run, resumed under the id this run directory recorded at its first start."""
    try:
        import wandb  # lazy: optional (log.wandb)
    except ImportError:
        raise ConfigError(
            "config key 'log.wandb': the wandb package is not installed; "
            "`pip install wandb`, or set log.wandb=false"
        ) from None
    id_file = run_dir / WANDB_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        id_file.write_text(run_id + "\n")
    return wandb.init(
        project=cfg.log.wandb_project,
        entity=cfg.log.wandb_entity,
        mode=cfg.log.wandb_mode,
        name=cfg.run.name or run_dir.name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=_as_dict(cfg),
    )
