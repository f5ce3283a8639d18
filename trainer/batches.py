"""Micro-batches as the engine takes them: on the device without a host sync, and with
document masking, inputs that carry each token's document."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tessera.trainer.model import document_ids


def with_documents(micro_batches: Iterator[tuple[torch.Tensor, torch.Tensor]], eos_id: int
                   ) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """data.document_masking: each micro-batch's inputs as (token ids, document ids), which
    the model takes (model.document_ids: a document ends at each EOS)."""
    for input_ids, labels in micro_batches:
        yield (input_ids, document_ids(input_ids, eos_id)), labels


def to_device(tensor: torch.Tensor | tuple, device: torch.device) -> torch.Tensor | tuple:
    """A host batch on `device` without a host sync: `.to(cuda)` from pageable memory waits for
    the GPU to drain its queue, at every micro-batch; from pinned memory the copy is queued."""
    if isinstance(tensor, tuple):
        return tuple(to_device(t, device) for t in tensor)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
