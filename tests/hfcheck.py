"""What checks a model against transformers: its logits gathered at any layout, a checkpoint
restored at its own layout with a greedy continuation, the KL between two sets of logits."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

PROMPT = list(b"the model re")  # 12 tokens; with 20 greedy ones, the 32-token window
NEW_TOKENS = 20
KL_BOUND = 1e-9


def full_logits(engine, topo, ids_BS: torch.Tensor, cfg) -> torch.Tensor:
    """Collective: (batch, seq, vocab) logits of the engine's model at its layout, on every rank.
    Pipeline stages pass activations with send/recv; the last stage gathers the vocabulary."""
    from tessera.parallel.mcore import parallel_state as ps

    seq, batch = ids_BS.shape[1], ids_BS.shape[0]
    local_SBV = None
    if topo.pp == 1:
        local_SBV = engine.module.logits(ids_BS)
    else:
        x = ids_BS
        if topo.pp_rank > 0:
            x = torch.empty(seq, batch, cfg.model.hidden_size)
            dist.recv(x, src=ps.get_pipeline_model_parallel_prev_rank())
        out = engine.module(x)
        if topo.pp_rank < topo.pp - 1:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        else:
            local_SBV = out
    vocab_size = cfg.model.vocab_size
    full = torch.zeros(batch, seq, vocab_size)
    if local_SBV is not None:
        pieces = [torch.empty_like(local_SBV) for _ in range(topo.tp)]
        dist.all_gather(pieces, local_SBV.contiguous(), group=ps.get_tensor_model_parallel_group())
        full = torch.cat(pieces, dim=-1).transpose(0, 1)[..., :vocab_size].contiguous()
    dist.broadcast(full, src=(topo.pp - 1) * topo.tp * topo.dp)  # last stage, dp 0, tp 0
    return full


def layout_predictions(cfg) -> dict | None:
    """Collective: the run's checkpoint restored at its own layout by the training code; greedy
    continuation of PROMPT in a fixed 32-token window (causal: later positions do not matter),
    then the logits of the whole window. Rank 0 returns them."""
    from tessera.parallel.topology import destroy_distributed, init_distributed
    from tessera.trainer import checkpoint
    from tessera.trainer.train import build_training_engine

    topo = init_distributed(cfg.parallel.tp, cfg.parallel.pp)
    try:
        engine, _, _ = build_training_engine(cfg, topo)
        checkpoint.install(engine, cfg)
        assert checkpoint.resume(engine, Path(cfg.run.dir) / "checkpoints", cfg) is not None
        ids = torch.zeros(1, cfg.model.seq_len, dtype=torch.long)
        ids[0, : len(PROMPT)] = torch.tensor(PROMPT)
        with torch.no_grad():
            for pos in range(len(PROMPT), len(PROMPT) + NEW_TOKENS):
                ids[0, pos] = full_logits(engine, topo, ids, cfg)[0, pos - 1].argmax()
            logits = full_logits(engine, topo, ids, cfg)
        return {"ids": ids, "logits": logits} if topo.rank == 0 else None
    finally:
        destroy_distributed(process_group_too=False)


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(reference || other) of the next-token distributions (fp64)."""
    p = torch.log_softmax(reference_logits.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def hf_greedy(model, steps: int) -> list[int]:
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(PROMPT) :].tolist()


def assert_hf_matches(model, prediction: dict, name: str) -> None:
    with torch.no_grad():
        hf_logits = model(prediction["ids"]).logits
    kl = mean_kl(hf_logits, prediction["logits"])
    assert kl < KL_BOUND, f"{name}: mean KL {kl:.3e}"
    ours = prediction["ids"][0, len(PROMPT) : len(PROMPT) + NEW_TOKENS].tolist()
    print(f"{name}: mean KL {kl:.2e}, greedy {bytes(min(t, 255) for t in ours)!r}")  # with -s
    assert hf_greedy(model, NEW_TOKENS) == ours, f"{name}: greedy tokens differ"
