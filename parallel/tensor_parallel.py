"""Tensor-parallel pieces: megatron-core layers, and how each local tensor maps to full ones.

Every parameter of a tensor-parallel layer is described by `Part`s: which full ("canonical",
layout-independent) tensor it is cut from and along which dimension. A fused projection (q, k, v
in one matrix) lists several parts, concatenated along dim 0 in the local tensor. This one
description drives initialization (draw the full tensor from the seed, keep this rank's slice, so
a tp=2 model is the tp=1 model split in two) and, later, checkpoint conversion.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from tessera.parallel.mcore import ModelParallelConfig, parallel_state
from tessera.parallel.mcore import tensor_parallel as mcore_tp
from tessera.parallel.parts import Part, padded_vocab_size  # noqa: F401  (callers import them here too)


def megatron_config(tp: int, params_dtype: torch.dtype, sequence_parallel: bool
                    ) -> ModelParallelConfig:
    # We initialize every weight ourselves (layout-independent), so megatron-core only allocates.
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=False,
        gradient_accumulation_fusion=False,
    )


def _no_init(weight: torch.Tensor) -> None:
    pass


def _mark_sharded(weight: torch.Tensor | None, dim: int) -> None:
    # megatron-core sets these attributes only inside its own initialization, which we skip; they
    # tell grad-norm code (ours and DeepSpeed's) that each rank holds a different slice. (It does
    # mark a column-parallel bias itself, at allocation.)
    if weight is not None and not hasattr(weight, "tensor_model_parallel"):
        mcore_tp.set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)


# With one tensor-parallel rank megatron-core's layers compute a plain matmul behind identity
# autograd functions and a Python-level backward; these subclasses, built only at tp=1, call
# `F.linear`/`F.embedding`: same parameters (so checkpoints), same bits, less work per call
# (bench/results/profile.md).
class _OneRankColumnLinear(mcore_tp.ColumnParallelLinear):
    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None) -> tuple[torch.Tensor, None]:
        return F.linear(input_, self.weight if weight is None else weight, self.bias), None


class _OneRankRowLinear(mcore_tp.RowParallelLinear):
    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.linear(input_, self.weight), None


class _OneRankEmbedding(mcore_tp.VocabParallelEmbedding):
    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_, self.weight)


def _layer_class(config: ModelParallelConfig, megatron_class: type, one_rank_class: type) -> type:
    return one_rank_class if config.tensor_model_parallel_size == 1 else megatron_class


def column_parallel(config: ModelParallelConfig, in_features: int, out_features: int, *,
                    skip_weight: bool = False, bias: bool = False
                    ) -> mcore_tp.ColumnParallelLinear:
    layer = _layer_class(config, mcore_tp.ColumnParallelLinear, _OneRankColumnLinear)(
        in_features, out_features, config=config, init_method=_no_init, bias=bias,
        gather_output=False, skip_weight_param_allocation=skip_weight,
    )
    _mark_sharded(layer.weight, dim=0)
    _mark_sharded(layer.bias, dim=0)
    return layer


def row_parallel(config: ModelParallelConfig, in_features: int, out_features: int
                 ) -> mcore_tp.RowParallelLinear:
    layer = _layer_class(config, mcore_tp.RowParallelLinear, _OneRankRowLinear)(
        in_features, out_features, config=config, init_method=_no_init, bias=False,
        input_is_parallel=True, skip_bias_add=False,
    )
    _mark_sharded(layer.weight, dim=1)
    return layer


def vocab_parallel_embedding(config: ModelParallelConfig, padded_vocab: int,
                             hidden_size: int) -> mcore_tp.VocabParallelEmbedding:
    layer = _layer_class(config, mcore_tp.VocabParallelEmbedding, _OneRankEmbedding)(
        padded_vocab, hidden_size, init_method=_no_init, config=config,
        reduce_scatter_embeddings=config.sequence_parallel,
    )
    _mark_sharded(layer.weight, dim=0)
    return layer


def replicated(module: torch.nn.Module, config: ModelParallelConfig, *,
               sees_local_heads: bool = False) -> torch.nn.Module:
    """A module whose weights every tensor-parallel rank holds whole (norms).

    With sequence parallelism each rank sees only its slice of the sequence, and a norm of the
    attention heads (`sees_local_heads`) only this rank's heads: then its gradient is partial,
    and a hook sums it over the tensor-parallel group as it is produced (megatron-core's own
    trainer does this in its grad finalization, which DeepSpeed does not run).
    """
    tp = config.tensor_model_parallel_size
    if config.sequence_parallel or (sees_local_heads and tp > 1):
        for param in module.parameters():
            param.register_hook(_sum_over_tensor_parallel)
    return module


def _sum_over_tensor_parallel(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
    return grad


def tp_rank_and_size() -> tuple[int, int]:
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


# ---------------------------------------------------------------------------------------------
# Local tensors from full tensors


def canonical_params(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Parameter, list[Part]]]:
    """Every local parameter of a model whose layers state their `canonical_parts`, with the
    full tensors it is cut from: what initialization, generation and conversion fill."""
    for layer in model.modules():
        if hasattr(layer, "canonical_parts"):
            params = dict(layer.named_parameters())
            for local_name, parts in layer.canonical_parts().items():
                yield params[local_name], parts


def local_slice(full: torch.Tensor, part: Part, tp_rank: int, tp: int) -> torch.Tensor:
    if part.padded_rows is not None and part.padded_rows > full.shape[0]:
        pad = full.new_zeros((part.padded_rows - full.shape[0], *full.shape[1:]))
        full = torch.cat([full, pad], dim=0)
    if part.split_dim is None:
        return full
    return full.chunk(tp, dim=part.split_dim)[tp_rank]


def local_tensor(parts: list[Part], full_of: Callable[[Part], torch.Tensor], tp_rank: int,
                 tp: int) -> torch.Tensor:
    pieces = [local_slice(full_of(p), p, tp_rank, tp) for p in parts]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def seeded_normal(seed: int, name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """A full tensor drawn from (seed, name) alone: the same whatever the layout or rank."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std
