"""A Llama-style decoder built as a list of layers: embedding, N blocks, final norm + head.

Activations flow as x_SBH (sequence, batch, hidden), megatron-core's layout, so that sequence
parallelism can split dim 0. Projections are megatron-core tensor-parallel layers; each layer
states, per local parameter, which full tensors it is cut from (`canonical_parts`), so that
initialization and conversion never depend on the parallel layout. The rotary embedding follows
Hugging Face's Llama convention (rotate_half), so weights map to `LlamaForCausalLM` unpermuted.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from tessera.data.format import first_line
from tessera.parallel import tensor_parallel as tpl
from tessera.parallel.loss import (
    chunked_vocab_parallel_loss,
    head_input,
    mask_padded_vocab,
    vocab_parallel_loss,
)
from tessera.parallel.mcore import ModelParallelConfig
from tessera.parallel.tensor_parallel import Part
from tessera.trainer import architecture
from tessera.trainer.config import ConfigError, ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_fp32.to(x.dtype)


def rotary_cos_sin(cfg: ModelConfig, seq_len: int, device: torch.device, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of positions 0..seq_len-1 at the frequencies of the model's rope type."""
    inv_freq, scale = architecture.rope_frequencies(cfg, device)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs_SD = torch.outer(positions, inv_freq)
    emb_SD = torch.cat([freqs_SD, freqs_SD], dim=-1)
    return (emb_SD.cos() * scale).to(dtype), (emb_SD.sin() * scale).to(dtype)


def sliding_window_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """[S, S] True where query i may attend key j: j <= i and i - j < window (as transformers'
    Mistral does: the window counts the token itself)."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (i - j < window)


def document_ids(input_ids_BS: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Document masking (data.document_masking): the index of each token's document in its row.
    A document starts after each EOS, and at the row's first token (a window cut mid-document
    sees only its part)."""
    after_eos_BS = torch.zeros_like(input_ids_BS)
    after_eos_BS[:, 1:] = input_ids_BS[:, :-1] == eos_id
    return after_eos_BS.cumsum(dim=1)


def uses_flex_attention(device: torch.device) -> bool:
    """Document masking on CUDA runs FlexAttention with a block mask: its kernel skips the
    blocks a document cannot see, so the cost falls with document length, where SDPA given a
    dense [B, 1, S, S] mask computes every block and leaves the flash kernel for a slower one.
    (flash-attn's varlen kernel would need an unpadded layout and another dependency.) On a
    CPU: SDPA with the dense mask, which needs no compilation."""
    return device.type == "cuda"


@functools.cache
def _compiled_flex_attention() -> Callable:
    return torch.compile(flex_attention, dynamic=False)  # eager FlexAttention is a reference


# The last micro-batch's document tables: every block of a stage gets the same document ids
# tensor, so the tables (and a FlexAttention block mask) are made once per micro-batch, not
# once per block. Held by reference: the `is` test cannot match a new tensor at a reused id.
_last_document_tables: list = [None]


def document_tables(documents_BS: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor,
                    window: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | BlockMask]:
    """Rotary cos/sin [B, 1, S, D] at positions that restart with each document, and the mask
    of causal attention within a document (and the sliding window): [B, 1, S, S], or a
    FlexAttention block mask (`uses_flex_attention`)."""
    last = _last_document_tables[0]
    key = (window, cos_SD.shape, cos_SD.dtype, uses_flex_attention(documents_BS.device))
    if last is not None and last[0] is documents_BS and last[1] == key:
        return last[2]
    tables = _document_tables(documents_BS, cos_SD, sin_SD, window)
    _last_document_tables[0] = (documents_BS, key, tables)
    return tables


def _document_tables(documents_BS: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor,
                     window: int | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | BlockMask]:
    batch, seq_len = documents_BS.shape
    index_S = torch.arange(seq_len, device=documents_BS.device)
    starts_BS = torch.ones_like(documents_BS, dtype=torch.bool)
    starts_BS[:, 1:] = documents_BS[:, 1:] != documents_BS[:, :-1]
    first_BS = torch.where(starts_BS, index_S, 0).cummax(dim=1).values
    positions_BS = index_S - first_BS
    cos, sin = cos_SD[positions_BS][:, None], sin_SD[positions_BS][:, None]

    def allowed(b, h, q, k):  # FlexAttention's mask_mod, and the dense mask by broadcasting
        visible = (documents_BS[b, q] == documents_BS[b, k]) & (k <= q)
        return visible if window is None else visible & (q - k < window)

    if uses_flex_attention(documents_BS.device):
        return cos, sin, create_block_mask(allowed, batch, None, seq_len, seq_len,
                                           device=documents_BS.device)
    rows_B111 = torch.arange(batch, device=documents_BS.device)[:, None, None, None]
    return cos, sin, allowed(rows_B111, None, index_S[:, None], index_S[None, :])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x_BNSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """cos/sin [S, D], or [B, 1, S, D] per row (document masking)."""
    return x_BNSD * cos + _rotate_half(x_BNSD) * sin


# With document masking (data.document_masking) the model's input, and what passes between its
# layers (a pipeline stage's activations), is a pair: (token ids or hidden states, document ids
# [B, S]); DeepSpeed's pipeline sends the integer tensor along without a gradient.
Packed = tuple[torch.Tensor, torch.Tensor]


class Embedding(nn.Module):
    """Token embedding; with tied embeddings it also projects the final hidden states to logits."""

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, padded_vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.padded_vocab_size = padded_vocab_size
        self.sequence_parallel = mp_config.sequence_parallel
        self.embed = tpl.vocab_parallel_embedding(mp_config, padded_vocab_size, cfg.hidden_size)
        if cfg.tie_embeddings:  # a weightless vocabulary-parallel projection using embed.weight
            self.tied_head = tpl.column_parallel(
                mp_config, cfg.hidden_size, padded_vocab_size, skip_weight=True
            )

    def forward(self, inputs: torch.Tensor | Packed) -> torch.Tensor | Packed:
        """Token ids [B, S], or (ids, document ids) with document masking: the documents pass
        on with the hidden states (a pipeline stage's activations)."""
        if isinstance(inputs, tuple):
            input_ids_BS, documents_BS = inputs
            return self._embed(input_ids_BS), documents_BS
        return self._embed(inputs)

    def _embed(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:  # megatron-core transposes and scatters the sequence itself
            return self.embed(input_ids_BS)
        x_BSH = self.embed(input_ids_BS)
        return x_BSH.transpose(0, 1).contiguous()

    def project(self, x_SBH: torch.Tensor) -> torch.Tensor:
        logits_SBV, _ = self.tied_head(x_SBH, weight=self.embed.weight)
        return mask_padded_vocab(logits_SBV, self.cfg.vocab_size)

    def canonical_parts(self) -> dict[str, list[Part]]:
        return architecture.embedding_parts(self.cfg, self.padded_vocab_size)


class Block(nn.Module):
    """Pre-norm transformer block: GQA attention (SDPA, causal) and a SwiGLU MLP."""

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, layer_index: int,
                 checkpoint_activations: bool = False):
        super().__init__()
        _, tp = tpl.tp_rank_and_size()
        self.cfg = cfg
        self.checkpoint_activations = checkpoint_activations
        self.layer_index = layer_index
        self.num_heads_local = cfg.num_heads // tp
        self.num_kv_heads_local = cfg.num_kv_heads // tp
        head_dim, hidden, ffn = cfg.head_size, cfg.hidden_size, cfg.ffn_hidden_size
        self.attn_norm = tpl.replicated(RMSNorm(hidden, cfg.norm_eps), mp_config)
        qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * head_dim
        self.qkv = tpl.column_parallel(mp_config, hidden, qkv_rows, bias=cfg.qkv_bias)
        if cfg.qk_norm:  # over each head's vector; a rank holds its own heads'
            self.q_norm = tpl.replicated(RMSNorm(head_dim, cfg.norm_eps), mp_config,
                                         sees_local_heads=True)
            self.k_norm = tpl.replicated(RMSNorm(head_dim, cfg.norm_eps), mp_config,
                                         sees_local_heads=True)
        self.o = tpl.row_parallel(mp_config, cfg.num_heads * head_dim, hidden)
        self.mlp_norm = tpl.replicated(RMSNorm(hidden, cfg.norm_eps), mp_config)
        self.gate_up = tpl.column_parallel(mp_config, hidden, 2 * ffn)
        self.down = tpl.row_parallel(mp_config, ffn, hidden)
        self.sequence_parallel_tp = tp if mp_config.sequence_parallel else 1
        self._rotary: tuple | None = None  # ((seq_len, device, dtype), cos_SD, sin_SD[, mask])
        self._compute = self._layer  # train.compile swaps in the compiled version (`compile`)

    def forward(self, inputs: torch.Tensor | Packed, documents_BS: torch.Tensor | None = None
                ) -> torch.Tensor | Packed:
        """Hidden states [S, B, H]; with document masking also the document ids [B, S]: as a
        pair in a pipeline stage (and passed on), or as an argument in one stage (ZeRO 3 wants
        a block's output a single tensor)."""
        if isinstance(inputs, tuple):
            x_SBH, documents_BS = inputs
            return self._block(x_SBH, documents_BS), documents_BS
        return self._block(inputs, documents_BS)

    def _block(self, x_SBH: torch.Tensor, documents_BS: torch.Tensor | None) -> torch.Tensor:
        # With sequence parallelism x holds this rank's slice of the sequence; rotary tables
        # cover the whole sequence, which attention sees after the gather in qkv.
        seq_len = x_SBH.shape[0] * self.sequence_parallel_tp
        cos, sin, mask = self._position_tables(seq_len, x_SBH.device, x_SBH.dtype)
        if documents_BS is not None:  # per row: [B, 1, S, D] tables and a mask
            cos, sin, mask = document_tables(documents_BS, cos, sin, self.cfg.sliding_window)
        if self.checkpoint_activations and torch.is_grad_enabled():
            # Keep only the block's input; recompute its inside during backward.
            return torch.utils.checkpoint.checkpoint(self._compute, x_SBH, cos, sin, mask,
                                                     use_reentrant=False)
        return self._compute(x_SBH, cos, sin, mask)

    def compile_layer(self) -> None:
        """torch.compile the block's computation as one graph (train.compile).

        The computation, not the module call, is compiled: DeepSpeed's ZeRO 3 hooks that gather
        and release the block's parameters stay eager around it, and `fullgraph` makes any graph
        break an error instead of a silent fall-back to eager.
        """
        self._compute = torch.compile(self._layer, fullgraph=True)

    def _layer(self, x_SBH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        x_SBH = x_SBH + self._attention(self.attn_norm(x_SBH), cos, sin, mask)
        h_SBF2, _ = self.gate_up(self.mlp_norm(x_SBH))
        gate_SBF, up_SBF = h_SBF2.chunk(2, dim=-1)
        mlp_SBH, _ = self.down(F.silu(gate_SBF) * up_SBF)
        return x_SBH + mlp_SBH

    def _attention(self, h_SBH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
        """cos/sin [S, D] and mask [S, S] or None (causal); per row with document masking:
        [B, 1, S, D] and [B, 1, S, S] or a FlexAttention block mask."""
        head_dim = self.cfg.head_size
        qkv_SBX, _ = self.qkv(h_SBH)  # with sequence parallelism, gathered to the full sequence
        seq_len, batch = qkv_SBX.shape[0], qkv_SBX.shape[1]
        q_size = self.num_heads_local * head_dim
        kv_size = self.num_kv_heads_local * head_dim
        q, k, v = qkv_SBX.split([q_size, kv_size, kv_size], dim=-1)
        q_SBND = q.view(seq_len, batch, -1, head_dim)
        k_SBND = k.view(seq_len, batch, -1, head_dim)
        if self.cfg.qk_norm:
            q_SBND, k_SBND = self.q_norm(q_SBND), self.k_norm(k_SBND)
        q_BNSD = apply_rotary(q_SBND.permute(1, 2, 0, 3), cos, sin)
        k_BNSD = apply_rotary(k_SBND.permute(1, 2, 0, 3), cos, sin)
        v_BNSD = v.view(seq_len, batch, -1, head_dim).permute(1, 2, 0, 3)
        grouped = self.num_kv_heads_local != self.num_heads_local
        if isinstance(mask, BlockMask):
            out_BNSD = _compiled_flex_attention()(q_BNSD, k_BNSD, v_BNSD, block_mask=mask,
                                                  enable_gqa=grouped)
        else:
            out_BNSD = F.scaled_dot_product_attention(
                q_BNSD, k_BNSD, v_BNSD, attn_mask=mask, is_causal=mask is None,
                enable_gqa=grouped,
            )
        out_SBX = out_BNSD.permute(2, 0, 1, 3).reshape(seq_len, batch, q_size)
        o_SBH, _ = self.o(out_SBX)
        return o_SBH

    def _position_tables(self, seq_len: int, device: torch.device, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The rotary cos/sin tables and, when the sequence is longer than a sliding window,
        its mask (None: plain causal attention); made on first use, not at every micro-batch."""
        key = (seq_len, device, dtype)
        if self._rotary is None or self._rotary[0] != key:
            cos_SD, sin_SD = rotary_cos_sin(self.cfg, seq_len, device, dtype)
            window = self.cfg.sliding_window
            mask_SS = (sliding_window_mask(seq_len, window, device)
                       if window is not None and seq_len > window else None)
            self._rotary = (key, cos_SD, sin_SD, mask_SS)
        return self._rotary[1], self._rotary[2], self._rotary[3]

    def canonical_parts(self) -> dict[str, list[Part]]:
        return architecture.block_parts(self.cfg, self.layer_index)


class FinalNorm(nn.Module):
    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig):
        super().__init__()
        self.cfg = cfg
        self.final_norm = tpl.replicated(RMSNorm(cfg.hidden_size, cfg.norm_eps), mp_config)

    def forward(self, inputs: torch.Tensor | Packed) -> torch.Tensor:
        x_SBH = inputs[0] if isinstance(inputs, tuple) else inputs
        return self.final_norm(x_SBH)

    def canonical_parts(self) -> dict[str, list[Part]]:
        return architecture.final_norm_parts(self.cfg)


class OutputLayer(nn.Module):
    """The untied vocabulary-parallel output projection.

    With `chunked_loss` (the last pipeline stage under train.loss_chunk_tokens) it hands its
    input and weight to the loss, which projects a chunk of tokens at a time.
    """

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, padded_vocab_size: int,
                 chunked_loss: bool = False):
        super().__init__()
        self.cfg = cfg
        self.padded_vocab_size = padded_vocab_size
        self.chunked_loss = chunked_loss
        self.head = tpl.column_parallel(mp_config, cfg.hidden_size, padded_vocab_size)

    def forward(self, x_SBH: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.chunked_loss:
            return x_SBH, self.head.weight
        logits_SBV, _ = self.head(x_SBH)
        return mask_padded_vocab(logits_SBV, self.cfg.vocab_size)

    def canonical_parts(self) -> dict[str, list[Part]]:
        return architecture.output_parts(self.cfg, self.padded_vocab_size)


def lm_loss(logits_SBV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over the micro-batch, from its logits."""
    return vocab_parallel_loss(logits_SBV, labels_BS)


@dataclasses.dataclass(frozen=True)
class ChunkedLoss:
    """Mean next-token cross entropy from the final hidden states and the output projection's
    weight, `chunk_tokens` tokens at a time (train.loss_chunk_tokens): the micro-batch's logits
    never exist at once (tessera.parallel.loss)."""

    vocab_size: int
    sequence_parallel: bool
    chunk_tokens: int

    def __call__(self, head_out: tuple[torch.Tensor, torch.Tensor], labels_BS: torch.Tensor
                 ) -> torch.Tensor:
        x_SBH, weight_VH = head_out
        return chunked_vocab_parallel_loss(head_input(x_SBH, self.sequence_parallel), weight_VH,
                                           labels_BS, self.vocab_size, self.chunk_tokens)


def loss_function(cfg: ModelConfig, sequence_parallel: bool, loss_chunk_tokens: int
                  ) -> Callable[..., torch.Tensor]:
    """What the last stage's output goes through: logits -> `lm_loss`, or (hidden states,
    weight) -> `ChunkedLoss`."""
    if loss_chunk_tokens == 0:
        return lm_loss
    return ChunkedLoss(cfg.vocab_size, sequence_parallel, loss_chunk_tokens)


class Llama(nn.Module):
    """The whole layer list in one pipeline stage (pp=1)."""

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, padded_vocab_size: int,
                 checkpoint_activations: bool = False, loss_chunk_tokens: int = 0):
        super().__init__()
        self.cfg = cfg
        self.embedding = Embedding(cfg, mp_config, padded_vocab_size)
        self.blocks = nn.ModuleList([
            Block(cfg, mp_config, i, checkpoint_activations) for i in range(cfg.num_layers)
        ])
        self.final_norm = FinalNorm(cfg, mp_config)
        if not cfg.tie_embeddings:
            self.output = OutputLayer(cfg, mp_config, padded_vocab_size)
        self.loss = loss_function(cfg, mp_config.sequence_parallel, loss_chunk_tokens)

    def hidden_states(self, inputs: torch.Tensor | Packed) -> torch.Tensor:
        """`inputs`: token ids [B, S], or (ids, document ids) with document masking."""
        input_ids_BS, documents_BS = inputs if isinstance(inputs, tuple) else (inputs, None)
        x_SBH = self.embedding(input_ids_BS)
        for block in self.blocks:
            x_SBH = block(x_SBH, documents_BS)
        return self.final_norm(x_SBH)

    def logits(self, inputs: torch.Tensor | Packed) -> torch.Tensor:
        x_SBH = self.hidden_states(inputs)
        if self.cfg.tie_embeddings:
            return self.embedding.project(x_SBH)
        return self.output(x_SBH)

    def forward(self, inputs: torch.Tensor | Packed, labels_BS: torch.Tensor) -> torch.Tensor:
        if self.loss is lm_loss:
            return lm_loss(self.logits(inputs), labels_BS)
        # The weight is read here, not through the output layer's forward: under ZeRO 3 it stays
        # gathered for this whole forward, and the chunked loss needs it in no backward.
        head = self.embedding.embed if self.cfg.tie_embeddings else self.output.head
        return self.loss((self.hidden_states(inputs), head.weight), labels_BS)


def build_model(cfg: ModelConfig, tp: int, params_dtype: torch.dtype = torch.float32,
                sequence_parallel: bool = False, checkpoint_activations: bool = False,
                loss_chunk_tokens: int = 0) -> tuple[Llama, int]:
    """The pp=1 model with megatron-core TP layers (uninitialized), and the padded vocabulary."""
    assert cfg.vocab_size is not None, "model.vocab_size must be resolved before building"
    padded = tpl.padded_vocab_size(cfg.vocab_size, tp)
    mp_config = tpl.megatron_config(tp, params_dtype, sequence_parallel)
    model = Llama(cfg, mp_config, padded, checkpoint_activations, loss_chunk_tokens)
    return model, padded


def tied_projection(embedding: Embedding, x_SBH: torch.Tensor) -> torch.Tensor:
    return embedding.project(x_SBH)


def tied_head_output(embedding: Embedding, x_SBH: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The last stage's output for the chunked loss, with tied embeddings."""
    return x_SBH, embedding.embed.weight


def check_compile_works() -> None:
    """Compile a tiny function now, so that train.compile where torch.compile cannot run (no C++
    compiler for inductor on a CPU, no Triton on a GPU) stops with one line naming the key,
    before any training, instead of an inductor traceback at the first step."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.compile(_compile_probe, fullgraph=True)(torch.ones(8, device=device))
    except Exception as e:  # noqa: BLE001 - inductor raises many types; all mean "cannot compile"
        raise ConfigError(
            f"config key 'train.compile': torch.compile cannot run on this machine "
            f"({type(e).__name__}: {first_line(e)[:300]}); set train.compile=false"
        ) from e


def _compile_probe(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * 2 + 1


def compile_blocks(model: nn.Module) -> None:
    """train.compile: torch.compile each transformer block (as torchtitan and OLMo-core do)."""
    for module in model.modules():
        if isinstance(module, Block):
            module.compile_layer()


def pipeline_layer_specs(cfg: ModelConfig, tp: int, params_dtype: torch.dtype = torch.float32,
                         sequence_parallel: bool = False, checkpoint_activations: bool = False,
                         loss_chunk_tokens: int = 0) -> list:
    """The same layers as DeepSpeed LayerSpecs: embedding, blocks, final norm, output.

    With tied embeddings the first and last stage each hold the embedding (DeepSpeed's
    TiedLayerSpec) and DeepSpeed sums the two copies' gradients.
    """

    assert cfg.vocab_size is not None, "model.vocab_size must be resolved before building"
    padded = tpl.padded_vocab_size(cfg.vocab_size, tp)
    mp_config = tpl.megatron_config(tp, params_dtype, sequence_parallel)
    embed_args = (cfg, mp_config, padded)
    if cfg.tie_embeddings:
        first = TiedLayerSpec("embed", Embedding, *embed_args, tied_weight_attr=["embed.weight"])
        last = TiedLayerSpec("embed", Embedding, *embed_args,
                             forward_fn=tied_head_output if loss_chunk_tokens else tied_projection,
                             tied_weight_attr=["embed.weight"])
    else:
        first = LayerSpec(Embedding, *embed_args)
        last = LayerSpec(OutputLayer, *embed_args, bool(loss_chunk_tokens))
    blocks = [LayerSpec(Block, cfg, mp_config, i, checkpoint_activations)
              for i in range(cfg.num_layers)]
    return [first, *blocks, LayerSpec(FinalNorm, cfg, mp_config), last]


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Fill every local parameter from full tensors drawn from the seed (layout-independent)."""
    tp_rank, tp = tpl.tp_rank_and_size()

    def full_of(part: Part) -> torch.Tensor:
        match part.init:
            case "ones":
                return torch.ones(part.shape)
            case "zeros":
                return torch.zeros(part.shape)
        return tpl.seeded_normal(seed, part.name, part.shape, cfg.init_std)

    for param, parts in tpl.canonical_params(model):
        param.copy_(tpl.local_tensor(parts, full_of, tp_rank, tp).to(param.dtype))
