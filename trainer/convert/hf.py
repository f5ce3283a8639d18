"""Hugging Face format: config.json (through tessera.trainer.architecture and its families),
safetensors files read and written safely, and the tokenizer files `AutoTokenizer` loads.

Our rotary embedding follows Hugging Face's rotate_half convention, so q and k map as they are
(no Meta-style permutation); fused tensors (q/k/v, gate/up) are canonical tensors already split
(`canonical_parts`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from tessera.data.format import TokenizerInfo, first_line, is_count, is_file_name, short_repr
from tessera.data.tokenizer import BYTE_EOS_ID, HF_TOKENIZER_FILE, HFTokenizer
from tessera.trainer import architecture
from tessera.trainer.config import ModelConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
BYTE_EOS_TOKEN = "<|endoftext|>"
MAX_SEQ_LEN_FROM_HF = 4096  # model.seq_len of an import, unless set: a training window, not a limit

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class HFError(ValueError):
    """A Hugging Face directory we cannot convert; the message names the file or tensor."""


# ---------------------------------------------------------------------------------------------
# Config


def hf_config(model: ModelConfig, eos_id: int | None, dtype: torch.dtype) -> PretrainedConfig:
    """The config.json of an export: the model's family (model.family, or the one its options
    make) with every key a round trip needs."""
    from transformers import (
        AutoConfig,  # lazy: transformers takes seconds to import: only what needs it pays it
    )

    try:
        family, fields = architecture.hf_config_fields(model, eos_id)
    except ValueError as e:
        raise HFError(f"cannot export: {e}") from None
    return AutoConfig.for_model(family.model_type, **fields, dtype=dtype)


def model_config_from_hf(directory: Path) -> ModelConfig:
    """Our model section from a Hugging Face config.json (one of the families Tessera trains);
    anything else is an error naming the key and its value."""
    path = directory / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise HFError(f"{path}: missing (not a Hugging Face model directory)") from None
    except (OSError, ValueError, RecursionError) as e:
        raise HFError(f"{path}: unreadable ({first_line(e)})") from e
    if not isinstance(raw, dict):
        raise HFError(f"{path}: not a model config (a JSON object)")
    try:
        return ModelConfig(**architecture.model_fields_from_hf(raw, MAX_SEQ_LEN_FROM_HF))
    except architecture.HFConfigError as e:
        raise HFError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Reading: safetensors (or, when allowed, pickle) files, checked before any tensor is read


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file lists, after checking its header as the safetensors
    library will read it (each entry's dtype, shape and data_offsets, the tensors back to back,
    the file holding all their bytes and no more): a bad file fails here, naming the tensor, not
    later inside a read, or as the crash of a memory-mapped read of a truncated file."""
    size = path.stat().st_size
    header_bytes, header = _read_header(path, size)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise HFError(f"{path}: __metadata__ is not a mapping of strings")
    offsets = {name: _entry_offsets(path, name, entry) for name, entry in header.items()}
    _check_layout(path, offsets, 8 + header_bytes, size)
    return {name: TensorInfo(path, entry["dtype"], tuple(entry["shape"]))
            for name, entry in header.items()}


def _read_header(path: Path, size: int) -> tuple[int, dict]:
    """(its length in bytes, the header): a JSON object after an 8-byte length."""
    with open(path, "rb") as f:
        head = f.read(8)
        header_bytes = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if header_bytes < 2 or 8 + header_bytes > size:
            raise HFError(f"{path}: not a safetensors file (or truncated in its header)")
        if header_bytes > MAX_HEADER_BYTES:
            raise HFError(f"{path}: not a safetensors file (a header of {header_bytes} bytes; "
                          f"safetensors reads at most {MAX_HEADER_BYTES})")
        try:
            header = json.loads(f.read(header_bytes))
        except (ValueError, RecursionError) as e:
            raise HFError(f"{path}: not a safetensors file (header is not JSON: "
                          f"{first_line(e)})") from e
    if not isinstance(header, dict):
        raise HFError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header_bytes, header


def _entry_offsets(path: Path, name: str, entry: Any) -> tuple[int, int]:
    """(begin, end) of a tensor's bytes in the data, after checking that its header entry has a
    float dtype, a shape and as many bytes as they make."""
    where = f"{path}: tensor {name}"
    if not isinstance(entry, dict):
        raise HFError(f"{where}: its header entry {short_repr(entry)} is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise HFError(f"{where} has dtype {short_repr(dtype)}, not a float type")
    if not _sizes(shape):
        raise HFError(f"{where}: shape {short_repr(shape)} is not a list of sizes")
    if not _sizes(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise HFError(f"{where}: data_offsets {short_repr(offsets)} is not [begin, end]")
    expected = math.prod(shape) * _DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        raise HFError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, "
                      f"its dtype {dtype} and shape {short_repr(shape)} {expected}")
    return offsets[0], offsets[1]


def _sizes(value: Any) -> bool:
    """A list of integers >= 0."""
    return isinstance(value, list) and all(is_count(v) for v in value)


def _check_layout(path: Path, offsets: dict[str, tuple[int, int]], data_start: int,
                  size: int) -> None:
    """The tensors' bytes back to back from `data_start` (after the header) to the file's end."""
    data_bytes = size - data_start
    end = max((end for _, end in offsets.values()), default=0)
    if end > data_bytes:
        raise HFError(f"{path}: truncated ({size} bytes; its header lists {data_start + end})")
    position = 0
    for name, (begin, end) in sorted(offsets.items(), key=lambda item: item[1]):
        if begin != position:
            raise HFError(f"{path}: tensor {name} starts at byte {begin} of the data, not where "
                          f"the tensor before it ends ({position})")
        position = end
    if position != data_bytes:
        raise HFError(f"{path}: {data_bytes - position} bytes after its last tensor (not a "
                      f"safetensors file)")


def read_weight_map(index: Path) -> dict[str, str]:
    """The tensor name -> file name map of a weight index (safetensors' or pickle's)."""
    try:
        raw = json.loads(index.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise HFError(f"{index}: not a weight index ({first_line(e)})") from e
    found = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(found, dict) or not found or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in found.items()
    ):
        raise HFError(f"{index}: not a weight index (its weight_map must map tensor names to "
                      f"file names)")
    return found


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
        path = self.directory / index
        if path.is_file():
            names = read_weight_map(path).values()
            files = sorted({self._listed_file(path, name) for name in names})
            for f in files:
                if not f.is_file():
                    raise HFError(f"{f}: missing (listed in {path})")
            return files
        return [self.directory / single] if (self.directory / single).is_file() else []

    def _listed_file(self, index: Path, name: str) -> Path:
        """A file an index names: a plain name inside the directory, never a path out of it."""
        if not is_file_name(name):  # the rule a prepared data directory's manifest follows
            raise HFError(f"{index}: weight_map names {short_repr(name)}, not a file name inside "
                          f"{self.directory} (weights are read from that directory only)")
        return self.directory / name

    def _load_pickle(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._pickled:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise HFError(f"{path}: cannot be loaded ({first_line(e)})") from e
            self._pickled[path] = _state_dict(path, state)
        return self._pickled[path]

    def tokenizer(self) -> tuple[TokenizerInfo, str] | None:
        """The directory's tokenizer.json (EOS from its tokenizer_config.json) as the imported
        checkpoint carries it; None when there is none. Refused when its vocabulary, added
        special tokens included, does not fit the model's."""
        path = self.directory / HF_TOKENIZER_FILE
        if not path.is_file():
            return None
        tokenizer = HFTokenizer.from_file(path)
        if tokenizer.vocab_size > self.model.vocab_size:
            raise HFError(f"{path}: {tokenizer.vocab_size} tokens (added special tokens "
                          f"included), more than config.json's vocab_size "
                          f"{self.model.vocab_size}: not this model's tokenizer")
        return tokenizer.info(), path.read_text()

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every tensor our model needs is there with its shape (names in the message)."""
        for name, shape in shapes.items():
            hf = architecture.hf_name(name)
            info = self.tensors.get(hf)
            if info is None:
                raise HFError(f"{self.directory}: tensor {hf} is missing")
            if info.shape != tuple(shape):
                raise HFError(f"{info.file}: tensor {hf} has shape {list(info.shape)}, "
                              f"config.json implies {list(shape)}")

    def tensor(self, name: str) -> torch.Tensor:
        """Our canonical tensor `name` in fp32."""
        hf = architecture.hf_name(name)
        info = self.tensors[hf]
        if info.dtype == "pickle":
            return self._load_pickle(info.file)[hf].float().clone()
        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(hf).float()


def _state_dict(path: Path, state: Any) -> dict[str, torch.Tensor]:
    """A pickle file's contents, which must be a state dict: tensor names to tensors."""
    if not isinstance(state, dict):
        raise HFError(f"{path}: holds a {type(state).__name__}, not a state dict (tensor names to "
                      f"tensors)")
    for name, value in state.items():
        if not isinstance(name, str):
            raise HFError(f"{path}: a name {short_repr(name)} that is not a string: not a state "
                          f"dict")
        if not isinstance(value, torch.Tensor):
            raise HFError(f"{path}: entry {short_repr(name)} is a {type(value).__name__}, not a "
                          f"tensor: not a state dict")
    return state


# ---------------------------------------------------------------------------------------------
# Writing: safetensors shards with an index above the threshold


def current_umask() -> int:
    """The process's umask, read without setting it (os.umask would, for a moment in which
    another thread's new file would be world-writable); Linux says it in /proc."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


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
        path = self._tmp_name(len(self.shards))
        save_file(self.pending, str(path), metadata={"format": "pt"})
        path.chmod(0o666 & ~current_umask())  # safetensors makes it 0600: others could not read
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


def bos_id(tokenizer_json: str) -> int | None:
    """The token the tokenizer's post-processor puts before a text (Llama 3's
    <|begin_of_text|>); None when it adds none."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    framed = tokenizer.encode("a", add_special_tokens=True).ids
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    prepends_one = len(framed) > len(plain) and framed[1 : 1 + len(plain)] == plain
    return framed[0] if prepends_one else None


def write_tokenizer(directory: Path, tokenizer_json: str, eos_id: int, bos: int | None,
                    seq_len: int) -> None:
    """tokenizer.json plus the tokenizer_config.json that makes AutoTokenizer load it as a fast
    tokenizer with its EOS (and BOS, `bos_id`) token."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    special = {"eos_token": tokenizer.id_to_token(eos_id)}
    if bos is not None:
        special["bos_token"] = tokenizer.id_to_token(bos)
    (directory / "tokenizer.json").write_text(tokenizer_json)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": seq_len,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special) + "\n")
