"""`tessera convert`: a training checkpoint to Hugging Face and back, and from any parallel
layout to any other.

    to-hf    CKPT OUT   reads the checkpoint's files tensor by tensor (`reader`), in one
                        process at any original layout, and writes a LlamaForCausalLM directory
    from-hf  HF OUT     ranks of the chosen layout build real engines, take the Hugging Face
                        weights (`fill`) and save a Tessera checkpoint
    reshard  CKPT OUT   the same with the whole training state: weights, fp32 masters, Adam
                        moments and step, schedule, DeepSpeed's counters, train state, data cursor

from-hf and reshard write OUT as a run directory (OUT/config.yaml, OUT/checkpoints/step-N/):
`tessera train --config OUT/config.yaml` continues a reshard, `checkpoint.load_from=OUT
checkpoint.load_weights_only=true` starts pretraining from an import.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tessera.data.format import DataError
from tessera.data.progress import counted, progress
from tessera.data.sources import is_url
from tessera.data.tokenizer import HF_TOKENIZER_FILE, ByteTokenizer
from tessera.launch.local import inside_distributed_launch, launch_or_run
from tessera.parallel.engine import Engine
from tessera.parallel.topology import distributed
from tessera.trainer import architecture, checkpoint
from tessera.trainer.checkpoint import CheckpointError, TrainState
from tessera.trainer.config import (
    Config,
    ConfigError,
    load_config,
    save_config,
    validate,
    validate_layout,
)
from tessera.trainer.convert import hf
from tessera.trainer.convert.fill import fill_engine, restore_schedule
from tessera.trainer.convert.reader import CheckpointReader, canonical_shapes
from tessera.trainer.train import build_training_engine

DEFAULT_MAX_SHARD = "5GB"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# What a reshard may change: the layout and how it runs, never the model, schedule or data.
RESHARD_KEYS = ("parallel.", "launch.", "checkpoint.", "train.micro_batch_size", "train.precision")
# Model keys an import may set; the others come from the Hugging Face config.
FROM_HF_MODEL_KEYS = ("model.seq_len", "model.init_std")

USAGE = """usage:
  tessera convert to-hf CKPT OUT [--dtype fp32|bf16] [--max-shard-size 5GB] [--tokenizer PATH]
  tessera convert from-hf HF_DIR OUT [--allow-pickle] [parallel.tp=N parallel.pp=N ...]
  tessera convert reshard CKPT OUT parallel.tp=N parallel.pp=N parallel.zero_stage=N
                          [launch.nproc_per_node=N]

CKPT: a checkpoint step directory, a run's checkpoints directory or a run directory (its newest).
to-hf:   a Hugging Face directory of the model's family (config.json, generation_config.json,
         safetensors with an index above --max-shard-size, tokenizer files); --tokenizer: a
         tokenizer.json or a directory with one (default: the one the checkpoint carries)
from-hf: a Tessera run directory at the given layout from a Llama, Mistral, Qwen2 or Qwen3
         directory's safetensors (pickle .bin only with --allow-pickle) and its tokenizer; then
         tessera prepare ... --tokenizer OUT, and tessera train --config OUT/config.yaml
         checkpoint.load_from=OUT checkpoint.load_weights_only=true ... pretrains from them
reshard: the full training state at another layout; tessera train --config OUT/config.yaml
         continues it
from-hf and reshard start launch.nproc_per_node ranks (default tp*pp: dp=1)."""


# ---------------------------------------------------------------------------------------------
# to-hf


def export_tokenizer(step_dir: Path, override: str | None, vocab_size: int) -> tuple[str, int]:
    """(tokenizer.json text, EOS id): `override` (a prepared directory or a tokenizer.json), else
    the tokenizer of the data the run trained on; the byte tokenizer as an equivalent BPE."""
    tokenizer = checkpoint.tokenizer_of(step_dir, override)
    if tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the model "
            f"{vocab_size}: not the run's tokenizer (--tokenizer)"
        )
    if isinstance(tokenizer, ByteTokenizer):
        return hf.byte_tokenizer_json(), tokenizer.eos_id
    return tokenizer.to_str(), tokenizer.eos_id


def _check_new_directory(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output {out} exists and is not empty; choose a new directory")


def to_hf(
    ckpt: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    max_shard_bytes: int = hf.parse_bytes(DEFAULT_MAX_SHARD),
    tokenizer: str | None = None,
    verify: bool = True,
) -> list[str]:
    """Write `out` as a Hugging Face directory of the model's family; returns the weight files
    written.

    One canonical tensor is assembled at a time and goes into the current shard: peak memory is
    about one shard (`max_shard_bytes`) plus twice the largest tensor in fp32."""
    reader = CheckpointReader(ckpt, verify=verify)
    tokenizer_json, eos_id = export_tokenizer(
        reader.directory, tokenizer, reader.cfg.model.vocab_size
    )
    out = Path(out)
    _check_new_directory(out)
    partial = _partial_directory(out)
    try:
        files = _write_hf(reader, partial, DTYPES[dtype], max_shard_bytes, tokenizer_json, eos_id)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.replace(partial, out)
    return files


def _partial_directory(out: Path) -> Path:
    """A new directory beside `out`, renamed to `out` once the export is whole: a reader never
    sees half an export, and no directory of the user's (say an OUT.tmp) is reused or removed."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise ConfigError(f"output {out}: cannot be written ({e.strerror}: {e.filename})") from e
    partial.chmod(0o777 & ~hf.current_umask())  # mkdtemp makes it 0700: others could not read
    return partial


def _write_hf(reader: CheckpointReader, directory: Path, dtype: torch.dtype,
              max_shard_bytes: int, tokenizer_json: str, eos_id: int) -> list[str]:
    from transformers import (
        GenerationConfig,  # lazy: transformers takes seconds to import: only an export pays it
    )

    writer = hf.ShardedWriter(directory, max_shard_bytes)
    with progress("to-hf", total=len(reader.names()), unit="tensors") as bar:
        for name in reader.names():
            writer.add(architecture.hf_name(name), reader.tensor(name).to(dtype))
            bar.advance(1, note=name)
        files = writer.close()
    bos_id = hf.bos_id(tokenizer_json)
    config = hf.hf_config(reader.cfg.model, eos_id, dtype)
    config.bos_token_id = bos_id
    config.save_pretrained(directory)
    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id).save_pretrained(directory)
    hf.write_tokenizer(directory, tokenizer_json, eos_id, bos_id, reader.cfg.model.seq_len)
    return files


# ---------------------------------------------------------------------------------------------
# Checkpoints written by engines at the target layout (every rank runs these)


def _write_checkpoint(cfg: Config, fill: Callable, step: int, state: dict,
                      tokenizer: checkpoint.CarriedTokenizer | None) -> Path:
    """Collective: an engine at `cfg`'s layout, filled by `fill(engine)`, saved as
    run.dir/checkpoints/step-N with `state` (train state, data cursor) and `tokenizer`."""
    world = (
        dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    )
    validate_layout(cfg, world)
    with distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.launch.backend) as topo:
        engine, _, _ = build_training_engine(cfg, topo)
        fill(engine)
        checkpoint.install(engine, cfg, tokenizer)
        run_dir = Path(cfg.run.dir)
        layout = {
            "tp": topo.tp,
            "pp": topo.pp,
            "dp": topo.dp,
            "zero_stage": cfg.parallel.zero_stage,
        }
        directory = checkpoint.save(
            engine, run_dir / "checkpoints", step, {**state, "layout": layout}, cfg
        )
        checkpoint.wait(engine)
        if topo.rank == 0:
            save_config(cfg, run_dir / "config.yaml")
        dist.barrier()
        return directory


def reshard(ckpt: str | Path, cfg: Config, verify: bool = True) -> Path:
    """Collective: the full training state of `ckpt` at `cfg`'s layout, saved under run.dir.
    `verify`: check the files' sha256 first (on every rank; the command checks once, before)."""
    reader = CheckpointReader(ckpt, verify=verify)
    adam_step = reader.adam_step()
    counters = reader.model_states()

    def fill(engine: Engine) -> None:
        # before the first optimizer step there are no moments: the fresh optimizer is right
        fill_engine(engine, reader.tensor, adam_step if adam_step > 0 else None)
        restore_schedule(engine, counters["lr_scheduler"], counters)

    state = {k: v for k, v in reader.state.items() if k != "layout"}
    tokenizer = checkpoint.carried_tokenizer(reader.directory)
    return _write_checkpoint(cfg, fill, reader.manifest["step"], state, tokenizer)


def from_hf(hf_dir: str | Path, cfg: Config, allow_pickle: bool = False) -> Path:
    """Collective: the weights of a Hugging Face model (and its tokenizer) as a step-0 checkpoint
    at `cfg`'s layout."""
    source = hf.HFCheckpoint(hf_dir, allow_pickle)
    source.check(canonical_shapes(cfg.model))
    state = {"train": dataclasses.asdict(TrainState())}
    return _write_checkpoint(
        cfg, lambda engine: fill_engine(engine, lambda n, _: source.tensor(n), None), 0, state,
        source.tokenizer(),
    )


# ---------------------------------------------------------------------------------------------
# Configs of the output runs


def _given(overrides: list[str], key: str) -> bool:
    return any(o.lstrip("-").split("=", 1)[0] == key for o in overrides)


def _default_world(cfg: Config, overrides: list[str]) -> None:
    """launch.nproc_per_node, unless given, becomes tp*pp (dp=1)."""
    if not _given(overrides, "launch.nproc_per_node"):
        cfg.launch.nproc_per_node = cfg.parallel.tp * cfg.parallel.pp


def reshard_config(reader: CheckpointReader, out: Path, overrides: list[str]) -> Config:
    for override in overrides:
        key = override.lstrip("-").split("=", 1)[0]
        if not key.startswith(RESHARD_KEYS):
            allowed = ", ".join(k + "*" if k.endswith(".") else k for k in RESHARD_KEYS)
            raise ConfigError(
                f"config key '{key}': a reshard keeps the model, schedule and data; "
                f"it may set {allowed}"
            )
    cfg = load_config(reader.directory / checkpoint.CONFIG_FILE, [*overrides, f"run.dir={out}"],
                      saved=True)
    cfg.checkpoint.load_from = None  # the new run resumes from its own checkpoint
    for key in drop_data_commands(cfg):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"tessera convert reshard: {key} of the checkpoint's config is a URL or pipe: "
                  f"command; it is not copied (a checkpoint does not choose what runs): give "
                  f"{key}=... to tessera train")
    _default_world(cfg, overrides)
    validate(cfg, world_size=None)
    return cfg


def drop_data_commands(cfg: Config) -> list[str]:
    """Set to null the data keys that name a URL or a pipe: command (which runs a shell
    command), as a config read from a checkpoint holds them; returns the keys dropped."""
    def commands(spec: Any) -> bool:
        if isinstance(spec, str):
            return is_url(spec)
        if isinstance(spec, dict):
            return commands(spec.get("shards"))
        return isinstance(spec, list) and any(commands(item) for item in spec)

    dropped = []
    for key in ("shards", "sources", "valid_shards"):
        if commands(getattr(cfg.data, key)):
            setattr(cfg.data, key, None)
            dropped.append(f"data.{key}")
    return dropped


def from_hf_config(source: hf.HFCheckpoint, out: Path, overrides: list[str]) -> Config:
    cfg = load_config(None, [*overrides, f"run.dir={out}"])
    for field in dataclasses.fields(source.model):
        key = f"model.{field.name}"
        if key in FROM_HF_MODEL_KEYS and _given(overrides, key):
            continue
        if _given(overrides, key) and getattr(cfg.model, field.name) != getattr(
            source.model, field.name
        ):
            raise ConfigError(
                f"config key '{key}': {getattr(cfg.model, field.name)!r} disagrees with "
                f"the Hugging Face config ({getattr(source.model, field.name)!r})"
            )
        setattr(cfg.model, field.name, getattr(source.model, field.name))
    _default_world(cfg, overrides)
    validate(cfg, world_size=None)
    return cfg


# ---------------------------------------------------------------------------------------------
# The command


def convert_command(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    handlers = {"to-hf": _to_hf_command, "from-hf": _from_hf_command, "reshard": _reshard_command}
    if command not in handlers:
        print(f"tessera convert: unknown subcommand {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return handlers[command](rest)
    except (ConfigError, CheckpointError, hf.HFError, DataError) as e:
        print(f"tessera convert {command}: error: {e}", file=sys.stderr)
        return 2


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"tessera convert {command}",
                                     usage=USAGE.removeprefix("usage:"))  # argparse adds it
    parser.add_argument("source")
    parser.add_argument("out")
    return parser


def _to_hf_command(argv: list[str]) -> int:
    parser = _parser("to-hf")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD)
    parser.add_argument("--tokenizer")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the sha256 check of the files"
    )
    args = parser.parse_args(argv)
    try:
        max_shard_bytes = hf.parse_bytes(args.max_shard_size)
    except ValueError as e:
        raise ConfigError(f"--max-shard-size: {e}") from None
    files = to_hf(
        args.source,
        args.out,
        args.dtype,
        max_shard_bytes,
        args.tokenizer,
        verify=not args.no_verify,
    )
    shards = sum(f.endswith(".safetensors") for f in files)
    print(f"tessera: wrote {args.out} ({counted(shards, 'safetensors file')}, {args.dtype})")
    return 0


def _launch_or_run(command: str, argv: list[str], cfg: Config, run: Callable[[], Path],
                   note: str | None = None) -> int:
    """`run` on launch.nproc_per_node ranks; rank 0 says what it wrote (and `note`)."""
    if not inside_distributed_launch():  # fail here, before any process starts
        validate(cfg, world_size=cfg.launch.nproc_per_node)

    def run_here() -> int:
        directory = run()
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"tessera: wrote {directory}")
            if note:
                print(f"tessera: note: {note}")
        return 0

    return launch_or_run(cfg.launch.nproc_per_node, ["convert", command, *argv], run_here)


def _from_hf_command(argv: list[str]) -> int:
    parser = _parser("from-hf")
    parser.add_argument("--allow-pickle", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    source = hf.HFCheckpoint(args.source, args.allow_pickle)
    out = Path(args.out).absolute()
    cfg = from_hf_config(source, out, overrides)
    source.check(canonical_shapes(cfg.model))
    carried = source.tokenizer()  # refused here, before any process starts
    if not inside_distributed_launch():
        _check_new_directory(out)
    argv = [args.source, args.out, *(["--allow-pickle"] if args.allow_pickle else []), *overrides]
    note = None if carried else (
        f"{source.directory} has no {HF_TOKENIZER_FILE}, so the import carries no tokenizer: "
        f"give tessera prepare, generate and convert to-hf --tokenizer a tokenizer.json"
    )
    return _launch_or_run(
        "from-hf", argv, cfg, lambda: from_hf(args.source, cfg, args.allow_pickle), note
    )


def _reshard_command(argv: list[str]) -> int:
    parser = _parser("reshard")
    args, overrides = parser.parse_known_args(argv)
    reader = CheckpointReader(args.source, verify=not inside_distributed_launch())  # checked once
    out = Path(args.out).absolute()
    cfg = reshard_config(reader, out, overrides)
    if not inside_distributed_launch():
        _check_new_directory(out)
    return _launch_or_run(
        "reshard",
        [args.source, args.out, *overrides],
        cfg,
        lambda: reshard(reader.directory, cfg, verify=False),
    )


