"""Save and commit: every rank writes into `step-N.tmp/`; rank 0 writes the manifest last,
renames the directory and replaces `latest`. Retention deletes a manifest before its files."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from tessera import __version__
from tessera.data.tokenizer import HF_TOKENIZER_FILE
from tessera.parallel.engine import Engine
from tessera.trainer.checkpoint.engine import TesseraCheckpointEngine, checkpoint_engine
from tessera.trainer.checkpoint.files import (
    FileRecord,
    file_sha256,
    fsync_dir,
    replace_text_atomically,
    write_text_file,
)
from tessera.trainer.checkpoint.format import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    LATEST_FILE,
    MANIFEST_FILE,
    STATE_FILE,
    TMP_SUFFIX,
    TOKENIZER_DIR,
    TOKENIZER_INFO,
    CarriedTokenizer,
    CheckpointError,
    committed_steps,
    fault_point,
    rank,
    read_latest,
    step_of,
    tag_for,
    warn,
)
from tessera.trainer.checkpoint.rng import rng_state
from tessera.trainer.config import Config, to_yaml


def _manifest_base(step: int, cfg: Config, engine: Engine) -> dict:
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


def canonical_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """Collective: full (layout-independent) shapes of the model's tensors, over all stages."""
    local = {}
    for layer in module.modules():
        if hasattr(layer, "canonical_parts"):
            for parts in layer.canonical_parts().values():
                local.update({part.name: list(part.shape) for part in parts})
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return {name: shape for shapes in everyone for name, shape in sorted(shapes.items())}


def save(engine: Engine, root: str | Path, step: int, state: dict, cfg: Config) -> Path:
    """Collective: save the engine and `state` as `root/step-N`; returns that directory.

    Synchronous: returns once committed. With `checkpoint.async`: returns after the host copy;
    the files are written and committed in the background (`wait` blocks for it). A save first
    waits for the one before it.
    """
    ours = checkpoint_engine(engine)
    ours.wait()
    root = Path(root)
    this_rank = rank()
    tag = tag_for(step)
    tmp, final = root / (tag + TMP_SUFFIX), root / tag
    if this_rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_uncommitted(root)
    dist.barrier()
    base = _manifest_base(step, cfg, engine)
    ours.begin(tmp)
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={}, save_latest=False)
    ours.save_object(rng_state(), tmp / "rng" / f"rank-{this_rank:05d}.pt")
    if this_rank == 0:
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
        fsync_dir(directory)
    fault_point()
    manifest = {
        **base,
        "files": {
            p: {"bytes": r.num_bytes, "sha256": r.sha256} for p, r in sorted(by_path.items())
        },
    }
    write_text_file(json.dumps(manifest, indent=1), tmp / MANIFEST_FILE)
    fsync_dir(tmp)
    fault_point()
    if final.is_symlink():
        raise CheckpointError(f"{final} is a link, not a checkpoint of this run: cannot save "
                              f"step {base['step']} over it; move the link away")
    if final.exists():  # the same step saved again (a rerun after a crash): replace it
        delete_checkpoint(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    fault_point()
    replace_text_atomically(final.parent / LATEST_FILE, final.name + "\n")


def wait(engine: Engine) -> None:
    """Block until a pending asynchronous save is committed (call before the job ends)."""
    checkpoint_engine(engine).wait()


def delete_checkpoint(directory: Path) -> None:
    """Delete a checkpoint of ours: never through a link (its target is not ours to delete)."""
    if directory.is_symlink():
        warn(f"{directory} is a link; retention leaves it (and what it points to) alone")
        return
    manifest = directory / MANIFEST_FILE
    if manifest.exists():
        manifest.unlink()  # no longer a valid checkpoint before any of its files goes
        fsync_dir(directory)
    shutil.rmtree(directory)


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
        fault_point()
        delete_checkpoint(root / tag_for(step))
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
