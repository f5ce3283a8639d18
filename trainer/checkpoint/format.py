"""A checkpoint directory's names: its files, step tags, the manifest format, `latest`, and
the error a user sees for any checkpoint problem."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from pathlib import Path

import torch.distributed as dist

from tessera.data.format import TokenizerInfo, is_count
from tessera.data.tokenizer import CARRIED_DIR, CARRIED_INFO_FILE, CHECKPOINT_FORMAT
from tessera.trainer.architecture import ARCHITECTURE_FIELDS  # noqa: F401  (named with the format)

# A tokenizer as a checkpoint carries it: its description, and its tokenizer.json text (hf kind).
CarriedTokenizer = tuple[TokenizerInfo, str | None]
MANIFEST_FILE = "manifest.json"
STATE_FILE = "tessera_state.json"
CONFIG_FILE = "config.yaml"
# the folder data.tokenizer.find_tokenizer reads (tessera prepare --tokenizer CHECKPOINT)
TOKENIZER_DIR = CARRIED_DIR
TOKENIZER_INFO = f"{TOKENIZER_DIR}/{CARRIED_INFO_FILE}"
LATEST_FILE = "latest"
FORMAT = CHECKPOINT_FORMAT  # defined in data.tokenizer: find_tokenizer recognizes a checkpoint
FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"




# Test hook only: seconds to sleep at each step of a save, so that a test can kill a job inside it.
DELAY_ENV = "TESSERA_TEST_CHECKPOINT_DELAY_S"
_TAG_RE = re.compile(r"^step-(\d+)$")


SHA256_RE = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, corrupt, another model); the message names it."""


@dataclasses.dataclass
class TrainState:
    """What the loop carries between steps and what a checkpoint restores."""

    step: int = 0  # optimizer steps taken
    consumed_samples: int = 0  # sequences consumed over all data-parallel ranks
    num_streams: int = 0
    loss: float | None = None  # of the last step (checkpoint inspect shows it)


def train_state_problem(saved: object) -> str | None:
    """What is wrong with a state file's "train" object, read back into a TrainState: unknown
    fields, counts that are not counts, a loss that is not a number."""
    if not isinstance(saved, dict):
        return "'train' is not an object"
    fields = {f.name for f in dataclasses.fields(TrainState)}
    unknown = sorted(set(saved) - fields)
    if unknown:
        return f"'train' has an unknown field {unknown[0]!r}"
    for name in fields - {"loss"}:
        if not is_count(saved.get(name, 0)):
            return f"train.{name} is not a count: {saved.get(name)!r}"
    loss = saved.get("loss")
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
        return f"train.loss is not a number: {loss!r}"
    return None




def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def step_of(tag: str) -> int | None:
    match = _TAG_RE.match(tag)
    return int(match.group(1)) if match else None


def warn(message: str) -> None:
    print(f"tessera: warning: {message}", file=sys.stderr, flush=True)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def fault_point() -> None:
    delay_s = float(os.environ.get(DELAY_ENV, "0") or 0)
    if delay_s > 0:
        time.sleep(delay_s)


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


def read_latest(root: Path) -> str | None:
    try:
        tag = (Path(root) / LATEST_FILE).read_text().strip()
    except OSError:
        return None
    return tag if step_of(tag) is not None else None
