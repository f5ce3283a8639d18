"""Activation checkpointing recomputes each block in backward: same numbers, less memory kept
for backward (counted as the bytes of the tensors autograd saves, storages counted once)."""

import torch
from training import tiny_model_config


def saved_bytes_loss_and_grads(checkpointing: bool) -> tuple[int, float, dict]:
    from tessera.parallel.topology import distributed
    from tessera.trainer.model import build_model, init_weights

    cfg = tiny_model_config(vocab_size=257, num_layers=6, hidden_size=128, num_heads=4,
                            num_kv_heads=4, ffn_hidden_size=352, seq_len=256)
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with distributed(1, 1, "gloo"):
        model, _ = build_model(cfg, tp=1, checkpoint_activations=checkpointing)
        init_weights(model, cfg, seed=0)
        tokens = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len + 1),
                               generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        weight_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        activations = sum(n for ptr, n in storages.items() if ptr not in weight_ptrs)
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return activations, loss.item(), grads


def test_full_checkpointing_keeps_numerics_and_saves_activation_memory():
    none_bytes, none_loss, none_grads = saved_bytes_loss_and_grads(False)
    full_bytes, full_loss, full_grads = saved_bytes_loss_and_grads(True)
    assert full_loss == none_loss
    for name, grad in none_grads.items():
        assert torch.equal(full_grads[name], grad), name
    assert full_bytes < 0.6 * none_bytes, (none_bytes, full_bytes)  # measured: 0.08
