"""The model: layout-independent initialization, and tp=2 computing what tp=1 computes."""

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks

from tessera.trainer.config import ModelConfig

SEED = 7


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=255, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=176, seq_len=32)
    fields.update(overrides)
    return ModelConfig(**fields)


def full_logits_and_loss(tp: int, cfg: ModelConfig) -> tuple[torch.Tensor, float, dict]:
    """On each rank: build, init, run a fixed batch; all-gather the vocabulary-sharded logits."""
    from megatron.core import parallel_state

    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.model import build_model, init_weights

    init_distributed(tp=tp, pp=1)
    try:
        model, padded = build_model(cfg, tp)
        init_weights(model, cfg, SEED)
        tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0))
        logits_SBV = model.logits(tokens[:, :-1])
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        pieces = [torch.empty_like(logits_SBV) for _ in range(tp)]
        dist.all_gather(pieces, logits_SBV.detach(), group=parallel_state.get_tensor_model_parallel_group())
        full = torch.cat(pieces, dim=-1)[..., : cfg.vocab_size]
        norm_grad = model.blocks[0].attn_norm.weight.grad.clone()
        return full, loss.item(), {"padded": padded, "norm_grad": norm_grad}
    finally:
        destroy_distributed(process_group_too=False)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}], ids=["untied", "tied"])
def test_tp2_forward_matches_tp1(overrides):
    cfg = tiny_config(**overrides)
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
