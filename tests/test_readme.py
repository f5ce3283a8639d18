"""The README, executed: every command of its `sh` and `bash` blocks runs, in order, in one work
directory that holds small data made here, as a user would paste it.

The commands run as written, through bash, with three kinds of change, each listed in
SUBSTITUTIONS (a substitution the README no longer needs fails the test, so the list follows it):
sizes (steps, sequence length) scaled to a test, the one submit without --dry-run given it, and
names of runs the README only imagines (runs/big) pointed at runs it made. configs/demo.yaml here
is a tiny model on the work directory's data; every other config is the repository's own.
`make test` is this suite and `make demo` is the quick start's `tessera train` on the demo config;
both are left out. Nothing in the README needs a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from llama3_tiny import BOS, EOS, llama3_like_tokenizer, save_llama32_like
from textdata import make_text_files
from tokenizers import Tokenizer

from tessera.data.format import read_manifest

ROOT = Path(__file__).resolve().parents[1]

TINY_DEMO = """\
run: {dir: runs/demo, seed: 1234}
model: {vocab_size: null, hidden_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 2,
        ffn_hidden_size: 176, seq_len: 32}
parallel: {tp: 2, pp: 1, zero_stage: 1}
train: {steps: 4, global_batch_size: 8, micro_batch_size: 2, lr: 3.0e-3, warmup_steps: 1,
        precision: fp32}
data: {shards: shards/corpus, num_workers: 1}
checkpoint: {interval: 2, keep_last: 20}
log: {interval: 1}
launch: {nproc_per_node: 2}
"""

# README text -> what the test runs instead, and why
SUBSTITUTIONS = {
    "train.steps=1000": "train.steps=4",                       # sizes
    "train.decay_steps=100 train.steps=600": "train.decay_steps=2 train.steps=8",
    "checkpoint.keep_every=100": "checkpoint.keep_every=2",
    "step-00000200 train.steps=250 train.decay_steps=50":
        "step-00000004 train.steps=6 train.decay_steps=2",
    "step-00000300": "step-00000004",
    "model.seq_len=4096": "model.seq_len=32",
    "--workers 16": "--workers 2",
    "--workers 8": "--workers 2",
    "slurm.partition=gpu": "slurm.partition=gpu --dry-run",    # Slurm only through --dry-run
    "run.dir=runs/corpus": "run.dir=runs/demo",  # the run `make demo` leaves, later commands use
    "runs/demo-lr1e-3": "runs/wsd",                             # runs the README imagines
    "runs/big/checkpoints/step-00020000": "runs/demo/checkpoints/step-00000004",
    "runs/big": "runs/demo",
    "status runs/llama-1b": "status runs/demo",
}


# a user's shell holds no rendezvous (an in-process test of this session may have left one)
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT")


@dataclass(frozen=True)
class Command:
    line: int  # where it starts in README.md
    text: str


def readme_commands(readme: str) -> list[Command]:
    """Every command of the README's sh/bash blocks, continuation lines joined."""
    commands, in_block, pending, start = [], False, "", 0
    for number, line in enumerate(readme.splitlines(), start=1):
        if line.startswith("```"):
            in_block = line.strip() in ("```sh", "```bash")
            continue
        if not in_block or (not pending and (not line.strip() or line.lstrip().startswith("#"))):
            continue
        start = start if pending else number
        pending += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            commands.append(Command(start, pending.strip()))
            pending = ""
    return commands


def substituted(text: str, used: set[str]) -> str:
    for old, new in SUBSTITUTIONS.items():
        if old in text:
            text = text.replace(old, new)
            used.add(old)
    return text


def hugging_face_model(work: Path) -> None:
    """The README's Hugging Face directory: a tiny Llama 3.2 with Llama 3's tokenizer."""
    directory = work / "hf" / "Llama-3.2-1B"
    directory.mkdir(parents=True)
    tokenizer = llama3_like_tokenizer(directory)
    save_llama32_like(directory, tokenizer.get_vocab_size(with_added_tokens=True))


def work_directory(work: Path) -> None:
    make_text_files(work / "corpus", num_files=6, sentences_per_file=80)
    make_text_files(work / "held-out", num_files=2, sentences_per_file=20)
    shutil.copytree(ROOT / "configs", work / "configs")
    (work / "configs" / "demo.yaml").write_text(TINY_DEMO)
    hugging_face_model(work)


def run(command: Command, text: str, work: Path) -> str:
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_ENV}
    env.update(OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    done = subprocess.run(["bash", "-c", text], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (f"README.md line {command.line}: {text}\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def test_the_extractor_joins_continuation_lines_and_skips_comments():
    readme = ("```sh\n# a comment\ntessera a \\\n    b=1\n\n```\n"
              "```yaml\nx: 1\n```\n```bash\nc\n```\n")
    assert readme_commands(readme) == [Command(3, "tessera a b=1"), Command(11, "c")]


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    commands = readme_commands((ROOT / "README.md").read_text())
    assert len(commands) > 20
    work_directory(tmp_path)
    used: set[str] = set()
    outputs = {}
    for command in commands:
        if command.text.startswith("make "):
            continue
        text = substituted(command.text, used)
        start = time.monotonic()
        outputs[command.text] = run(command, text, tmp_path)
        print(f"{time.monotonic() - start:5.1f} s  README.md:{command.line}", flush=True)
    assert used == set(SUBSTITUTIONS), f"no longer in the README: {set(SUBSTITUTIONS) - used}"

    # what the README says the commands do
    dry_run = next(out for text, out in outputs.items() if text.startswith("tessera submit"))
    assert "#SBATCH" in dry_run and "warning" in dry_run  # the data lives on the cluster
    assert (tmp_path / "report.png").stat().st_size > 0
    assert (tmp_path / "hf/demo/config.json").is_file()
    cooldown = [json.loads(row) for row in (tmp_path / "runs/cooldown-200/metrics.jsonl")
                .read_text().splitlines()]
    assert [row["step"] for row in cooldown if "loss" in row] == [5, 6]
    check_continued_pretraining(tmp_path)


def check_continued_pretraining(work: Path) -> None:
    """"Continue pretraining": prepare framed each document as Llama 3 was trained (BOS, text,
    EOS); the export is the same architecture with moved weights, and transformers runs it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = work / "hf" / "Llama-3.2-1B"
    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    manifest = read_manifest(work / "shards" / "llama")
    assert manifest.tokenizer.vocab_size == tokenizer.get_vocab_size(with_added_tokens=True)
    assert manifest.tokenizer.eos_id == tokenizer.token_to_id(EOS)
    with tarfile.open(work / "shards" / "llama" / manifest.shards[0].path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".tokens"))
        record = list(np.frombuffer(tar.extractfile(member).read(), dtype=manifest.dtype))
    framed = [[tokenizer.token_to_id(BOS), *tokenizer.encode(path.read_text(),
                                                              add_special_tokens=False).ids,
               tokenizer.token_to_id(EOS)] for path in sorted((work / "corpus").iterdir())]
    assert any(record[: len(ids)] == ids[: len(record)] for ids in framed)

    exported = json.loads((work / "hf/continued/config.json").read_text())
    assert exported["architectures"] == ["LlamaForCausalLM"]
    assert exported["rope_parameters"]["rope_type"] == "llama3"
    original = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(work / "hf/continued").eval()
    embed = "model.embed_tokens.weight"
    assert not torch.equal(original.state_dict()[embed], model.state_dict()[embed])
    hf_tokenizer = AutoTokenizer.from_pretrained(work / "hf/continued")
    assert hf_tokenizer.eos_token == EOS and hf_tokenizer.bos_token == BOS
    ids = hf_tokenizer("the quick brown", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.token_to_id(BOS)
    out = model.generate(ids, max_new_tokens=8, do_sample=False,
                         pad_token_id=hf_tokenizer.eos_token_id)
    assert out.shape[1] > ids.shape[1]
