"""The chunked loss (train.loss_chunk_tokens) computes today's loss and gradients, without the
micro-batch's logits, at tp=1 and tp=2 (vocabulary padded), tied and untied."""

import pytest
import torch
from multiproc import run_ranks
from training import tiny_model_config

from tessera.trainer.config import ModelConfig

SEED = 11


def loss_and_grads(tp: int, cases: list[tuple[ModelConfig, int]]) -> list[tuple[float, dict]]:
    """On each rank, per (config, chunk_tokens): build, init, one forward/backward on a fixed
    batch of 3 sequences, then the same forward without gradients (evaluation)."""
    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.model import build_model, init_weights

    init_distributed(tp=tp, pp=1)
    results = []
    try:
        for cfg, chunk_tokens in cases:
            model, _ = build_model(cfg, tp, loss_chunk_tokens=chunk_tokens)
            init_weights(model, cfg, SEED)
            generator = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len + 1), generator=generator)
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            with torch.no_grad():
                eval_loss = model(tokens[:, :-1], tokens[:, 1:]).item()
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
            results.append((loss.item(), {"eval": eval_loss, "grads": grads}))
    finally:
        destroy_distributed(process_group_too=False)
    return results


# 96 tokens per micro-batch: chunks of 40 leave a short last chunk; 96 is one chunk.
@pytest.mark.parametrize("tp", [1, 2])
def test_chunked_loss_matches_whole_logits(tp):
    cases = [(tiny_model_config(vocab_size=257, tie_embeddings=tied), chunk)
             for tied in (False, True) for chunk in (0, 40, 96)]
    for rank, results in enumerate(run_ranks(tp, loss_and_grads, tp, cases)):
        for (cfg, chunk), (loss, extra) in zip(cases, results):
            ref_loss, ref_extra = results[cases.index((cfg, 0))]
            where = f"tp={tp} rank {rank} tied={cfg.tie_embeddings} chunk {chunk}"
            assert loss == pytest.approx(ref_loss, rel=1e-6), where
            assert extra["eval"] == pytest.approx(ref_loss, rel=1e-6), where
            for name, grad in extra["grads"].items():
                torch.testing.assert_close(grad, ref_extra["grads"][name], rtol=1e-5, atol=1e-7,
                                           msg=lambda m, name=name: f"{where}: {name}: {m}")


def test_chunked_loss_gradient_scales_with_the_upstream_gradient():
    """The gradients are computed in forward; backward scales them by d(out)/d(loss)."""
    from tessera.parallel.loss import chunked_vocab_parallel_loss
    from tessera.parallel.topology import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1)
    try:
        generator = torch.Generator().manual_seed(1)
        x_SBH = torch.randn(6, 2, 8, generator=generator, requires_grad=True)
        weight_VH = torch.randn(11, 8, generator=generator, requires_grad=True)
        labels_BS = torch.randint(0, 11, (2, 6), generator=generator)
        (chunked_vocab_parallel_loss(x_SBH, weight_VH, labels_BS, 11, 5) * 3.0).backward()
        logits = torch.einsum("sbh,vh->bsv", x_SBH, weight_VH)
        reference = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels_BS.reshape(-1))
        grad_x, grad_w = torch.autograd.grad(reference * 3.0, [x_SBH, weight_VH])
        torch.testing.assert_close(x_SBH.grad, grad_x, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(weight_VH.grad, grad_w, rtol=1e-5, atol=1e-7)
    finally:
        destroy_distributed()
