"""DeepSpeed's side: our checkpoint engine, which DeepSpeed calls for each file it saves or loads.

Synchronous: `save` writes each file at once from the live tensors. Asynchronous
(`checkpoint.async`): it copies the state to host memory with torch.distributed.checkpoint's
stager and writes on one background thread. Either way each file's size and sha256 are recorded
as it is written, for the manifest.
"""

from __future__ import annotations

import concurrent.futures
import copy
import datetime
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from tessera.parallel.engine import Engine
from tessera.trainer.checkpoint.files import (
    FileRecord,
    compact,
    holds_device_tensors,
    host_stager,
    safe_load,
    write_text_file,
    write_torch_file,
)
from tessera.trainer.checkpoint.format import CarriedTokenizer, fault_point

if TYPE_CHECKING:  # the config module imports nothing of checkpoints; only its type is named
    from tessera.trainer.config import Config


class TesseraCheckpointEngine(CheckpointEngine):
    """Plugged into `engine.checkpoint_engine`; DeepSpeed calls `save(state, path)` per file.

    Synchronous: `save` writes the file at once from the live tensors. Asynchronous: `save` copies
    the state to host memory (torch's checkpoint stager; the only part a training step waits for)
    and queues the write on one writer thread. Files are recorded relative to the directory
    being saved, for the manifest.
    """

    def __init__(self, async_write: bool, commit_group: dist.ProcessGroup) -> None:
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
    def create(self, info: Any) -> None:
        pass

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        self.save_object(state_dict, Path(path))

    def load(self, path: str, map_location: Any = None) -> Any:
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

    def commit(self, info: Any) -> bool:
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

    def _submit(self, write: Callable[[], tuple[int, str]], path: Path) -> None:
        assert self._directory is not None, "save outside begin()"
        relative = path.relative_to(self._directory).as_posix()

        def job() -> FileRecord:
            num_bytes, sha256 = write()
            fault_point()
            return FileRecord(relative, num_bytes, sha256)

        self._records.append(self._executor.submit(job) if self._executor else job())

    def finish(self, commit: Callable[[list[FileRecord]], None]) -> None:
        """Run `commit(records)` after this save's writes: now, or queued behind them."""
        records = self._records
        self._records, self._directory = [], None

        def job() -> None:
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


def install(engine: Engine, cfg: Config, tokenizer: CarriedTokenizer | None = None
            ) -> TesseraCheckpointEngine:
    """Collective: give `engine` our checkpoint engine (every rank, once, after building it);
    every checkpoint it saves carries `tokenizer` (None: a run that has none, from-hf without
    one)."""
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=30))
    ours = TesseraCheckpointEngine(cfg.checkpoint.async_save, group)
    ours.tokenizer = tokenizer
    engine.checkpoint_engine = ours
    # DeepSpeed copies its zero_to_fp32.py and zero_to_torch.py beside every ZeRO checkpoint:
    # checkpoints/ holds only what Tessera reads (`tessera convert` is the way out)
    engine._copy_recovery_script = lambda save_path: None
    return ours


def checkpoint_engine(engine: Engine) -> TesseraCheckpointEngine:
    ours = engine.checkpoint_engine
    assert isinstance(ours, TesseraCheckpointEngine), "checkpoint.install(engine, cfg) not called"
    return ours
