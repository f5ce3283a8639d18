"""megatron-core, imported without compiling kernels Tessera never calls. Every module of ours
takes megatron-core's pieces from here (tests/test_layering.py holds that).

When megatron.core is first imported, its package init reaches megatron.core.fusions and
megatron.core.activations, whose functions are decorated with `torch.compile` (megatron.core.jit).
Decorating loads dynamo, AOTAutograd and inductor, for functions Tessera does not call (its blocks
are its own, compiled per block when train.compile is on): 1.5 s of a rank's 6.5 s start-up on
CPU, measured, on every rank of every launch. Megatron's own switch,
`megatron.core.jit.disable_jit_fuser`, cannot be called before its package init has decorated
them, so for the length of the first import `torch.compile` is the identity: those functions stay
plain Python, and nothing else changes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch


def _leave_uncompiled(model: Callable | None = None, **_options: Any) -> Callable:
    """torch.compile's two forms, `@torch.compile` and `@torch.compile(...)`, as the identity."""
    return model if model is not None else (lambda function: function)


def _import_megatron_core() -> None:
    if "megatron.core" in sys.modules:  # imported already, by a caller of ours
        return
    compile_ = torch.compile
    torch.compile = _leave_uncompiled
    try:  # lazy: the import itself is what runs under the stand-in
        import megatron.core  # noqa: F401
    finally:
        torch.compile = compile_


_import_megatron_core()

from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: E402
from megatron.core.tensor_parallel import mappings, vocab_parallel_cross_entropy  # noqa: E402
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy  # noqa: E402

__all__ = ["ModelParallelConfig", "VocabParallelCrossEntropy", "mappings", "parallel_state",
           "tensor_parallel", "vocab_parallel_cross_entropy"]
