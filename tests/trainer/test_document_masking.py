"""Document masking (data.document_masking): in a packed window a token sees only its own
document, at rotary positions that restart with it. The per-token loss of a packed window is
the loss of each of its documents run alone."""

from __future__ import annotations

import pytest
import torch
from multiproc import run_ranks
from training import tiny_model_config

from tessera.trainer.model import document_ids

EOS = 254


def test_document_ids_start_after_each_eos():
    ids = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8], [EOS, 1, 2, 3, 4, 5, 6]])
    assert document_ids(ids, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


def per_token_losses(overrides: dict, masked: bool = True) -> tuple[list, list]:
    """One rank: a window packing three documents, and each document alone; per-token cross
    entropy of both. Unmasked: the window as one document (plain causal attention)."""
    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.model import build_model, init_weights

    cfg = tiny_model_config(**overrides)
    init_distributed(tp=1, pp=1)
    try:
        model, _ = build_model(cfg, tp=1)
        init_weights(model, cfg, seed=7)
        generator = torch.Generator().manual_seed(0)
        lengths = [9, 14, 10]  # each ends with EOS; 33 tokens: the window and its last label
        docs = [torch.cat([torch.randint(0, EOS, (n - 1,), generator=generator),
                           torch.tensor([EOS])]) for n in lengths]
        window = torch.cat(docs)[None]
        inputs, labels = window[:, :-1], window[:, 1:]
        documents = document_ids(inputs, EOS) if masked else torch.zeros_like(inputs)
        packed = model.logits((inputs, documents))[:, 0]  # [S, V]
        packed_losses = torch.nn.functional.cross_entropy(packed, labels[0], reduction="none")
        alone, start = [], 0
        for doc in docs:
            end = min(start + len(doc), inputs.shape[1])
            logits = model.logits(inputs[:, start:end])[:, 0]
            alone.append(torch.nn.functional.cross_entropy(logits, labels[0, start:end],
                                                           reduction="none"))
            start = end
        return packed_losses.tolist(), torch.cat(alone).tolist()
    finally:
        destroy_distributed(process_group_too=False)


VARIANTS = {"plain": {}, "sliding-window": {"sliding_window": 6}, "qk-norm": {"qk_norm": True}}


def all_variants() -> dict:
    return {name: (per_token_losses(o), per_token_losses(o, masked=False))
            for name, o in VARIANTS.items()}


def test_packed_window_loss_equals_each_document_alone():
    (results,) = run_ranks(1, all_variants)
    for name, ((packed, alone), (unmasked, _)) in results.items():
        assert packed == pytest.approx(alone, rel=1e-6), name
        # without masking the first document is the same, the later ones see it and differ
        assert unmasked[:8] == pytest.approx(alone[:8], rel=1e-6), name
        assert unmasked[9:] != pytest.approx(alone[9:], rel=1e-3), name


def flex_against_dense() -> dict:
    """One rank: the packed windows' logits through FlexAttention's block mask (the CUDA path,
    compiled here for the CPU, which has no FlexAttention backward: tests/gpu checks that)
    and through SDPA's dense mask."""
    import tessera.trainer.model as model_module
    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer.model import build_model, init_weights

    cfg = tiny_model_config(sliding_window=12)
    init_distributed(tp=1, pp=1)
    try:
        model, _ = build_model(cfg, tp=1)
        init_weights(model, cfg, seed=7)
        generator = torch.Generator().manual_seed(1)
        window = torch.randint(0, EOS, (2, cfg.seq_len + 1), generator=generator)
        window[0, [5, 20, 21]] = EOS
        window[1, [30]] = EOS
        inputs = (window[:, :-1], document_ids(window[:, :-1], EOS))
        results = {}
        for name, flex in (("dense", False), ("flex", True)):
            model_module.uses_flex_attention = lambda device, flex=flex: flex
            with torch.no_grad():
                results[name] = model.logits(inputs)
        return results
    finally:
        destroy_distributed(process_group_too=False)


def test_flex_attention_path_computes_what_the_dense_mask_does():
    (results,) = run_ranks(1, flex_against_dense)
    torch.testing.assert_close(results["flex"], results["dense"], rtol=1e-5, atol=1e-5)
