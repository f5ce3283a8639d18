"""Peak memory of `tessera convert to-hf`, side by side for two shard sizes.

Builds a checkpoint of a random Llama (imported with `tessera convert from-hf`): a mid-size one
at tp=2 by default, or with --llama-3.2-1b one of Llama-3.2-1B's shape (hidden 2048, 16
layers, a 128256-token tied embedding, llama3 RoPE; imported in one process),
then exports it in fresh processes with a small and a large --max-shard-size, sampling the
process's anonymous resident memory (RssAnon: what the export itself holds; memory-mapped
checkpoint pages are file-backed and reclaimable, so not counted). Prints each peak above the
process's baseline against the model's size, the shard size and the largest tensor.

    python bench/convert_memory.py [--hidden 1024 --layers 8 | --llama-3.2-1b]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MB = 1e6


def anon_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def measure(ckpt: str, out: str, max_shard: str, tokenizer: str) -> None:
    """In a fresh process: peak anonymous memory of to_hf above the baseline after imports."""
    from tessera.launch.env import quiet_dependencies

    quiet_dependencies()
    import transformers  # noqa: F401 - imported before the baseline, as to_hf imports it

    from tessera.trainer.convert import hf, to_hf

    baseline, peak, done = anon_rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon_rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    to_hf(ckpt, out, max_shard_bytes=hf.parse_bytes(max_shard), tokenizer=tokenizer, verify=False)
    done.set()
    sampler.join()
    print(json.dumps({"peak_above_baseline": peak[0] - baseline}))


LLAMA_32_1B = dict(  # its config.json, but for max_position_embeddings (the import's seq_len)
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
    max_position_embeddings=64,
    rope_parameters={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                     "rope_theta": 500000.0},
)


def mid_size_llama(hidden: int, layers: int) -> dict:
    return dict(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                num_hidden_layers=layers, num_attention_heads=hidden // 64,
                num_key_value_heads=hidden // 256, max_position_embeddings=64)


def random_llama(directory: Path, shape: dict) -> tuple[int, int]:
    """A random Llama saved with save_pretrained; returns (fp32 bytes, largest tensor bytes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**shape))
    model.save_pretrained(directory)
    sizes = [p.numel() * 4 for p in model.parameters()]
    return sum(sizes), max(sizes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--llama-3.2-1b", dest="llama_32_1b", action="store_true")
    parser.add_argument("--measure", nargs=4, metavar=("CKPT", "OUT", "MAX_SHARD", "TOKENIZER"))
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shape = LLAMA_32_1B if args.llama_32_1b else mid_size_llama(args.hidden, args.layers)
        tp = 1 if args.llama_32_1b else 2
        total, largest = random_llama(root / "hf", shape)
        from tessera.trainer.convert import hf

        (root / "tokenizer.json").write_text(hf.byte_tokenizer_json())
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tessera",
                "convert",
                "from-hf",
                str(root / "hf"),
                str(root / "ckpt"),
                f"parallel.tp={tp}",
            ],
            check=True,
            capture_output=True,
        )
        print(
            f"model {total / MB:.0f} MB fp32, largest tensor {largest / MB:.0f} MB; "
            f"checkpoint at tp={tp}"
        )
        for shard in ("50MB", "5GB"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--measure",
                    str(root / "ckpt"),
                    str(root / f"out-{shard}"),
                    shard,
                    str(root / "tokenizer.json"),
                ],
                check=False,
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                raise SystemExit(out.stderr[-2000:])
            peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_above_baseline"]
            shard_bytes = min(
                float(shard.removesuffix("MB").removesuffix("GB"))
                * (1e6 if shard.endswith("MB") else 1e9),
                total,
            )
            print(
                f"--max-shard-size {shard:>5}: peak {peak / MB:7.0f} MB above baseline = "
                f"{peak / total:.2f} x model, "
                f"{peak / (shard_bytes + 2 * largest):.2f} x (shard + 2 x largest tensor)"
            )


if __name__ == "__main__":
    main()
