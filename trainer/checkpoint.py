"""Checkpoints: DeepSpeed's sharded per-rank save, plus our state, committed by a rename.

    checkpoints/step-00000100/      DeepSpeed's files (model and optimizer shards per rank)
        tessera_state.json          step, consumed samples, data cursor, layout (written last)
        rng/rank-00003.pt           each rank's RNG states
    checkpoints/latest              the committed tag, replaced atomically

A save goes into `step-N.tmp/` and is renamed to `step-N/` only when every rank has written, so
a directory named `step-N/` is always complete; `latest` moves after the rename.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

STATE_FILE = "tessera_state.json"
LATEST_FILE = "latest"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def step_of(tag: str) -> int | None:
    if tag.startswith("step-") and tag[5:].isdigit():
        return int(tag[5:])
    return None


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, root: str | Path, step: int, state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the committed directory."""
    root = Path(root)
    rank = dist.get_rank()
    final = root / tag_for(step)
    tmp = root / (tag_for(step) + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died before its commit
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={}, save_latest=False)
    (tmp / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        _write_atomic(tmp / STATE_FILE, json.dumps(state, indent=2))
        if final.exists():  # the same step saved again (e.g. a rerun): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST_FILE, final.name)
        _apply_retention(root, keep_last)
    dist.barrier()
    return final


def committed_steps(root: str | Path) -> list[int]:
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [step_of(p.name) for p in root.iterdir() if (p / STATE_FILE).is_file()]
    return sorted(s for s in steps if s is not None)


def _apply_retention(root: Path, keep_last: int) -> None:
    for step in committed_steps(root)[:-keep_last]:
        directory = root / tag_for(step)
        (directory / STATE_FILE).unlink()  # no longer a valid checkpoint before anything else goes
        shutil.rmtree(directory)


def latest_tag(root: str | Path) -> str | None:
    """The committed tag `latest` names, or the newest complete one if `latest` is missing."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (root / tag / STATE_FILE).is_file():
            return tag
    steps = committed_steps(root)
    return tag_for(steps[-1]) if steps else None


def load(engine, root: str | Path, tag: str) -> dict:
    """Collective: restore model, optimizer and schedule through DeepSpeed, then our state."""
    root = Path(root)
    directory = root / tag
    state = json.loads((directory / STATE_FILE).read_text())
    path, _ = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
    rng_file = directory / "rng" / f"rank-{dist.get_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state
