"""Hugging Face Llama format: tensor names, config, safetensors files read and written safely,
and the tokenizer files `AutoTokenizer` loads.

Our rotary embedding follows Hugging Face's rotate_half convention, so q and k map to
`LlamaForCausalLM` as they are (no Meta-style permutation); fused tensors (q/k/v, gate/up) are
canonical tensors already split (`canonical_parts`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import LlamaConfig

from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from tessera.data.format import DataError, first_line
from tessera.data.tokenizer import BYTE_EOS_ID, HF_TOKENIZER_FILE, HFTokenizer
from tessera.trainer.config import ModelConfig

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
BYTE_EOS_TOKEN = "<|endoftext|>"
MAX_SEQ_LEN_FROM_HF = 4096  # model.seq_len of an import, unless set: a training window, not a limit

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(\w+)\.weight$")


class HFError(ValueError):
    """A Hugging Face directory we cannot convert; the message names the file or tensor."""


def hf_name(name: str) -> str:
    """Our canonical tensor name -> the LlamaForCausalLM state-dict name."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_RE.match(name)
    assert match and match[2] in _LAYER_NAMES, f"no Hugging Face name for {name}"
    return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.weight"


# ---------------------------------------------------------------------------------------------
# Config


def llama_config(model: ModelConfig, eos_id: int | None, dtype: torch.dtype) -> LlamaConfig:
    from transformers import (
        LlamaConfig,  # lazy: transformers takes seconds to import: only what needs it pays it
    )

    return LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        hidden_act="silu",
        max_position_embeddings=model.seq_len,
        rms_norm_eps=model.norm_eps,
        tie_word_embeddings=model.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": model.rope_theta},
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=None,
        architectures=["LlamaForCausalLM"],
        dtype=dtype,
    )


def model_config_from_hf(directory: Path) -> ModelConfig:
    """Our model section from a Hugging Face config.json; anything a Tessera Llama cannot
    express (biases, another activation, scaled RoPE) is an error naming the key."""
    path = directory / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise HFError(f"{path}: missing (not a Hugging Face model directory)") from None
    except (OSError, ValueError) as e:
        raise HFError(f"{path}: unreadable ({e})") from e
    if not isinstance(raw, dict):
        raise HFError(f"{path}: not a model config (a JSON object)")
    architectures = raw.get("architectures") or []
    if raw.get("model_type") != "llama" or (
        architectures and "LlamaForCausalLM" not in architectures
    ):
        raise HFError(
            f"{path}: model_type {raw.get('model_type')!r}, architectures {architectures}: "
            f"not a LlamaForCausalLM checkpoint (the only architecture Tessera trains)"
        )
    required = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    )
    missing = [key for key in required if not isinstance(raw.get(key), int)]
    if missing:
        raise HFError(f"{path}: key {missing[0]!r} missing or not an integer")
    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    # As transformers reads it: a legacy `rope_scaling` replaces `rope_parameters` whole.
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    unsupported = {
        "hidden_act": (raw.get("hidden_act", "silu"), "silu"),
        "attention_bias": (raw.get("attention_bias", False), False),
        "mlp_bias": (raw.get("mlp_bias", False), False),
        "head_dim": (head_dim, raw["hidden_size"] // heads),
        "rope_parameters.rope_type": (
            rope.get("rope_type", rope.get("type", "default")),
            "default",
        ),
    }
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise HFError(
                f"{path}: {key}={value!r} is not supported (Tessera's Llama needs {supported!r})"
            )
    return ModelConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        ffn_hidden_size=raw["intermediate_size"],
        seq_len=min(raw.get("max_position_embeddings", MAX_SEQ_LEN_FROM_HF), MAX_SEQ_LEN_FROM_HF),
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


# ---------------------------------------------------------------------------------------------
# Reading: safetensors (or, when allowed, pickle) files, checked before any tensor is read


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file lists, after checking the file holds all their bytes (a
    truncated file would otherwise fail deep inside a read, or crash a memory-mapped one)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header_bytes = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if header_bytes < 2 or 8 + header_bytes > size:
            raise HFError(f"{path}: not a safetensors file (or truncated in its header)")
        try:
            header = json.loads(f.read(header_bytes))
        except ValueError as e:
            raise HFError(f"{path}: not a safetensors file (header is not JSON: {e})") from e
    tensors, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in _DTYPES:
            raise HFError(
                f"{path}: tensor {name} has dtype {entry.get('dtype')!r}, not a float type"
            )
        end = max(end, entry["data_offsets"][1])
        tensors[name] = TensorInfo(path, entry["dtype"], tuple(entry["shape"]))
    if 8 + header_bytes + end > size:
        raise HFError(
            f"{path}: truncated ({size} bytes; its header lists {8 + header_bytes + end})"
        )
    return tensors


class HFCheckpoint:
    """The weights of a Hugging Face Llama directory, as our canonical tensors, one at a time."""

    def __init__(self, directory: str | Path, allow_pickle: bool = False) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise HFError(f"{self.directory}: no such directory")
        self.model = model_config_from_hf(self.directory)
        self._pickled: dict[Path, Any] = {}  # filled while indexing pickle files
        self.tensors = self._index(allow_pickle)

    def _index(self, allow_pickle: bool) -> dict[str, TensorInfo]:
        d = self.directory
        files = self._weight_files(SAFETENSORS_FILE, SAFETENSORS_INDEX)
        if files:
            return {k: v for f in files for k, v in safetensors_header(f).items()}
        pickled = self._weight_files(PICKLE_FILE, PICKLE_INDEX)
        if pickled and not allow_pickle:
            raise HFError(
                f"{pickled[0]}: pickle weights are refused (loading pickle can run code); "
                f"convert them to safetensors, or pass --allow-pickle to read them with "
                f"torch.load(weights_only=True)"
            )
        if not pickled:
            raise HFError(f"{d}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} (no weights)")
        tensors = {}
        for path in pickled:
            state = self._load_pickle(path)
            tensors.update(
                {k: TensorInfo(path, "pickle", tuple(v.shape)) for k, v in state.items()}
            )
        return tensors

    def _weight_files(self, single: str, index: str) -> list[Path]:
        if (self.directory / index).is_file():
            path = self.directory / index
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise HFError(f"{path}: not a weight index ({e})") from e
            files = sorted({self.directory / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise HFError(f"{f}: missing (listed in {path})")
            return files
        return [self.directory / single] if (self.directory / single).is_file() else []

    def _load_pickle(self, path: Path) -> dict:
        if path not in self._pickled:
            try:
                self._pickled[path] = torch.load(
                    path, map_location="cpu", weights_only=True, mmap=True
                )
            except Exception as e:
                raise HFError(f"{path}: cannot be loaded ({first_line(e)})") from e
        return self._pickled[path]

    def tokenizer(self) -> tuple | None:
        """The directory's tokenizer.json with what Tessera needs of it (vocabulary, EOS), for
        the imported checkpoint to carry; None when there is none, or no EOS token in it."""
        path = self.directory / HF_TOKENIZER_FILE
        if not path.is_file():
            return None
        try:
            return HFTokenizer.from_file(path).info(), path.read_text()
        except DataError:
            return None

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every tensor our model needs is there with its shape (names in the message)."""
        for name, shape in shapes.items():
            info = self.tensors.get(hf_name(name))
            if info is None:
                raise HFError(f"{self.directory}: tensor {hf_name(name)} is missing")
            if info.shape != tuple(shape):
                raise HFError(
                    f"{info.file}: tensor {hf_name(name)} has shape {list(info.shape)}, "
                    f"config.json implies {list(shape)}"
                )

    def tensor(self, name: str) -> torch.Tensor:
        """Our canonical tensor `name` in fp32."""
        info = self.tensors[hf_name(name)]
        if info.dtype == "pickle":
            return self._load_pickle(info.file)[hf_name(name)].float().clone()

        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(hf_name(name)).float()


# ---------------------------------------------------------------------------------------------
# Writing: safetensors shards with an index above the threshold


class ShardedWriter:
    """Collects tensors into files of at most `max_shard_bytes` (a tensor larger than that gets a
    file of its own); one file is `model.safetensors`, more get Hugging Face's names and index.
    Holds at most one shard's tensors in memory."""

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        num_bytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + num_bytes > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += num_bytes
        self.total_bytes += num_bytes

    def _flush(self) -> None:
        save_file(self.pending, str(self._tmp_name(len(self.shards))), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def _tmp_name(self, index: int) -> Path:
        return self.directory / f"shard-{index:05d}.safetensors.tmp"

    def close(self) -> list[str]:
        """Write what is left, name the files; returns their names."""
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            os.replace(self._tmp_name(0), self.directory / SAFETENSORS_FILE)
            return [SAFETENSORS_FILE]
        names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for index, (name, tensors) in enumerate(zip(names, self.shards)):
            os.replace(self._tmp_name(index), self.directory / name)
            weight_map.update({t: name for t in tensors})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return [*names, SAFETENSORS_INDEX]


def parse_bytes(text: str) -> int:
    """'5GB', '500MB', '1024' -> bytes (powers of 1000, as Hugging Face's max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    unit = (match[2] or "B").upper()
    scale = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }
    return int(float(match[1]) * scale[unit])


# ---------------------------------------------------------------------------------------------
# Tokenizer files


def byte_tokenizer_json() -> str:
    """Our byte tokenizer (ids 0-255 = bytes, 256 = EOS) as a `tokenizers` BPE without merges:
    each byte is one token, through the byte-to-unicode alphabet of byte-level BPE."""


    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    vocab[BYTE_EOS_TOKEN] = BYTE_EOS_ID
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(BYTE_EOS_TOKEN, special=True)])
    return tokenizer.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenizes into)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def write_tokenizer(directory: Path, tokenizer_json: str, eos_id: int, seq_len: int) -> None:
    """tokenizer.json plus the tokenizer_config.json that makes AutoTokenizer load it as a fast
    tokenizer with its EOS token."""
    eos_token = Tokenizer.from_str(tokenizer_json).id_to_token(eos_id)
    (directory / "tokenizer.json").write_text(tokenizer_json)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos_token,
        "model_max_length": seq_len,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos_token}) + "\n")
