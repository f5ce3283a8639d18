"""`make gpu-check` on a machine without CUDA: one line, exit status 2, nothing run."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_without_cuda_says_so_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"),
                           "--results", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stdout.strip().splitlines() == [
        "gpu-check: no CUDA device here (torch.cuda.is_available() is false or torch is "
        "missing); nothing was run"]
    assert list(tmp_path.iterdir()) == []  # no report written
