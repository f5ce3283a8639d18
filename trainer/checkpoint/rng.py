"""RNG states as tensors and plain values (loadable with weights_only=True)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict:
    version, key, gauss = random.getstate()
    kind, np_key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "key": torch.tensor(key, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "key": torch.from_numpy(np_key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["key"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["key"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def restore_rng_at_first_forward(module: torch.nn.Module, state: dict) -> None:
    """Set the RNG states just before the module's next forward, not now: what the job does in
    between (torch's DataLoader draws its base seed from the global generator when its iterator
    is made) happened before the save in the uninterrupted run, so it must not shift the streams.
    """
    def hook(*_: Any) -> None:
        handle.remove()
        set_rng_state(state)

    handle = module.register_forward_pre_hook(hook)
