"""Pipeline parallelism through DeepSpeed's PipelineModule and its 1F1B engine."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable
from typing import Any

import torch
from deepspeed.pipe import PipelineModule

from tessera.parallel.topology import Topology, deepspeed_topology


def stage_boundaries(blocks_per_stage: list[int]) -> list[int]:
    """Layer indices where stages start, for the list [embedding, blocks..., final norm, output].

    The first stage also holds the embedding, the last the final norm and output layer.
    """
    bounds = [0, 1 + blocks_per_stage[0]]
    for count in blocks_per_stage[1:]:
        bounds.append(bounds[-1] + count)
    bounds[-1] += 2
    return bounds


class _PipelineModule(PipelineModule):
    """DeepSpeed's PipelineModule, plus an explicit list of blocks per stage."""

    def __init__(self, *args: Any, boundaries: list[int] | None = None, **kwargs: Any) -> None:
        self._explicit_boundaries = boundaries
        super().__init__(*args, **kwargs)

    def _partition_layers(self, method: str = "uniform") -> None:
        if self._explicit_boundaries is None:
            return super()._partition_layers(method)
        # DeepSpeed knows only named methods; an explicit split sets the same two things they set.
        self.parts = self._explicit_boundaries
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def build_pipeline(specs: list, loss_fn: Callable[..., torch.Tensor], topo: Topology,
                   partition: str | list[int]) -> PipelineModule:
    """`partition`: "parameters" (balanced by parameter count), "uniform", or blocks per stage.

    DeepSpeed prints its layer seeds, its topology and every stage's layers to rank 0's stdout
    as it builds the module; Tessera's own start-up lines say the layout, so those go."""
    how = {"boundaries": stage_boundaries(partition)} if isinstance(partition, list) else \
        {"partition_method": partition}
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            return _PipelineModule(layers=specs, loss_fn=loss_fn,
                                   topology=deepspeed_topology(topo), **how)
    except Exception:
        sys.stderr.write(printed.getvalue())  # what DeepSpeed said before it failed
        raise
