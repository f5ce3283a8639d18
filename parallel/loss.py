"""The language-model loss over a vocabulary-parallel output projection.

Two ways to the same mean next-token cross entropy:

- `vocab_parallel_loss`: the projection's logits for the whole micro-batch, then megatron-core's
  vocabulary-parallel cross entropy. Backward keeps the fp32 softmax of every token: for a
  128k vocabulary that is the largest activation of the step (8k tokens: 4 GiB).
- `chunked_vocab_parallel_loss`: the projection and the loss a chunk of tokens at a time, with
  the gradients of each chunk computed in the forward pass while its logits exist (the fused
  linear cross entropy of Liger and Apple's cut-cross-entropy, here in plain PyTorch). Only one
  chunk's logits ever live; the step does the same matrix products, none twice.

Both compute each token's loss with megatron-core's own steps (max, predicted logit, sum of
exponentials, all-reduced over the tensor-parallel group), so per-token losses are the same bits
wherever the chunked projection's logits are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tessera.parallel.mcore import (
    VocabParallelCrossEntropy,
    mappings,
    parallel_state,
    vocab_parallel_cross_entropy,
)


def head_input(x_SBH: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """What every tensor-parallel rank projects: the whole sequence, its gradient summed over
    the group in backward (as megatron-core's ColumnParallelLinear enters its region)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return x_SBH
    if sequence_parallel:
        return mappings.gather_from_sequence_parallel_region(x_SBH,
                                                             tensor_parallel_output_grad=True)
    return mappings.copy_to_tensor_model_parallel_region(x_SBH)


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Padded vocabulary entries get -inf logits: numerically absent from the softmax."""
    local_vocab = logits.shape[-1]
    first_id = parallel_state.get_tensor_model_parallel_rank() * local_vocab
    if first_id + local_vocab <= vocab_size:
        return logits
    token_ids = torch.arange(first_id, first_id + local_vocab, device=logits.device)
    return logits.masked_fill(token_ids >= vocab_size, float("-inf"))


def vocab_parallel_loss(logits_SBV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy from vocabulary-sharded logits (fp32 inside)."""
    labels_SB = labels_BS.t().contiguous()
    return vocab_parallel_cross_entropy(logits_SBV.float().contiguous(), labels_SB).mean()


def chunked_vocab_parallel_loss(x_SBH: torch.Tensor, weight_VH: torch.Tensor,
                                labels_BS: torch.Tensor, vocab_size: int,
                                chunk_tokens: int) -> torch.Tensor:
    """Mean next-token cross entropy of `x_SBH @ weight_VH.T`, `chunk_tokens` tokens at a time.

    `x_SBH` is the whole sequence on every tensor-parallel rank (`head_input`), `weight_VH` this
    rank's vocabulary rows.
    """
    x_TH = x_SBH.reshape(-1, x_SBH.shape[-1])
    labels_T = labels_BS.t().reshape(-1)
    if not (torch.is_grad_enabled() and (x_TH.requires_grad or weight_VH.requires_grad)):
        losses = [_chunk_loss_and_dlogits(x_TH[rows], weight_VH, labels_T[rows], vocab_size,
                                          need_grads=False)[0]
                  for rows in _chunks(x_TH.shape[0], chunk_tokens)]
        return torch.cat(losses).mean()
    return _ChunkedCrossEntropy.apply(x_TH, weight_VH, labels_T, vocab_size, chunk_tokens)


def _chunks(tokens: int, chunk_tokens: int) -> list[slice]:
    return [slice(start, min(start + chunk_tokens, tokens))
            for start in range(0, tokens, chunk_tokens)]


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_TH: torch.Tensor, weight_VH: torch.Tensor, labels_T: torch.Tensor,
                vocab_size: int, chunk_tokens: int) -> torch.Tensor:
        tokens = x_TH.shape[0]
        grad_x_TH = torch.empty_like(x_TH)
        # Each chunk's weight gradient is rounded to the weight's dtype, then summed in fp32.
        grad_w_VH = torch.zeros_like(weight_VH, dtype=torch.float32)
        losses = []
        for rows in _chunks(tokens, chunk_tokens):
            loss_T, dlogits_TV = _chunk_loss_and_dlogits(
                x_TH[rows], weight_VH, labels_T[rows], vocab_size, need_grads=True
            )
            losses.append(loss_T)
            dlogits_TV = dlogits_TV.div_(tokens).to(x_TH.dtype)  # d(mean loss)/d(logits)
            torch.matmul(dlogits_TV, weight_VH, out=grad_x_TH[rows])
            grad_w_VH += (dlogits_TV.t() @ x_TH[rows]).float()
        ctx.save_for_backward(grad_x_TH, grad_w_VH)
        ctx.weight_dtype = weight_VH.dtype
        return torch.cat(losses).mean()

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple:
        grad_x_TH, grad_w_VH = ctx.saved_tensors
        grad_x = grad_x_TH * grad_loss.to(grad_x_TH.dtype)
        grad_w = (grad_w_VH * grad_loss).to(ctx.weight_dtype)
        return grad_x, grad_w, None, None, None


def _chunk_loss_and_dlogits(x_TH: torch.Tensor, weight_VH: torch.Tensor, labels_T: torch.Tensor,
                            vocab_size: int, need_grads: bool):
    """Per-token losses of one chunk and, if asked, d(sum of losses)/d(logits), in fp32."""
    group = parallel_state.get_tensor_model_parallel_group()
    ce = VocabParallelCrossEntropy
    logits_TV = mask_padded_vocab(F.linear(x_TH, weight_VH), vocab_size)
    logits_TV, logits_max_T = ce.calculate_logits_max(logits_TV)
    dist.all_reduce(logits_max_T, op=dist.ReduceOp.MAX, group=group)
    local_vocab = logits_TV.shape[-1]
    first_id = parallel_state.get_tensor_model_parallel_rank() * local_vocab
    target_mask_T, masked_target_T, predicted_T, sum_exp_T, exp_TV = ce.calculate_predicted_logits(
        logits_TV, labels_T, logits_max_T, first_id, first_id + local_vocab
    )
    dist.all_reduce(predicted_T, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(sum_exp_T, op=dist.ReduceOp.SUM, group=group)
    softmax_TV, loss_T = ce.calculate_cross_entropy_loss(exp_TV, predicted_T, sum_exp_T)
    if not need_grads:
        return loss_T, None
    rows_T = torch.arange(softmax_TV.shape[0], device=softmax_TV.device)
    softmax_TV[rows_T, masked_target_T] -= 1.0 - target_mask_T.float()
    return loss_T, softmax_TV
