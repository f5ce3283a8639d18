"""The `tessera` command: one subcommand per user task; `python -m tessera` is the same."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from tessera import __version__

COMMANDS = {
    "prepare": "tokenize text into WebDataset shards",
    "train": "train (or resume) a model",
    "print-config": "print the resolved config",
}


def quiet_dependencies() -> None:
    """Silence start-up notices of our dependencies that say nothing to a user of Tessera."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="megatron")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        # Naming the accelerator spares DeepSpeed's "Setting accelerator to CPU" warning.
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_dependencies()
    if not argv or argv[0] in ("-h", "--help"):
        _print_usage()
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"tessera {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    match command:
        case "prepare":
            from tessera.data.prepare import prepare_command

            return prepare_command(rest)
        case "train":
            return _train(rest)
        case "print-config":
            return _print_config(rest)
    print(f"tessera: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


def _print_usage() -> None:
    print("usage: tessera COMMAND [--config FILE] [dotted.key=value ...]\n\ncommands:")
    for name, text in COMMANDS.items():
        print(f"  {name:<14}{text}")


def _config_args(prog: str, argv: list[str]) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    # parse_known_args lets `--train.steps=5` style overrides through
    args, unknown = parser.parse_known_args(argv)
    return args.config, [*args.overrides, *unknown]


def _load(prog: str, argv: list[str]):
    from tessera.trainer.config import load_config, validate

    config_path, overrides = _config_args(prog, argv)
    cfg = load_config(config_path, overrides)
    validate(cfg)
    return cfg


def _print_config(argv: list[str]) -> int:
    from tessera.trainer.config import ConfigError, to_yaml

    try:
        cfg = _load("tessera print-config", argv)
    except ConfigError as e:
        return _fail("print-config", e)
    print(to_yaml(cfg), end="")
    return 0


def _train(argv: list[str]) -> int:
    from tessera.data.format import DataError
    from tessera.launch.local import inside_distributed_launch, launch_local
    from tessera.trainer.config import ConfigError, validate

    try:
        cfg = _load("tessera train", argv)
        nproc = cfg.launch.nproc_per_node
        if nproc > 1 and not inside_distributed_launch():
            validate(cfg, world_size=nproc)  # fail here, before any process starts
            return launch_local(nproc, ["train", *argv])
        from tessera.trainer.train import train

        train(cfg)
    except (ConfigError, DataError) as e:
        return _fail("train", e)
    return 0


def _fail(command: str, error: Exception) -> int:
    print(f"tessera {command}: error: {error}", file=sys.stderr)
    return 2
