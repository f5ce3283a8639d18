"""What a run's checkpoints are: `tessera checkpoint list RUN_DIR` and
`tessera checkpoint inspect CKPT`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from tessera.data.progress import counted, human_bytes, human_count
from tessera.trainer.checkpoint.format import (
    ARCHITECTURE_FIELDS,
    LATEST_FILE,
    TMP_SUFFIX,
    CheckpointError,
    read_latest,
    step_of,
)
from tessera.trainer.checkpoint.load import (
    problems,
    read_manifest,
    read_state,
    resolve_step_dir,
    saved_config,
)
from tessera.trainer.run_dir import is_run_dir


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


# ---------------------------------------------------------------------------------------------
# The command

USAGE = """usage: tessera checkpoint list RUN_DIR [--verify]
       tessera checkpoint inspect CKPT [--no-verify]

list:    every checkpoint of a run (RUN_DIR or RUN_DIR/checkpoints): step, size, layout, status;
         --verify also checks every file's sha256 (otherwise sizes only)
inspect: one checkpoint's manifest and files, checksums verified; exit code 1 when invalid.
         CKPT: a step directory (an uncommitted step-N.tmp too), or a run or checkpoints
         directory (its newest committed checkpoint)"""


def checkpoint_command(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    parser = argparse.ArgumentParser(prog=f"tessera checkpoint {argv[0]}",
                                     usage=USAGE.removeprefix("usage: "))  # argparse adds it
    parser.add_argument("path")
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--no-verify", action="store_true")
    args = parser.parse_args(argv[1:])
    try:
        match argv[0]:
            case "list":
                return list_command(Path(args.path), args.verify)
            case "inspect":
                return inspect_command(inspected_dir(Path(args.path)), not args.no_verify)
    except CheckpointError as e:
        print(f"tessera checkpoint {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    print(f"tessera checkpoint: unknown subcommand {argv[0]!r}\n{USAGE}", file=sys.stderr)
    return 2


def training_text(directory: Path) -> str | None:
    """Step, loss and tokens seen, from the checkpoint's train state (None: none readable)."""
    try:
        train = read_state(directory)["train"]
        seq_len = saved_config(directory).model.seq_len
    except CheckpointError:
        return None
    loss = train.get("loss")
    loss_text = f"loss {loss:.4f}" if isinstance(loss, float) else "loss not recorded"
    samples = int(train.get("consumed_samples", 0))
    return (f"step {train.get('step')}, {loss_text}, {samples:,} sequences "
            f"({human_count(samples * seq_len)} tokens) seen")


def layout_text(layout: dict | None) -> str:
    if not layout:
        return "-"
    return (
        f"tp={layout.get('tp')} pp={layout.get('pp')} dp={layout.get('dp')} "
        f"zero={layout.get('zero_stage')}"
    )


def status_text(info: CheckpointInfo) -> str:
    return "valid" if info.valid else f"INVALID: {info.reason}"


def list_command(path: Path, verify: bool) -> int:
    root = list_root(path)
    infos = list_checkpoints(root, checksum=verify)
    latest = read_latest(root)
    checked = "checksums verified" if verify else "sizes checked; --verify checks sha256 too"
    print(f"{root}: {counted(len(infos), 'checkpoint')}, latest -> {latest or 'none'} ({checked})")
    if infos:
        print(f"  {'TAG':<20} {'STEP':>8} {'SIZE':>10}  {'LAYOUT':<24} STATUS")
    for info in infos:
        mark = "  <- latest" if info.path.name == latest else ""
        print(
            f"  {info.path.name:<20} {info.step if info.step is not None else '-':>8} "
            f"{human_bytes(info.num_bytes):>10}  {layout_text(info.layout):<24} "
            f"{status_text(info)}{mark}"
        )
    return 0


def list_root(path: Path) -> Path:
    """The checkpoints directory `list` reads: RUN_DIR/checkpoints, or `path` itself when it is
    one. A step directory, a file or a directory that is no run's is refused (it would list as
    "0 checkpoints")."""
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a run or checkpoints directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such run or checkpoints directory")
    if step_of(path.name.removesuffix(TMP_SUFFIX)) is not None:
        raise CheckpointError(f"{path} is a checkpoint; use tessera checkpoint inspect {path}")
    steps = [p for p in path.iterdir() if step_of(p.name.removesuffix(TMP_SUFFIX)) is not None]
    named = path.name == "checkpoints" or (path / LATEST_FILE).exists()
    if not steps and not named and not is_run_dir(path):  # (a run that has not saved yet)
        raise CheckpointError(f"{path} is not a run directory: it has no checkpoints/ and no "
                              f"step-N directories")
    return path


def inspected_dir(path: Path) -> Path:
    """A step directory as given, committed or not (`list` shows step-N.tmp), else the newest
    committed one of a run or checkpoints directory, as the other commands take it."""
    if step_of(path.name.removesuffix(TMP_SUFFIX)) is not None and path.is_dir():
        return path
    return resolve_step_dir(path)


def inspect_command(directory: Path, verify: bool) -> int:
    info = inspect(directory, checksum=verify)
    checked = "checksums verified" if verify else "sizes checked, checksums not"
    print(
        f"{directory}: step {info.step}, {human_bytes(info.num_bytes)}, "
        f"{status_text(info)} ({checked})"
    )
    manifest = info.manifest
    if manifest is not None:
        print(f"  saved by Tessera {manifest.get('tessera_version')} at {manifest.get('created')}")
        training = training_text(directory)
        if training:
            print(f"  training: {training}")
        print(f"  config sha256 {manifest.get('config_sha256')}")
        layout = manifest.get("layout", {})
        print("  layout: " + " ".join(f"{k}={v}" for k, v in layout.items()))
        model = manifest.get("model", {})
        print(
            "  model: "
            + " ".join(f"{k}={model[k]}" for k in ARCHITECTURE_FIELDS if k in model)
        )
        files = manifest["files"]
        print(f"  files ({len(files)}):")
        for name, entry in files.items():
            print(f"    {entry['bytes']:>14,}  {entry['sha256'][:16]}  {name}")
    return 0 if info.valid else 1
