"""The baseline of the trainer-overhead benchmark: the same Llama in plain `torch.nn`.

Same shapes and the same math as `tessera.trainer.model.Llama` (RMSNorm in fp32, RoPE with
rotate_half, GQA attention through SDPA, SwiGLU, untied or tied head, mean cross entropy), written
the way a careful plain-PyTorch user would: batch-first activations, `nn.Linear`/`nn.Embedding`,
rotary tables computed once per forward, `F.cross_entropy`. No megatron-core, no DeepSpeed.
`load_from_tessera` copies a one-process Tessera model's weights in, so both start equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.trainer.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_fp32.to(x.dtype)


def rotary_tables(seq_len: int, head_dim: int, theta: float, device, dtype):
    exponents = torch.arange(0, head_dim, 2, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    freqs_SD = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb_SD = torch.cat([freqs_SD, freqs_SD], dim=-1)
    return emb_SD.cos().to(dtype), emb_SD.sin().to(dtype)


def rotate(x_BNSD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BNSD.chunk(2, dim=-1)
    return x_BNSD * cos_SD + torch.cat([-x2, x1], dim=-1) * sin_SD


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        hidden, head_dim = cfg.hidden_size, cfg.head_size
        self.cfg = cfg
        self.attn_norm = RMSNorm(hidden, cfg.norm_eps)
        self.qkv = nn.Linear(hidden, (cfg.num_heads + 2 * cfg.num_kv_heads) * head_dim,
                             bias=False, dtype=dtype)
        self.o = nn.Linear(cfg.num_heads * head_dim, hidden, bias=False, dtype=dtype)
        self.mlp_norm = RMSNorm(hidden, cfg.norm_eps)
        self.gate_up = nn.Linear(hidden, 2 * cfg.ffn_hidden_size, bias=False, dtype=dtype)
        self.down = nn.Linear(cfg.ffn_hidden_size, hidden, bias=False, dtype=dtype)

    def forward(self, x_BSH: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor):
        c = self.cfg
        batch, seq, _ = x_BSH.shape
        q_size, kv_size = c.num_heads * c.head_size, c.num_kv_heads * c.head_size
        q, k, v = self.qkv(self.attn_norm(x_BSH)).split([q_size, kv_size, kv_size], dim=-1)
        q_BNSD = rotate(q.view(batch, seq, -1, c.head_size).transpose(1, 2), cos_SD, sin_SD)
        k_BNSD = rotate(k.view(batch, seq, -1, c.head_size).transpose(1, 2), cos_SD, sin_SD)
        v_BNSD = v.view(batch, seq, -1, c.head_size).transpose(1, 2)
        out_BNSD = F.scaled_dot_product_attention(
            q_BNSD, k_BNSD, v_BNSD, is_causal=True, enable_gqa=c.num_kv_heads != c.num_heads
        )
        x_BSH = x_BSH + self.o(out_BNSD.transpose(1, 2).reshape(batch, seq, q_size))
        gate, up = self.gate_up(self.mlp_norm(x_BSH)).chunk(2, dim=-1)
        return x_BSH + self.down(F.silu(gate) * up)


class PlainLlama(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        assert cfg.vocab_size is not None
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.blocks = nn.ModuleList([Block(cfg, dtype) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)

    def forward(self, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        x_BSH = self.embed(input_ids_BS)
        cos_SD, sin_SD = rotary_tables(input_ids_BS.shape[1], c.head_size, c.rope_theta,
                                       x_BSH.device, x_BSH.dtype)
        for block in self.blocks:
            x_BSH = block(x_BSH, cos_SD, sin_SD)
        head_weight = self.embed.weight if c.tie_embeddings else self.head.weight
        logits_BSV = F.linear(self.final_norm(x_BSH), head_weight)
        return F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten())


def tessera_to_plain_names(name: str) -> str:
    """A Tessera (pp=1, tp=1) parameter name -> the plain model's name."""
    replacements = (("embedding.embed.", "embed."), ("final_norm.final_norm.", "final_norm."),
                    ("output.head.", "head."))
    for old, new in replacements:
        if name.startswith(old):
            return new + name[len(old):]
    return name


@torch.no_grad()
def load_from_tessera(plain: PlainLlama, tessera_model: nn.Module) -> None:
    """Copy a one-process (tp=1) Tessera model's weights; padded vocabulary rows are dropped."""
    params = dict(plain.named_parameters())
    for name, tensor in tessera_model.named_parameters():
        target = params[tessera_to_plain_names(name.removeprefix("module."))]
        target.copy_(tensor[: target.shape[0]] if tensor.shape != target.shape else tensor)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as Tessera forms them: decay on matrices only."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
