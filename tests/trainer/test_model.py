"""The model: layout-independent initialization, and tp=2 computing what tp=1 computes."""

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks
from training import tiny_model_config

from tessera.trainer.config import ModelConfig

SEED = 7


def full_logits_and_loss(tp: int, cfg: ModelConfig) -> tuple[torch.Tensor, float, dict]:
    """On each rank: build, init, run a fixed batch; all-gather the vocabulary-sharded logits."""
    from tessera.parallel.mcore import parallel_state
    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.model import build_model, init_weights

    init_distributed(tp=tp, pp=1)
    try:
        model, padded = build_model(cfg, tp)
        init_weights(model, cfg, SEED)
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len + 1), generator=generator)
        logits_SBV = model.logits(tokens[:, :-1])
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        pieces = [torch.empty_like(logits_SBV) for _ in range(tp)]
        group = parallel_state.get_tensor_model_parallel_group()
        dist.all_gather(pieces, logits_SBV.detach(), group=group)
        full = torch.cat(pieces, dim=-1)[..., : cfg.vocab_size]
        norm_grad = model.blocks[0].attn_norm.weight.grad.clone()
        return full, loss.item(), {"padded": padded, "norm_grad": norm_grad}
    finally:
        destroy_distributed(process_group_too=False)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}], ids=["untied", "tied"])
def test_tp2_forward_matches_tp1(overrides):
    cfg = tiny_model_config(**overrides)
    (logits_1, loss_1, extra_1), = run_ranks(1, full_logits_and_loss, 1, cfg)
    results = run_ranks(2, full_logits_and_loss, 2, cfg)
    assert extra_1["padded"] == 255 and results[0][2]["padded"] == 256  # 255 padded for tp=2
    for logits_2, loss_2, extra_2 in results:
        torch.testing.assert_close(logits_2, logits_1, rtol=0, atol=1e-5)
        assert abs(loss_2 - loss_1) <= 1e-6 * abs(loss_1)
        torch.testing.assert_close(extra_2["norm_grad"], extra_1["norm_grad"], rtol=1e-5, atol=1e-7)


def test_init_is_drawn_per_tensor_from_the_seed():
    from tessera.parallel.tensor_parallel import seeded_normal

    a = seeded_normal(1, "layers.0.q.weight", (4, 4), 0.02)
    assert torch.equal(a, seeded_normal(1, "layers.0.q.weight", (4, 4), 0.02))
    assert not torch.equal(a, seeded_normal(2, "layers.0.q.weight", (4, 4), 0.02))
    assert not torch.equal(a, seeded_normal(1, "layers.0.k.weight", (4, 4), 0.02))


def one_rank_layers_against_megatron() -> list[tuple[str, bool, bool]]:
    """At tp=1 our layers skip megatron-core's identity autograd functions; per layer, whether
    their output, and their weight's and input's gradients, equal megatron-core's own path's."""
    from tessera.parallel import tensor_parallel as tpl
    from tessera.parallel.mcore import tensor_parallel as mcore_tp
    from tessera.parallel.topology import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1)
    try:
        config = tpl.megatron_config(1, torch.float32, sequence_parallel=False)
        generator = torch.Generator().manual_seed(0)
        x_SBH = torch.randn(8, 2, 16, generator=generator)
        cases = [
            ("column", tpl.column_parallel(config, 16, 24), mcore_tp.ColumnParallelLinear, x_SBH),
            ("row", tpl.row_parallel(config, 16, 24), mcore_tp.RowParallelLinear, x_SBH),
            ("embedding", tpl.vocab_parallel_embedding(config, 32, 16),
             mcore_tp.VocabParallelEmbedding, torch.randint(0, 32, (2, 8), generator=generator)),
        ]
        equal = []
        for name, layer, megatron_class, inputs in cases:
            with torch.no_grad():
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
            runs = []
            for forward in (layer.forward, lambda i: megatron_class.forward(layer, i)):
                layer.weight.grad = None
                leaf = inputs.clone().requires_grad_(inputs.is_floating_point())
                out = forward(leaf)
                out = out[0] if isinstance(out, tuple) else out
                (out * torch.arange(out.numel()).view(out.shape)).sum().backward()
                runs.append((out.detach(), layer.weight.grad.clone(), leaf.grad))
            ours, megatron = runs
            inputs_equal = ours[2] is None or torch.equal(ours[2], megatron[2])
            equal.append((name, torch.equal(ours[0], megatron[0]),
                          torch.equal(ours[1], megatron[1]) and inputs_equal))
        return equal
    finally:
        destroy_distributed(process_group_too=False)


def test_one_rank_layers_compute_megatrons_bits():
    (equal,) = run_ranks(1, one_rank_layers_against_megatron)
    assert equal == [("column", True, True), ("row", True, True), ("embedding", True, True)]
