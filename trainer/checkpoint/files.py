"""Files: durable writes (fsynced, hashed as written), safe reads (`torch.load(weights_only=True)`
with an allow-list), and the host stager that copies device tensors for background writes."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from tessera.data.format import first_line
from tessera.trainer.checkpoint.format import TMP_SUFFIX, CheckpointError

WRITEBACK_BYTES = 32 << 20


READ_CHUNK_BYTES = 16 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingFile:
    """A write-only file object that hashes and counts what passes through it, and starts the
    disk writeback every WRITEBACK_BYTES (so that the final fsync waits for the tail only)."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()
        self.num_bytes = 0
        self._flushed_bytes = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha256.update(data)
        self.num_bytes += len(data)
        written = self._file.write(data)
        if self.num_bytes - self._flushed_bytes >= WRITEBACK_BYTES:
            self._file.flush()
            # Linux: DONTNEED starts writeback of the dirty range without waiting for it
            os.posix_fadvise(
                self._file.fileno(),
                self._flushed_bytes,
                self.num_bytes - self._flushed_bytes,
                os.POSIX_FADV_DONTNEED,
            )
            self._flushed_bytes = self.num_bytes
        return written

    def flush(self) -> None:
        self._file.flush()


@dataclasses.dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the checkpoint directory, '/'-separated
    num_bytes: int
    sha256: str


def _write_durable(path: Path, write: Callable[[_HashingFile], Any]) -> tuple[int, str]:
    """Call write(file) on a new file, fsync it; returns (bytes, sha256)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw:
        hashing = _HashingFile(raw)
        write(hashing)
        raw.flush()
        os.fsync(raw.fileno())
    return hashing.num_bytes, hashing.sha256.hexdigest()


def write_torch_file(obj: Any, path: Path) -> tuple[int, str]:
    return _write_durable(path, lambda f: torch.save(obj, f))


def write_text_file(text: str, path: Path) -> tuple[int, str]:
    return _write_durable(path, lambda f: f.write(text.encode()))


def replace_text_atomically(path: Path, text: str) -> None:
    """Write, fsync, rename over `path`, fsync the directory: readers see old or new, never half."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    write_text_file(text, tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_sha256(path: Path) -> str:
    """sha256 of a file, reading the next chunk on a thread while this one hashes (both release
    the GIL), so that hashing costs little beyond the read."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f, concurrent.futures.ThreadPoolExecutor(1) as reader:
        pending = reader.submit(f.read, READ_CHUNK_BYTES)
        while chunk := pending.result():
            pending = reader.submit(f.read, READ_CHUNK_BYTES)
            digest.update(chunk)
    return digest.hexdigest()


def safe_globals() -> list:
    """The only non-plain types DeepSpeed's checkpoint files hold (ZeRO optimizer state)."""
    return [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]


def safe_load(path: str | Path, map_location: Any = None) -> Any:
    """torch.load that unpickles tensors, plain containers and the allow-list, nothing else."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be loaded safely ({first_line(e)})") from e


def compact(obj: Any) -> Any:
    """Tensors on the CPU, each in a storage of its own size: torch.save writes a view's whole
    storage, and DeepSpeed's tensors are often views into large flat buffers."""
    if torch.is_tensor(obj):
        tensor = obj.detach()
        if tensor.device.type != "cpu":
            return tensor.to("cpu")
        if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
            return tensor.clone()
        return tensor
    if isinstance(obj, dict):
        return type(obj)((k, compact(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [compact(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(compact(v) for v in obj)
    return obj


def holds_device_tensors(obj: Any) -> bool:
    """Whether a (nested dict/list/tuple) object holds a tensor that is not in host memory."""
    if isinstance(obj, torch.Tensor):
        return obj.device.type != "cpu"
    if isinstance(obj, dict):
        return any(holds_device_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(holds_device_tensors(v) for v in obj)
    return False


def host_stager() -> DefaultStager:
    """torch.distributed.checkpoint's stager (what its async_save copies to host memory with):
    host buffers cached per source storage and reused by every later save, pinned with CUDA."""
    cuda = torch.cuda.is_available()
    return DefaultStager(
        StagingOptions(
            use_pinned_memory=cuda,
            use_shared_memory=False,
            use_async_staging=False,
            use_non_blocking_copy=cuda,
        )
    )
