"""Checkpoint I/O against the disk's own speed, and asynchronous against synchronous saves.

One process builds a Llama with its DeepSpeed engine (fp32, AdamW state after one step), then
repeats, side by side in one run, on the same disk and the same number of bytes:

- raw write: those bytes written sequentially in 64 MiB chunks, then fsync;
- save: `checkpoint.save` (DeepSpeed's files through our engine: torch.save, sha256, fsync,
  manifest, atomic rename and `latest`);
- raw read and load: the checkpoint's files evicted from the page cache (posix_fadvise
  DONTNEED), then read sequentially / loaded by `checkpoint.resume` (sha256 verification of
  every file, then DeepSpeed's load through torch.load(weights_only=True)); also the
  verification alone, and the load with checkpoint.verify=false;
- async: `checkpoint.save` with `checkpoint.async=true`: the time the training loop is blocked
  (the call) against the synchronous save's time; then the time until it is committed.

Also shown: DeepSpeed's own save (its default engine: no fsync, no checksums, no manifest).
Targets (issue 5): save and load at least 50% of raw; async blocks at most 25% of sync.

Run: .venv/bin/python bench/checkpoint_io.py [--hidden 768 --layers 6 --repeats 3 --dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import bench_config, machine, median

CHUNK_BYTES = 64 << 20


def raw_write(path: Path, num_bytes: int, chunk: bytes) -> float:
    started = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < num_bytes:
            n = min(len(chunk), num_bytes - written)
            f.write(chunk[:n] if n < len(chunk) else chunk)
            written += n
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - started


def evict(paths: list[Path]) -> None:
    """Drop the files' clean pages from the page cache so that the next read hits the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(paths: list[Path]) -> float:
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(CHUNK_BYTES):
                pass
    return time.perf_counter() - started


def files_of(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def build(hidden: int, layers: int, root: Path):
    """The engine after one optimizer step (so that AdamW holds its moments), with our
    synchronous and asynchronous checkpoint engines to swap in."""
    import torch

    from tessera.parallel.topology import init_distributed
    from tessera.trainer import checkpoint
    from tessera.trainer.train import build_training_engine

    cfg = bench_config(
        {
            "run.dir": str(root),
            "model.vocab_size": 8192,
            "model.hidden_size": hidden,
            "model.num_layers": layers,
            "model.num_heads": 8,
            "model.num_kv_heads": 8,
            "model.ffn_hidden_size": 3 * hidden,
            "model.seq_len": 64,
            "train.global_batch_size": 2,
            "train.micro_batch_size": 2,
        }
    )
    topo = init_distributed(tp=1, pp=1)
    engine, _, _ = build_training_engine(cfg, topo)
    async_cfg = dataclasses.replace(
        cfg, checkpoint=dataclasses.replace(cfg.checkpoint, async_save=True)
    )
    engines = {
        "async": checkpoint.install(engine, async_cfg),
        "sync": checkpoint.install(engine, cfg),
    }
    tokens = torch.randint(0, 8192, (2, 65), generator=torch.Generator().manual_seed(0))
    loss = engine(tokens[:, :-1], tokens[:, 1:])
    engine.backward(loss)
    engine.step()
    return engine, cfg, engines


def measure(hidden: int, layers: int, repeats: int, base: Path) -> dict:
    import torch.distributed as dist

    from tessera.trainer import checkpoint

    root = base / "checkpoints"
    engine, cfg, engines = build(hidden, layers, base)
    no_verify = dataclasses.replace(cfg.checkpoint, verify=False)
    unverified = dataclasses.replace(cfg, checkpoint=no_verify)
    state = {"train": {"step": 1}}
    rows = {
        k: []
        for k in (
            "raw_write_s",
            "save_s",
            "raw_read_s",
            "load_s",
            "verify_s",
            "load_unverified_s",
            "ds_save_s",
            "async_block_s",
            "async_commit_s",
        )
    }
    num_bytes = 0
    chunk = os.urandom(CHUNK_BYTES)
    for repeat in range(repeats):
        step = 1 + 10 * repeat
        dist.barrier()
        started = time.perf_counter()
        directory = checkpoint.save(engine, root, step, state, cfg)
        rows["save_s"].append(time.perf_counter() - started)
        num_bytes = sum(p.stat().st_size for p in files_of(directory))
        rows["raw_write_s"].append(raw_write(base / "raw.bin", num_bytes, chunk))
        (base / "raw.bin").unlink()

        evict(files_of(directory))
        rows["raw_read_s"].append(raw_read(files_of(directory)))
        evict(files_of(directory))
        started = time.perf_counter()
        checkpoint.resume(engine, root, cfg)
        rows["load_s"].append(time.perf_counter() - started)
        evict(files_of(directory))
        started = time.perf_counter()
        assert checkpoint.problems(directory) == []
        rows["verify_s"].append(time.perf_counter() - started)
        evict(files_of(directory))
        started = time.perf_counter()
        checkpoint.resume(engine, root, unverified)
        rows["load_unverified_s"].append(time.perf_counter() - started)

        stock = base / "deepspeed-stock"
        engine.checkpoint_engine = _stock_engine(engine)
        started = time.perf_counter()
        engine.save_checkpoint(str(stock), tag="t", save_latest=False)
        rows["ds_save_s"].append(time.perf_counter() - started)
        shutil.rmtree(stock)

        engine.checkpoint_engine = engines["async"]
        started = time.perf_counter()
        checkpoint.save(engine, root, step + 1, state, cfg)
        rows["async_block_s"].append(time.perf_counter() - started)
        checkpoint.wait(engine)
        rows["async_commit_s"].append(time.perf_counter() - started)
        engine.checkpoint_engine = engines["sync"]
    return {"bytes": num_bytes, **{k: median(v) for k, v in rows.items()}}


def _stock_engine(engine):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    return TorchCheckpointEngine(engine._config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    from tessera.launch.env import quiet_dependencies

    quiet_dependencies()
    base = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    try:
        r = measure(args.hidden, args.layers, args.repeats, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    gb = r["bytes"] / 1e9
    ratios = {
        "save / raw write": r["raw_write_s"] / r["save_s"],
        "load / raw read": r["raw_read_s"] / r["load_s"],
        "async blocking / sync save": r["async_block_s"] / r["save_s"],
        "DeepSpeed stock save / raw write": r["raw_write_s"] / r["ds_save_s"],
    }
    print(
        f"checkpoint of {gb:.3f} GB (hidden {args.hidden}, {args.layers} layers, fp32, AdamW); "
        f"median of {args.repeats}, same disk ({base.parent})"
    )
    save_pct, load_pct = ratios["save / raw write"], ratios["load / raw read"]
    print(f"  raw write + fsync   {gb / r['raw_write_s']:6.3f} GB/s")
    print(f"  save (sync)         {gb / r['save_s']:6.3f} GB/s   {save_pct:.0%} of raw  (>= 50%)")
    print(
        f"  DeepSpeed's own     {gb / r['ds_save_s']:6.3f} GB/s   (no fsync, checksums, manifest)"
    )
    print(f"  raw read (uncached) {gb / r['raw_read_s']:6.3f} GB/s")
    print(f"  load (verify+load)  {gb / r['load_s']:6.3f} GB/s   {load_pct:.0%} of raw  (>= 50%)")
    print(
        f"    of which sha256 verification (uncached) {r['verify_s']:.3f} s of {r['load_s']:.3f} s"
    )
    unverified_gbps, unverified_pct = (
        gb / r["load_unverified_s"],
        r["raw_read_s"] / r["load_unverified_s"],
    )
    print(f"  load, verify=false  {unverified_gbps:6.3f} GB/s   {unverified_pct:.0%} of raw")
    print(
        f"  async: blocks {r['async_block_s']:.3f} s against {r['save_s']:.3f} s synchronous = "
        f"{ratios['async blocking / sync save']:.0%}  (target <= 25%); committed after "
        f"{r['async_commit_s']:.3f} s"
    )
    print(
        json.dumps(
            {
                "machine": machine(),
                "result": r,
                "ratios": {k: round(v, 3) for k, v in ratios.items()},
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
