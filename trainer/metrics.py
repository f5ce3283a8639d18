"""Metrics: one JSON object per logged step in run.dir/metrics.jsonl, and a console line (rank 0)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self._file = open(Path(run_dir) / "metrics.jsonl", "a") if enabled else None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        print(console_line(row), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def console_line(row: dict) -> str:
    grad_norm = row["grad_norm"]
    norm_text = "nan" if math.isnan(grad_norm) else f"{grad_norm:.3f}"
    return (
        f"step {row['step']:>6}/{row['total_steps']}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
        f"grad_norm {norm_text}  tokens/s {row['tokens_per_s']:,.0f}  "
        f"step_s {row['step_s']:.3f}"
    )
