"""Checkpoints: DeepSpeed's sharded per-rank files, committed so that none is ever half-written.

    checkpoints/step-00000100/          one committed checkpoint
        mp_rank_00_model_states.pt ...  DeepSpeed's files (model, optimizer shards, schedule)
        rng/rank-00003.pt               each rank's RNG states
        tessera_state.json              step, consumed samples, data cursor, layout
        config.yaml                     the resolved config of the run that saved it
        tokenizer/info.json             the tokenizer of the training data (kind, vocabulary, EOS)
        tokenizer/tokenizer.json        and its file, for a Hugging Face tokenizer: `generate`
                                        and `convert` read these, never the run's data paths
        manifest.json                   written last: every file with its size and sha256, the
                                        step, layout, model, config hash and Tessera version
    checkpoints/latest                  the committed tag, replaced atomically

Commit protocol: every rank writes into `step-N.tmp/` and fsyncs its files; rank 0 then writes the
manifest (fsynced), renames `step-N.tmp/` to `step-N/`, fsyncs the parent and replaces `latest`
(write, fsync, rename). A directory without a valid manifest is never loaded, so a kill at any
point leaves the previous checkpoint in charge. Retention removes a manifest before its files.

DeepSpeed writes and reads its files through a "checkpoint engine"; `TesseraCheckpointEngine` is
ours. `save` writes each file at once from the live tensors, or, with `checkpoint.async`, copies
the state to host memory with torch.distributed.checkpoint's stager (cached, pinned with CUDA
buffers) and writes on one background thread; either way it records size and sha256 as it goes.
`load` is `torch.load(weights_only=True)` with an allow-list of the few DeepSpeed types its files
hold, so DeepSpeed's own loads of model, ZeRO and pipeline-layer files are safe too.

Why not DeepSpeed's DecoupledCheckpointEngine (0.19.8): it commits inside the next
`engine.step()` and blocks that step until the files are written (ZeRO optimizer state goes to
its writer process uncopied, so the next update must wait); with ZeRO >= 1 it fails on CPU
(tensors that require grad cannot cross its process queue); it needs DeepSpeed's launcher's
CROSS_SIZE/CROSS_RANK; its "fast" writer needs an accelerator; it writes `latest` in place.
Why not DCP's async_save: it writes DCP's own format (which DeepSpeed's loader and zero_to_fp32
cannot read) and reads its `.metadata` back with pickle.load.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from tessera import __version__
from tessera.data.format import TokenizerInfo
from tessera.data.tokenizer import HF_TOKENIZER_FILE

# A tokenizer as a checkpoint carries it: its description, and its tokenizer.json text (hf kind).
CarriedTokenizer = tuple[TokenizerInfo, str | None]

MANIFEST_FILE = "manifest.json"
STATE_FILE = "tessera_state.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_INFO = f"{TOKENIZER_DIR}/info.json"
LATEST_FILE = "latest"
FORMAT = "tessera-checkpoint"
FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"
# Model fields that change the tensors (or what they mean): they must match on load.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "ffn_hidden_size",
    "tie_embeddings",
)
# Test hook only: seconds to sleep at each step of a save, so that a test can kill a job inside it.
DELAY_ENV = "TESSERA_TEST_CHECKPOINT_DELAY_S"
_TAG_RE = re.compile(r"^step-(\d+)$")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
WRITEBACK_BYTES = 32 << 20
READ_CHUNK_BYTES = 16 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, corrupt, another model); the message names it."""


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def step_of(tag: str) -> int | None:
    match = _TAG_RE.match(tag)
    return int(match.group(1)) if match else None


def warn(message: str) -> None:
    print(f"tessera: warning: {message}", file=sys.stderr, flush=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _fault_point() -> None:
    delay_s = float(os.environ.get(DELAY_ENV, "0") or 0)
    if delay_s > 0:
        time.sleep(delay_s)


# ---------------------------------------------------------------------------------------------
# Files: durable writes, hashing, safe reads


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingFile:
    """A write-only file object that hashes and counts what passes through it, and starts the
    disk writeback every WRITEBACK_BYTES (so that the final fsync waits for the tail only)."""

    def __init__(self, file) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()
        self.num_bytes = 0
        self._flushed_bytes = 0

    def write(self, data) -> int:
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


def _write_durable(path: Path, write) -> tuple[int, str]:
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
    _fsync_dir(path.parent)


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
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]


def safe_load(path: str | Path, map_location: Any = None) -> Any:
    """torch.load that unpickles tensors, plain containers and the allow-list, nothing else."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be loaded safely ({first_line})") from e


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


def host_stager():
    """torch.distributed.checkpoint's stager (what its async_save copies to host memory with):
    host buffers cached per source storage and reused by every later save, pinned with CUDA."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    cuda = torch.cuda.is_available()
    return DefaultStager(
        StagingOptions(
            use_pinned_memory=cuda,
            use_shared_memory=False,
            use_async_staging=False,
            use_non_blocking_copy=cuda,
        )
    )


# ---------------------------------------------------------------------------------------------
# RNG states as tensors and plain values (loadable with weights_only=True)


def rng_state() -> dict:
    version, key, gauss = random.getstate()
    kind, np_key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "key": torch.tensor(key, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "key": torch.from_numpy(np_key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["key"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["key"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def restore_rng_at_first_forward(module: torch.nn.Module, state: dict) -> None:
    """Set the RNG states just before the module's next forward, not now: what the job does in
    between (torch's DataLoader draws its base seed from the global generator when its iterator
    is made) happened before the save in the uninterrupted run, so it must not shift the streams.
    """

    def hook(*_) -> None:
        handle.remove()
        set_rng_state(state)

    handle = module.register_forward_pre_hook(hook)


# ---------------------------------------------------------------------------------------------
# DeepSpeed's side: our checkpoint engine


class TesseraCheckpointEngine(CheckpointEngine):
    """Plugged into `engine.checkpoint_engine`; DeepSpeed calls `save(state, path)` per file.

    Synchronous: `save` writes the file at once from the live tensors. Asynchronous: `save` copies
    the state to host memory (torch's checkpoint stager; the only part a training step waits for)
    and queues the write on one writer thread. Files are recorded relative to the directory
    being saved, for the manifest.
    """

    def __init__(self, async_write: bool, commit_group) -> None:
        super().__init__()
        self.name = "TesseraCheckpointEngine"
        self.async_write = async_write
        self.commit_group = commit_group  # gloo group for the commit, usable from the writer thread
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tessera-ckpt")
            if async_write
            else None
        )
        self._stager = host_stager() if async_write else None
        self._directory: Path | None = None
        self._records: list[concurrent.futures.Future | FileRecord] = []
        self.pending: concurrent.futures.Future | None = None  # the async save not yet committed
        self._last_load: tuple | None = None
        self.tokenizer: CarriedTokenizer | None = None  # saved into every checkpoint (`install`)

    # DeepSpeed's interface
    def create(self, info) -> None:
        pass

    def makedirs(self, path, exist_ok=False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict, path: str) -> None:
        self.save_object(state_dict, Path(path))

    def load(self, path: str, map_location=None):
        # DeepSpeed's MegatronSDLoader reads the model file twice in a row (check_ckpt_list,
        # then load): the second read gets the first one's result.
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
        if self._last_load is not None and self._last_load[0] == key:
            obj, self._last_load = self._last_load[1], None
            return obj
        obj = safe_load(path, map_location)
        self._last_load = (key, obj)
        return obj

    def forget_loads(self) -> None:
        self._last_load = None

    def commit(self, info) -> bool:
        return True  # the commit is ours (see `save` below): DeepSpeed's is a no-op

    def preserves_storage_sharing(self) -> bool:
        return False  # save() compacts views itself (and copies when asynchronous): no clone first

    # Ours
    def begin(self, directory: Path) -> None:
        self._directory = directory
        self._records = []

    def save_object(self, obj: Any, path: Path) -> None:
        if self._stager is None:
            self._submit(lambda: write_torch_file(compact(obj), path), path)
        elif not holds_device_tensors(obj):  # RNG states, counters: a copy is all it takes (torch
            staged = copy.deepcopy(obj)  # 2.11's stager refused such an object on CUDA)
            self._submit(lambda: write_torch_file(compact(staged), path), path)
        else:  # reuses the previous save's buffers: its writes are done (`save` waited)
            staged = self._stager.stage(obj)
            self._submit(lambda: write_torch_file(compact(staged), path), path)

    def save_text(self, text: str, path: Path) -> None:
        self._submit(lambda: write_text_file(text, path), path)

    def _submit(self, write, path: Path) -> None:
        assert self._directory is not None, "save outside begin()"
        relative = path.relative_to(self._directory).as_posix()

        def job() -> FileRecord:
            num_bytes, sha256 = write()
            _fault_point()
            return FileRecord(relative, num_bytes, sha256)

        self._records.append(self._executor.submit(job) if self._executor else job())

    def finish(self, commit) -> None:
        """Run `commit(records)` after this save's writes: now, or queued behind them."""
        records = self._records
        self._records, self._directory = [], None

        def job():
            try:
                done = [
                    r.result() if isinstance(r, concurrent.futures.Future) else r for r in records
                ]
            except Exception as e:  # noqa: BLE001 - a failed write still joins the commit (as such)
                done = f"{type(e).__name__}: {e}"
            return commit(done)

        if self._executor is None:
            job()
        else:
            self.pending = self._executor.submit(job)

    def wait(self) -> None:
        """Block until the pending save is committed; raise what failed in it."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()


def install(engine, cfg, tokenizer: CarriedTokenizer | None = None) -> TesseraCheckpointEngine:
    """Collective: give `engine` our checkpoint engine (every rank, once, after building it);
    every checkpoint it saves carries `tokenizer` (None: a run that has none, from-hf without
    one)."""
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=30))
    ours = TesseraCheckpointEngine(cfg.checkpoint.async_save, group)
    ours.tokenizer = tokenizer
    engine.checkpoint_engine = ours
    return ours


def _ours(engine) -> TesseraCheckpointEngine:
    ours = engine.checkpoint_engine
    assert isinstance(ours, TesseraCheckpointEngine), "checkpoint.install(engine, cfg) not called"
    return ours


# ---------------------------------------------------------------------------------------------
# Save and commit


def _manifest_base(step: int, cfg, engine) -> dict:
    from tessera.trainer.config import to_yaml

    world = dist.get_world_size()
    p = cfg.parallel
    config_yaml = to_yaml(cfg)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tessera_version": __version__,
        "step": step,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config_sha256": hashlib.sha256(config_yaml.encode()).hexdigest(),
        "layout": {
            "world_size": world,
            "tp": p.tp,
            "pp": p.pp,
            "dp": world // (p.tp * p.pp),
            "zero_stage": p.zero_stage,
            "precision": cfg.train.precision,
        },
        "model": dataclasses.asdict(cfg.model),
        "tensors": canonical_shapes(engine.module),  # collective
    }


def canonical_shapes(module) -> dict[str, list[int]]:
    """Collective: full (layout-independent) shapes of the model's tensors, over all stages."""
    local = {}
    for layer in module.modules():
        if hasattr(layer, "canonical_parts"):
            for parts in layer.canonical_parts().values():
                local.update({part.name: list(part.shape) for part in parts})
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return {name: shape for shapes in everyone for name, shape in sorted(shapes.items())}


def save(engine, root: str | Path, step: int, state: dict, cfg) -> Path:
    """Collective: save the engine and `state` as `root/step-N`; returns that directory.

    Synchronous: returns once committed. With `checkpoint.async`: returns after the host copy;
    the files are written and committed in the background (`wait` blocks for it). A save first
    waits for the one before it.
    """
    from tessera.trainer.config import to_yaml

    ours = _ours(engine)
    ours.wait()
    root = Path(root)
    rank = _rank()
    tag = tag_for(step)
    tmp, final = root / (tag + TMP_SUFFIX), root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_uncommitted(root)
    dist.barrier()
    base = _manifest_base(step, cfg, engine)
    ours.begin(tmp)
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={}, save_latest=False)
    ours.save_object(rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
    if rank == 0:
        ours.save_text(json.dumps(state, indent=2), tmp / STATE_FILE)
        ours.save_text(to_yaml(cfg), tmp / CONFIG_FILE)
        if ours.tokenizer is not None:
            _save_tokenizer(ours, tmp, ours.tokenizer)
    keep = (cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
    ours.finish(lambda records: _commit_all(ours.commit_group, records, tmp, final, base, keep))
    if not ours.async_write:
        dist.barrier()
    return final


def _save_tokenizer(ours: TesseraCheckpointEngine, tmp: Path, tokenizer: CarriedTokenizer
                    ) -> None:
    info, text = tokenizer
    info = dataclasses.replace(info, file=HF_TOKENIZER_FILE if text is not None else None)
    ours.save_text(json.dumps(dataclasses.asdict(info), indent=2), tmp / TOKENIZER_INFO)
    if text is not None:
        ours.save_text(text, tmp / TOKENIZER_DIR / HF_TOKENIZER_FILE)


def carried_tokenizer(directory: str | Path) -> CarriedTokenizer | None:
    """The tokenizer a committed checkpoint carries, its files checked against the manifest;
    None for a checkpoint saved without one."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if TOKENIZER_INFO not in manifest["files"]:
        return None
    files = [TOKENIZER_INFO]
    try:
        info = TokenizerInfo(**json.loads((directory / TOKENIZER_INFO).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{directory / TOKENIZER_INFO}: unreadable ({e})") from e
    if info.kind not in ("bytes", "hf"):
        raise CheckpointError(f"{directory / TOKENIZER_INFO}: unknown tokenizer kind {info.kind!r}")
    # The file is always ours, whatever info.json names: nothing outside the checkpoint is read.
    info = dataclasses.replace(info, file=HF_TOKENIZER_FILE if info.kind == "hf" else None)
    if info.kind == "hf":
        files.append(f"{TOKENIZER_DIR}/{HF_TOKENIZER_FILE}")
    for relative in files:
        entry = manifest["files"].get(relative)
        problem = "not listed in the manifest" if entry is None else \
            check_file(directory, relative, entry, checksum=True)
        if problem:
            raise CheckpointError(problem if entry else f"{directory / relative}: {problem}")
    text = (directory / files[1]).read_text() if len(files) > 1 else None
    return info, text


def _commit_all(
    group,
    records: list[FileRecord] | str,
    tmp: Path,
    final: Path,
    base: dict,
    keep: tuple[int, int],
) -> None:
    """Every rank: gather the file records (or what failed) on rank 0, which commits if no rank
    failed; all learn the outcome, so that every rank raises alike."""
    gathered = [None] * dist.get_world_size(group) if dist.get_rank(group) == 0 else None
    dist.gather_object(records, gathered, dst=0, group=group)
    outcome = [None]
    if dist.get_rank(group) == 0:
        try:
            failed = [f"rank {r}: {e}" for r, e in enumerate(gathered) if isinstance(e, str)]
            if failed:
                raise CheckpointError(f"writing failed ({'; '.join(failed)})")
            all_records = [r for rank_records in gathered for r in rank_records]
            commit(tmp, final, base, all_records)
            apply_retention(final.parent, *keep)
            if threading.current_thread() is not threading.main_thread():
                print(f"tessera: saved {final} (written in the background)", flush=True)
        except Exception as e:  # noqa: BLE001 - every rank raises it below
            outcome[0] = f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(outcome, src=0, group=group)
    if outcome[0] is not None:
        raise CheckpointError(f"saving {final} failed: {outcome[0]}")


def commit(tmp: Path, final: Path, base: dict, records: list[FileRecord]) -> None:
    """Rank 0: manifest last, then the atomic rename, then `latest`.

    Files DeepSpeed wrote without our engine (none today) are hashed here, so the manifest always
    lists everything in the directory.
    """
    by_path = {r.path: r for r in records}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        relative = path.relative_to(tmp).as_posix()
        if relative not in by_path and relative != MANIFEST_FILE:
            by_path[relative] = FileRecord(relative, path.stat().st_size, file_sha256(path))
    for record in by_path.values():
        size = (tmp / record.path).stat().st_size
        if size != record.num_bytes:
            raise CheckpointError(
                f"{tmp / record.path}: {size} bytes on disk, {record.num_bytes} written"
            )
    for directory in {tmp, *((tmp / r.path).parent for r in by_path.values())}:
        _fsync_dir(directory)
    _fault_point()
    manifest = {
        **base,
        "files": {
            p: {"bytes": r.num_bytes, "sha256": r.sha256} for p, r in sorted(by_path.items())
        },
    }
    write_text_file(json.dumps(manifest, indent=1), tmp / MANIFEST_FILE)
    _fsync_dir(tmp)
    _fault_point()
    if final.is_symlink():
        raise CheckpointError(f"{final} is a link, not a checkpoint of this run: cannot save "
                              f"step {base['step']} over it; move the link away")
    if final.exists():  # the same step saved again (a rerun after a crash): replace it
        _delete_checkpoint(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    _fault_point()
    replace_text_atomically(final.parent / LATEST_FILE, final.name)


def wait(engine) -> None:
    """Block until a pending asynchronous save is committed (call before the job ends)."""
    _ours(engine).wait()


def _delete_checkpoint(directory: Path) -> None:
    """Delete a checkpoint of ours: never through a link (its target is not ours to delete)."""
    if directory.is_symlink():
        warn(f"{directory} is a link; retention leaves it (and what it points to) alone")
        return
    manifest = directory / MANIFEST_FILE
    if manifest.exists():
        manifest.unlink()  # no longer a valid checkpoint before any of its files goes
        _fsync_dir(directory)
    shutil.rmtree(directory)


def committed_steps(root: str | Path) -> list[int]:
    """Steps of the directories with a manifest (committed), ascending; not verified. A step
    directory that is a link is not among them: resume, fallback and retention stay inside
    checkpoints/ (a link can still be loaded by naming it, e.g. checkpoint.load_from)."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [step_of(p.name) for p in root.iterdir()
             if not p.is_symlink() and (p / MANIFEST_FILE).is_file()]
    return sorted(s for s in steps if s is not None)


def apply_retention(root: Path, keep_last: int, keep_every: int = 0) -> list[int]:
    """Delete committed checkpoints beyond the newest `keep_last`, except every `keep_every`-th
    step; never the one `latest` names. Returns the deleted steps."""
    steps = committed_steps(root)
    protected = set(steps[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        protected |= {s for s in steps if s % keep_every == 0}
    latest = read_latest(root)
    if latest is not None and step_of(latest) is not None:
        protected.add(step_of(latest))
    deleted = [s for s in steps if s not in protected]
    for step in deleted:
        _fault_point()
        _delete_checkpoint(root / tag_for(step))
    return deleted


def remove_uncommitted(root: Path) -> None:
    """Rank 0, before a save: leftovers of saves that never committed (`*.tmp`) and directories
    whose deletion was cut short (no manifest)."""
    for path in root.iterdir():
        if path.is_symlink():  # not ours: never deleted through
            continue
        name = path.name
        uncommitted = name.endswith(TMP_SUFFIX) and step_of(name[: -len(TMP_SUFFIX)]) is not None
        half_deleted = step_of(name) is not None and not (path / MANIFEST_FILE).exists()
        if path.is_dir() and (uncommitted or half_deleted):
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Reading and verifying


def read_latest(root: Path) -> str | None:
    try:
        tag = (Path(root) / LATEST_FILE).read_text().strip()
    except OSError:
        return None
    return tag if step_of(tag) is not None else None


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing; the directory is not a committed checkpoint"
        ) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a Tessera checkpoint manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {manifest.get('format_version')} is not "
            f"{FORMAT_VERSION} (Tessera {__version__})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}: lists no files")
    for name, entry in files.items():
        problem = _entry_problem(name, entry)
        if problem:
            raise CheckpointError(f"{path}: file entry {name!r} {problem}")
    expected_step = step_of(Path(directory).name)
    if expected_step is not None and manifest.get("step") != expected_step:
        raise CheckpointError(
            f"{path}: says step {manifest.get('step')}, the directory step {expected_step}"
        )
    return manifest


def _entry_problem(name: str, entry) -> str | None:
    """What is wrong with a manifest's file entry: the name must be a plain relative path inside
    the checkpoint (no `..`, no absolute or empty parts), the size a count, the hash 64 hex."""
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        return "is not a plain relative path inside the checkpoint"
    if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) \
            or isinstance(entry.get("bytes"), bool) or entry["bytes"] < 0:
        return "has no byte count"
    if not isinstance(entry.get("sha256"), str) or not _SHA256_RE.fullmatch(entry["sha256"]):
        return "has no sha256"
    return None


def check_file(directory: Path, relative: str, entry: dict, checksum: bool) -> str | None:
    """None if the file matches its manifest entry, else what is wrong (naming the file). Only a
    regular file inside `directory` matches: no link, device or fifo (a hash of /dev/zero
    never ends); the size is compared before any byte is hashed."""
    path = directory / relative
    try:
        info = path.lstat()
    except OSError:
        return f"{path}: missing"
    if not stat.S_ISREG(info.st_mode):
        return f"{path}: not a regular file (a link, directory or device)"
    if not path.resolve().is_relative_to(directory.resolve()):
        return f"{path}: lies outside the checkpoint (through a linked directory)"
    size = info.st_size
    if size != entry["bytes"]:
        return f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or rewritten)"
    if checksum and file_sha256(path) != entry["sha256"]:
        return f"{path}: sha256 does not match the manifest (the file is corrupt)"
    return None


def problems(
    directory: str | Path, checksum: bool = True, share: tuple[int, int] = (0, 1)
) -> list[str]:
    """What makes `directory` unusable (empty: valid). `share` = (index, count) checks only every
    count-th file from index, so that ranks can split the work."""
    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except CheckpointError as e:
        return [str(e)]
    index, count = share
    found = []
    if index == 0:  # a tensor file the manifest does not vouch for could still be read
        listed = set(manifest["files"])
        found += [
            f"{path}: not listed in the manifest"
            for path in sorted(directory.rglob("*.pt"))
            if path.relative_to(directory).as_posix() not in listed
        ]
    for relative, entry in sorted(manifest["files"].items())[index::count]:
        problem = check_file(directory, relative, entry, checksum)
        if problem:
            found.append(problem)
    return found


def problems_collective(directory: Path, checksum: bool) -> list[str]:
    """Collective: the ranks split the files, and all get the same list of problems."""
    mine = problems(directory, checksum, share=(dist.get_rank(), dist.get_world_size()))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return sorted({p for rank_problems in everyone for p in rank_problems})


# ---------------------------------------------------------------------------------------------
# Compatibility of a checkpoint with the current config


def _model_differences(manifest: dict, cfg, module) -> list[str]:
    saved = manifest.get("model", {})
    current = dataclasses.asdict(cfg.model)
    diffs = [
        f"model.{key}: checkpoint {saved.get(key)!r}, config {current[key]!r}"
        for key in ARCHITECTURE_FIELDS
        if saved.get(key) != current[key]
    ]
    if diffs:
        return diffs
    saved_shapes, shapes = manifest.get("tensors", {}), canonical_shapes(module)
    for name in sorted(set(saved_shapes) | set(shapes)):
        if name not in shapes:
            diffs.append(f"tensor {name}: in the checkpoint, not in the model")
        elif name not in saved_shapes:
            diffs.append(f"tensor {name}: in the model, not in the checkpoint")
        elif saved_shapes[name] != shapes[name]:
            diffs.append(f"tensor {name}: checkpoint {saved_shapes[name]}, model {shapes[name]}")
    return diffs


def _layout_differences(manifest: dict, cfg, weights_only: bool) -> list[str]:
    saved = manifest.get("layout", {})
    world = dist.get_world_size()
    current = {
        "tp": cfg.parallel.tp,
        "pp": cfg.parallel.pp,
        "dp": world // (cfg.parallel.tp * cfg.parallel.pp),
        "zero_stage": cfg.parallel.zero_stage,
    }
    keys = ["tp", "pp"]
    if weights_only:
        if saved.get("zero_stage") == 3:  # its model files hold partitions, not whole tensors
            return [
                (
                    "zero_stage: a ZeRO-3 checkpoint holds no whole weights to load alone "
                    "(convert it first with `tessera convert reshard`)"
                )
            ]
    else:
        keys.append("zero_stage")
        if current["zero_stage"] > 0 or saved.get("zero_stage", 0) > 0:
            keys.append("dp")  # ZeRO's optimizer partitions follow dp
    labels = {"dp": "data-parallel size (world / (tp*pp))"}
    return [
        f"{labels.get(k, 'parallel.' + k)}: checkpoint {saved.get(k)}, now {current[k]}"
        for k in keys
        if saved.get(k) != current[k]
    ]


def check_compatible(directory: Path, manifest: dict, cfg, module, weights_only: bool) -> None:
    diffs = _model_differences(manifest, cfg, module)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise CheckpointError(f"{directory} was saved for another model: {shown}")
    diffs = _layout_differences(manifest, cfg, weights_only)
    if diffs:
        raise CheckpointError(
            f"{directory} was saved at another parallel layout ({'; '.join(diffs)}); "
            f"reshard it with `tessera convert reshard {directory} OUT_DIR ...` and load that"
        )


# ---------------------------------------------------------------------------------------------
# Loading


def _candidates(root: Path) -> tuple[list[Path], str | None]:
    """Checkpoints to try, in order: the one `latest` names, then the others newest first.
    Also a note when `latest` is missing or names no committed checkpoint."""
    steps = committed_steps(root)
    latest = read_latest(root)
    ordered = [root / tag_for(s) for s in reversed(steps)]
    note = None
    if latest is not None and (root / latest) in ordered:
        ordered.remove(root / latest)
        ordered.insert(0, root / latest)
    elif ordered:
        why = (
            "missing" if latest is None else f"names {latest}, which is not a committed checkpoint"
        )
        note = f"{root / LATEST_FILE} is {why}"
    return ordered, note


def _first_valid(candidates: list[Path], note: str | None, checksum: bool) -> Path:
    """Collective: the first candidate without problems; warns for each one skipped."""
    rejected = []
    for directory in candidates:
        found = problems_collective(directory, checksum)
        if not found:
            if _rank() == 0 and (rejected or note):
                reasons = "; ".join(([note] if note else []) + rejected)
                warn(f"{reasons}; resuming from {directory}, the newest valid checkpoint")
            return directory
        rejected.append(
            f"{directory} is not valid: {found[0]}"
            + (f" (and {len(found) - 1} more problems)" if len(found) > 1 else "")
        )
    more = f"; and {len(rejected) - 3} older ones" if len(rejected) > 3 else ""
    raise CheckpointError("no valid checkpoint to load: " + "; ".join(rejected[:3]) + more)


def resolve_step_dir(path: str | Path) -> Path:
    """`checkpoint.load_from`: a step directory, a checkpoints directory or a run directory."""
    path = Path(path)
    if (path / MANIFEST_FILE).exists() or step_of(path.name) is not None:
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        raise CheckpointError(f"checkpoint.load_from: {path} does not exist")
    candidates, _ = _candidates(root)
    if not candidates:
        raise CheckpointError(f"checkpoint.load_from: {path} holds no committed checkpoint")
    return candidates[0]


def resume(engine, root: str | Path, cfg) -> dict | None:
    """Collective: restore the newest valid checkpoint of this run, else `checkpoint.load_from`.

    Returns the saved Tessera state ({"train", "data", "layout"}) plus "directory" for a full
    restore, only "directory" for a weights-only start, None when there is nothing to load.
    """
    root = Path(root)
    candidates, note = _candidates(root)
    if candidates:
        if cfg.checkpoint.load_from and _rank() == 0:
            print(f"tessera: {root} has checkpoints: resuming them, not checkpoint.load_from")
        directory = _first_valid(candidates, note, cfg.checkpoint.verify)
        return load(engine, directory, cfg)
    if cfg.checkpoint.load_from:
        directory = resolve_step_dir(cfg.checkpoint.load_from)
        found = problems_collective(directory, cfg.checkpoint.verify)
        if found:
            raise CheckpointError(f"checkpoint.load_from: {directory} is not valid: {found[0]}")
        weights_only = cfg.checkpoint.load_weights_only
        return load(engine, directory, cfg, weights_only=weights_only)
    return None


def load(engine, directory: str | Path, cfg, weights_only: bool = False) -> dict:
    """Collective: restore a verified checkpoint directory into `engine` (and this rank's RNG)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    check_compatible(directory, manifest, cfg, engine.module, weights_only)
    if weights_only and engine.zero_optimization_partition_weights():
        _load_weights_into_zero3(engine, directory)
        return {"directory": str(directory)}
    try:
        path, _ = engine.load_checkpoint(
            str(directory.parent),
            tag=directory.name,
            load_optimizer_states=not weights_only,
            load_lr_scheduler_states=not weights_only,
            load_module_only=weights_only,
        )
    finally:
        _ours(engine).forget_loads()
    if path is None:
        raise CheckpointError(f"{directory}: DeepSpeed found no model files for this rank")
    if weights_only:
        if dist.get_rank() == 0:
            print(f"tessera: loaded the weights of {directory}", flush=True)
        return {"directory": str(directory)}
    rng_file = directory / "rng" / f"rank-{dist.get_rank():05d}.pt"
    if rng_file.is_file():
        restore_rng_at_first_forward(engine.module, safe_load(rng_file))
    elif dist.get_rank() == 0:
        warn(
            f"{directory} has no RNG state for rank {dist.get_rank()} (another world size): "
            f"RNG streams restart from the seed"
        )
    return {**json.loads((directory / STATE_FILE).read_text()), "directory": str(directory)}


def _load_weights_into_zero3(engine, directory: Path) -> None:
    """Weights only into a ZeRO-3 engine. DeepSpeed's own path for this goes through
    zero_to_fp32, which unpickles with weights_only=False and reads the `latest` of the source
    instead of the chosen step; so: the source's whole tensors (its ZeRO stage is at most 2),
    loaded safely, copied in while DeepSpeed gathers the partitions, then DeepSpeed refreshes its
    fp32 master partitions (as its load_checkpoint does after a module-only load)."""
    import deepspeed
    from megatron.core import parallel_state

    path = (
        directory / f"mp_rank_{parallel_state.get_tensor_model_parallel_rank():02d}_model_states.pt"
    )
    tensors = safe_load(path)["module"]
    params = dict(engine.module.named_parameters())
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: holds no tensor for {', '.join(missing[:5])}")
    gathered = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0)
    with gathered, torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])
    engine.optimizer._restore_from_bit16_weights()
    if dist.get_rank() == 0:
        print(f"tessera: loaded the weights of {directory}", flush=True)


def latest_tag(root: str | Path) -> str | None:
    """The tag `latest` names if committed, else the newest committed one (not verified)."""
    candidates, _ = _candidates(Path(root))
    return candidates[0].name if candidates else None


# ---------------------------------------------------------------------------------------------
# Listing (the `tessera checkpoint` command)


@dataclasses.dataclass
class CheckpointInfo:
    path: Path
    step: int | None
    num_bytes: int
    layout: dict | None
    valid: bool
    reason: str  # why not valid ("" when valid)
    manifest: dict | None = None


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def inspect(directory: str | Path, checksum: bool = True) -> CheckpointInfo:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    name = directory.name
    step = step_of(name.removesuffix(TMP_SUFFIX))
    manifest = None
    try:
        manifest = read_manifest(directory)
    except CheckpointError:
        pass
    found = problems(directory, checksum)
    if name.endswith(TMP_SUFFIX):
        found = ["uncommitted (a save that did not finish)"]
    return CheckpointInfo(
        path=directory,
        step=manifest["step"] if manifest else step,
        num_bytes=directory_bytes(directory),
        layout=manifest.get("layout") if manifest else None,
        valid=not found,
        reason=found[0] if found else "",
        manifest=manifest,
    )


def list_checkpoints(root: str | Path, checksum: bool = False) -> list[CheckpointInfo]:
    root = Path(root)
    entries = []
    for path in root.iterdir() if root.is_dir() else []:
        name = path.name.removesuffix(TMP_SUFFIX)
        if path.is_dir() and step_of(name) is not None:
            entries.append(inspect(path, checksum))
    return sorted(entries, key=lambda info: (info.step or 0, info.path.name))
