"""Data throughput: `tessera prepare` and the training loader against their natural ceilings.

All in one run, on the same files:

- loader tokens/s (0 and 2 workers, shuffle buffer on) against a raw sequential read of the
  same shard files (tarfile + numpy, no packing, no order), and against the tokens/s one
  training step of the demo model consumes (configs/demo.yaml's model, one process, tp=1);
- prepare throughput (MB of input text per second per worker) against the Hugging Face
  tokenizer's own `encode_batch` on the same texts, single-threaded (what a prepare worker
  runs), with 1 and 2 workers. With 1 worker prepare tokenizes in its own process, so the same
  ratio is also taken inside one run: the time spent in the tokenizer's encode_batch over the
  run's wall time (free of the machine's speed drifting between two measurements).

Targets: loader >= 50% of the raw read and >= 100x the demo model's consumption; prepare >=
80% of the tokenizer's speed. The input text is the Python standard library's source (as for
`make demo`), repeated up to --text-mb.

Run: .venv/bin/python bench/data_throughput.py [--text-mb 8] [--rounds 5] [--seq-len 2048]
"""

from __future__ import annotations

import os

# A prepare worker encodes on one thread; the baseline must too (set before tokenizers loads).
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import json
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

from common import machine, median

TARGETS = {"loader_vs_raw": 0.5, "loader_vs_demo_model": 100.0, "prepare_vs_tokenizer": 0.8}


def corpus(directory: Path, text_mb: float) -> list[Path]:
    """Standard-library sources copied into files of about 1 MB, up to text_mb in all."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(stdlib.rglob("*.py"))
    directory.mkdir(parents=True)
    files, chunk, size, total = [], [], 0, 0
    limit = int(text_mb * 2**20)
    while total < limit:
        for source in sources:
            try:
                text = source.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            chunk.append(json.dumps({"text": text}))
            size += len(text.encode())
            if size >= 2**20:
                path = directory / f"part-{len(files):04d}.jsonl"
                path.write_text("\n".join(chunk) + "\n")
                files.append(path)
                total += size
                chunk, size = [], 0
                if total >= limit:
                    break
    return files


def texts_of(files: list[Path]) -> list[str]:
    return [json.loads(line)["text"] for f in files for line in f.read_text().splitlines()]


def tokenizer_speed(tokenizer_path: Path, texts: list[str], batch_docs: int) -> float:
    """MB of text per second of encode_batch, in the batches prepare sends to a worker."""
    from tessera.data.tokenizer import HFTokenizer

    tok = HFTokenizer.from_file(tokenizer_path)
    num_bytes = sum(len(t.encode()) for t in texts)
    started = time.perf_counter()
    for start in range(0, len(texts), batch_docs):
        tok.encode_batch(texts[start : start + batch_docs])
    return num_bytes / 2**20 / (time.perf_counter() - started)


def prepare_speed(
    files: list[Path], text_bytes: int, tokenizer_path: Path, out: Path, workers: int
) -> tuple[float, float]:
    """MB of text (UTF-8, as the tokenizer baseline counts it, not the JSON) per second, and the
    share of the run spent inside the tokenizer's encode_batch (measured with 1 worker, which
    tokenizes in this process; NaN otherwise)."""
    from tessera.data.prepare import prepare
    from tessera.data.tokenizer import HFTokenizer

    encode = HFTokenizer.encode_batch
    encode_s = 0.0

    def timed_encode(self, texts):
        nonlocal encode_s
        started = time.perf_counter()
        ids = encode(self, texts)
        encode_s += time.perf_counter() - started
        return ids

    HFTokenizer.encode_batch = timed_encode
    try:
        started = time.perf_counter()
        prepare(
            [str(f) for f in files],
            out,
            tokenizer=tokenizer_path,
            shard_bytes=2**18,
            workers=workers,
            log=lambda _: None,
        )
        seconds = time.perf_counter() - started
    finally:
        HFTokenizer.encode_batch = encode
    share = encode_s / seconds if workers == 1 else float("nan")
    return text_bytes / 2**20 / seconds, share


# Passes over the data per measurement: one pass of the 8 MB corpus takes a tenth of a second.
PASSES = 4


def paired_ratio(values: list[float], baselines: list[float]) -> float:
    """The median over rounds of value / baseline, each pair measured back to back."""
    return median([v / b for v, b in zip(values, baselines, strict=True)])


def raw_read_speed(data: Path) -> tuple[float, int]:
    """Tokens/s of reading every shard in order, PASSES times: tarfile members to numpy arrays.

    Also returns the tokens in one pass."""
    import numpy as np

    from tessera.data.format import read_manifest

    manifest = read_manifest(data)
    started = time.perf_counter()
    num_tokens = 0
    for _ in range(PASSES):
        for shard in manifest.shards:
            with tarfile.open(data / shard.path, mode="r|") as tar:
                for member in tar:
                    if member.name.endswith(".tokens"):
                        num_tokens += len(np.frombuffer(tar.extractfile(member).read(), "<u2"))
    return num_tokens / (time.perf_counter() - started), num_tokens // PASSES


def loader_speed(
    data: Path, seq_len: int, global_batch: int, workers: int, num_tokens: int
) -> float:
    """Tokens/s out of TrainLoader (int64 micro-batches) over about PASSES epochs of the data."""
    from tessera.data.loader import TrainLoader

    loader = TrainLoader(
        str(data),
        seq_len=seq_len,
        micro_batch_size=global_batch // 8,
        global_batch_size=global_batch,
        num_streams=8,
        num_workers=workers,
        seed=1,
        shuffle=True,
        shuffle_buffer=32,
    )
    steps = max(4, PASSES * num_tokens // (global_batch * (seq_len + 1)))
    batches = iter(loader)
    next(batches)  # worker start-up is not throughput
    started = time.perf_counter()
    got = 0
    for _ in range(steps * loader.micro_batches_per_step - 1):
        input_ids, _ = next(batches)
        got += input_ids.numel()
    return got / (time.perf_counter() - started)


def demo_model_speed(data: Path, run_dir: Path, steps: int) -> float:
    """Tokens/s the demo model trains at (one process, tp=1), median step after warm-up."""
    from tessera.launch.env import quiet_dependencies
    from tessera.trainer.config import load_config
    from tessera.trainer.train import train

    quiet_dependencies()
    cfg = load_config(
        Path(__file__).parent.parent / "configs" / "demo.yaml",
        [
            f"run.dir={run_dir}",
            f"data.shards={data}",
            "parallel.tp=1",
            "parallel.zero_stage=0",
            f"train.steps={steps}",
            "checkpoint.interval=0",
            "log.interval=1",
            "data.num_workers=0",
            "launch.nproc_per_node=1",
        ],
    )
    train(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    warm_up = min(2, len(rows) - 1)  # the first steps are slower; keep at least one
    return median([r["tokens_per_s"] for r in rows[warm_up:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-mb", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--demo-steps", type=int, default=8)
    args = parser.parse_args()
    from tessera.data import prepare as prepare_module
    from tessera.data.tokenizer import train_bpe

    results: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = corpus(root / "text", args.text_mb)
        texts = texts_of(files)
        text_bytes = sum(len(t.encode()) for t in texts)
        train_bpe(iter(texts[:400]), 4096).save(root)  # the demo's vocabulary size
        tokenizer = root / "tokenizer.json"
        results["text_mb"] = round(sum(f.stat().st_size for f in files) / 2**20, 1)

        import webdataset  # noqa: F401  (imports torch: a one-off cost, not throughput)

        # Each pair measured side by side, alternating, `rounds` times. A ratio is the median of
        # the rounds' ratios: both sides of a round ran within seconds of each other, so a drift
        # of the machine's speed over the run (20% on a shared VM) cancels out.
        toks, prep1s, prep2s, shares = [], [], [], []
        for r in range(args.rounds):
            toks.append(tokenizer_speed(tokenizer, texts, prepare_module.BATCH_MAX_DOCS))
            prep1, share = prepare_speed(files, text_bytes, tokenizer, root / f"prepared-{r}", 1)
            prep1s.append(prep1)
            shares.append(share)
            prep2s.append(prepare_speed(files, text_bytes, tokenizer, root / f"prepared-2-{r}",
                                        2)[0])
        prep1_ratio = paired_ratio(prep1s, toks)
        tokenizer_share = median(shares)
        prep2_ratio = paired_ratio([p / 2 for p in prep2s], toks)
        results["prepare"] = {
            "tokenizer_encode_batch_mb_s": round(median(toks), 2),
            "prepare_1_worker_mb_s": round(median(prep1s), 2),
            "prepare_2_workers_mb_s_per_worker": round(median(prep2s) / 2, 2),
            "ratio_1_worker": round(prep1_ratio, 3),
            "ratio_2_workers_per_worker": round(prep2_ratio, 3),
            "ratio_1_worker_in_one_run": round(tokenizer_share, 3),
        }

        data = root / "prepared-0"
        raws, load0s, load2s = [], [], []
        for _ in range(args.rounds):
            raw, num_tokens = raw_read_speed(data)
            raws.append(raw)
            load0s.append(loader_speed(data, args.seq_len, args.global_batch, 0, num_tokens))
            load2s.append(loader_speed(data, args.seq_len, args.global_batch, 2, num_tokens))
        raw, load0 = median(raws), median(load0s)
        load0_ratio, load2_ratio = paired_ratio(load0s, raws), paired_ratio(load2s, raws)
        demo = demo_model_speed(data, root / "demo-run", args.demo_steps)
        results["loader"] = {
            "tokens": num_tokens,
            "seq_len": args.seq_len,
            "global_batch": args.global_batch,
            "raw_read_tokens_s": round(raw),
            "loader_0_workers_tokens_s": round(load0),
            "loader_2_workers_tokens_s": round(median(load2s)),
            "demo_model_tokens_s": round(demo),
            "ratio_0_workers_vs_raw": round(load0_ratio, 3),
            "ratio_2_workers_vs_raw": round(load2_ratio, 3),
            "ratio_0_workers_vs_demo_model": round(load0 / demo, 1),
        }
    print(json.dumps(results, indent=2))
    checks = [
        ("loader (0 workers) / raw read", load0_ratio, TARGETS["loader_vs_raw"]),
        ("loader (2 workers) / raw read", load2_ratio, TARGETS["loader_vs_raw"]),
        ("loader (0 workers) / demo model", load0 / demo, TARGETS["loader_vs_demo_model"]),
        ("prepare (1 worker) / tokenizer", prep1_ratio, TARGETS["prepare_vs_tokenizer"]),
        ("prepare (2 workers, per worker) / tokenizer", prep2_ratio,
         TARGETS["prepare_vs_tokenizer"]),
        # The same ratio as the 1-worker line, from one run: immune to the machine's drift.
        ("prepare (1 worker): time in tokenizer / total", tokenizer_share,
         TARGETS["prepare_vs_tokenizer"]),
    ]
    for name, ratio, target in checks:
        print(
            f"{name:<45} {ratio:10.2f}  target >= {target:<6} "
            f"{'ok' if ratio >= target else 'BELOW TARGET'}"
        )


if __name__ == "__main__":
    main()
