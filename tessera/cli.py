"""The `tessera` command: one subcommand per user task; `python -m tessera` is the same.

Each command imports what it needs inside its own branch: `tessera --help` and `print-config`
answer in a tenth of a second, without torch, DeepSpeed or megatron-core.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from tessera import __version__
from tessera.launch.env import (
    LaunchEnvError,
    check_launch_env,
    exit_with_launcher,
    quiet_dependencies,
)

if TYPE_CHECKING:  # imported where a command needs it: `tessera --help` stays quick
    from tessera.trainer.config import Config

COMMANDS = {
    "prepare": "tokenize text into WebDataset shards",
    "train": "train (or resume) a model",
    "submit": "submit training to Slurm (requeues itself when preempted); --dry-run: the script",
    "status": "a run's Slurm jobs, last step and last checkpoint: tessera status RUN_DIR",
    "print-config": "print the resolved config; --doc: the reference of every key (Markdown)",
    "checkpoint": "list a run's checkpoints or inspect one: tessera checkpoint {list,inspect} PATH",
    "convert": "checkpoint to/from Hugging Face or another layout: convert {to-hf,from-hf,reshard}",
    "generate": "continue a prompt with a checkpoint: tessera generate CKPT_DIR --prompt TEXT",
    "report": "loss and throughput plots: tessera report RUN_DIR... --output FILE.png|.html",
}

# commands whose processes read RANK, WORLD_SIZE, LOCAL_RANK and MASTER_* (a launch's ranks)
LAUNCHED = ("train", "convert", "generate")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        _print_usage()
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"tessera {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    exit_with_launcher()
    if command in LAUNCHED and not {"-h", "--help"} & set(rest):
        try:  # a stray RANK or WORLD_SIZE fails here, not inside torch or DeepSpeed
            check_launch_env()
        except LaunchEnvError as e:
            return _fail(command, e)
    # print-config imports no torch; train and generate say a first line before torch loads
    if command not in ("print-config", "train", "generate"):
        quiet_dependencies()
    match command:
        case "prepare":
            from tessera.data.prepare import prepare_command

            return prepare_command(rest)
        case "train":
            return _train(rest)
        case "print-config":
            return _print_config(rest)
        case "checkpoint":
            from tessera.trainer.checkpoint.inspect import checkpoint_command

            return checkpoint_command(rest)
        case "convert":
            from tessera.trainer.convert import convert_command

            return convert_command(rest)
        case "submit":
            return _submit(rest)
        case "status":
            return _status(rest)
        case "generate":
            if rest and not rest[0].startswith("-") and sys.stderr.isatty():  # for a person;
                # piped, stderr holds only the one error line when there is one
                print(f"tessera: loading {rest[0]} ...", file=sys.stderr, flush=True)
            quiet_dependencies()
            from tessera.trainer.generate import generate_command

            return generate_command(rest)
        case "report":
            from tessera.trainer.report import report_command

            return report_command(rest)
    print(f"tessera: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


def _print_usage() -> None:
    print("usage: tessera COMMAND [--config FILE] [dotted.key=value ...]\n\ncommands:")
    for name, text in COMMANDS.items():
        print(f"  {name:<14}{text}")


def _config_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", action="append", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return parser


def _config_args(parser: argparse.ArgumentParser, argv: list[str]
                 ) -> tuple[argparse.Namespace, str | None, list[str]]:
    """The parsed arguments, the one --config file and the overrides."""
    # parse_known_args lets `--train.steps=5` style overrides through
    args, unknown = parser.parse_known_args(argv)
    if args.config and len(args.config) > 1:  # argparse would keep the last one without a word
        parser.error(f"--config given {len(args.config)} times ({', '.join(args.config)}); give "
                     f"one file, and other keys as dotted.key=value overrides")
    return args, (args.config or [None])[0], [*args.overrides, *unknown]


def _load(prog: str, argv: list[str]) -> Config:
    _, config_path, overrides = _config_args(_config_parser(prog), argv)
    return _resolved(config_path, overrides)


def _resolved(config_path: str | None, overrides: list[str]) -> Config:
    from tessera.trainer.config import load_config, validate

    cfg = load_config(config_path, overrides)
    validate(cfg)
    return cfg


def _print_config(argv: list[str]) -> int:
    from tessera.trainer.config import ConfigError, to_yaml

    parser = _config_parser("tessera print-config")
    parser.add_argument("--doc", action="store_true",
                        help="print the reference of every key (Markdown), not a config")
    parser.add_argument("--readme", metavar="FILE",
                        help="with --doc: refresh the reference between the markers of FILE")
    args, config_path, overrides = _config_args(parser, argv)
    if args.doc and (config_path or overrides):
        parser.error("--doc prints the reference of every key; it takes no --config or "
                     "overrides")
    if args.readme and not args.doc:
        parser.error("--readme FILE goes with --doc")
    if args.doc:
        from tessera.trainer.config_doc import doc_command

        return doc_command(args.readme)
    try:
        cfg = _resolved(config_path, overrides)
    except ConfigError as e:
        return _fail("print-config", e)
    print(to_yaml(cfg), end="")
    return 0


def _train(argv: list[str]) -> int:
    from tessera.data.format import DataError
    from tessera.launch.signals import INTERRUPTED_EXIT_CODE, Interrupted
    from tessera.trainer.config import ConfigError, validate
    from tessera.trainer.health import NonFiniteError

    try:
        cfg = _load("tessera train", argv)
        if "RANK" not in os.environ:  # the launcher (or the only rank): a line before torch loads
            print(f"tessera: starting {_ranks_line(cfg)} for {cfg.run.dir}", flush=True)
        quiet_dependencies()  # (imports torch)
        from tessera.launch.env import from_slurm, srun_step_tasks
        from tessera.launch.local import inside_distributed_launch, launch_or_run
        from tessera.trainer.run_dir import RunLock, check_writable

        check_writable(cfg.run.dir)  # before any process starts
        if not inside_distributed_launch() and srun_step_tasks() > 1:
            from_slurm().export()  # `srun tessera train`: each task is a rank
        if not inside_distributed_launch():  # fail here, before any process starts
            validate(cfg, world_size=cfg.launch.nproc_per_node)
            RunLock(cfg.run.dir).check_free()  # (rank 0 takes the lock for the job's life)
        return launch_or_run(cfg.launch.nproc_per_node, ["train", *argv], lambda: _train_here(cfg),
                             cfg.run.dir, cfg.resilience.max_restarts)
    except Interrupted as e:  # Ctrl-C in the loop: saved at a step boundary
        print(f"tessera train: {e}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except (ConfigError, DataError, NonFiniteError) as e:
        return _fail("train", e)
    except Exception as e:
        from tessera.trainer.checkpoint import CheckpointError  # (imports torch: not up front)

        if isinstance(e, CheckpointError):
            return _fail("train", e)
        raise
    except KeyboardInterrupt:  # Ctrl-C outside the loop, or a second one in it: nothing
        # half-written (a save commits whole or not at all)
        print("tessera train: interrupted without saving; the last committed checkpoint stands",
              file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    return 0


def _ranks_line(cfg: Config) -> str:
    """'2 ranks (tp=2 pp=1 dp=1)' for this machine's launch."""
    ranks, p = cfg.launch.nproc_per_node, cfg.parallel
    # no dp where the ranks do not divide: the check right after says so
    dp = f" dp={ranks // (p.tp * p.pp)}" if ranks % (p.tp * p.pp) == 0 else ""
    return f"{ranks} rank{'s' if ranks > 1 else ''} (tp={p.tp} pp={p.pp}{dp})"


def _train_here(cfg: Config) -> int:
    """This process trains, as the only rank or as one rank of a launch."""
    from tessera.launch.signals import PREEMPTED_EXIT_CODE
    from tessera.trainer.train import train

    state = train(cfg)
    if state.step < cfg.train.steps:
        return PREEMPTED_EXIT_CODE  # stopped on a signal, saved: running again resumes
    return 0


def _submit(argv: list[str]) -> int:
    from tessera.data.format import DataError
    from tessera.launch.slurm import SlurmError
    from tessera.trainer import submit
    from tessera.trainer.config import ConfigError

    dry_run = "--dry-run" in argv
    try:
        cfg = _load("tessera submit", [arg for arg in argv if arg != "--dry-run"])
        if dry_run:
            submit.check_config(cfg, dry_run=True)
            print(submit.sbatch_script(cfg), end="")
            return 0
        job = submit.submit(cfg)
    except (ConfigError, DataError, SlurmError) as e:
        return _fail("submit", e)
    print(f"tessera: submitted job {job.job_id} ({job.job_name}); logs in {job.log_dir}/\n"
          f"tessera: follow it with `tessera status {cfg.run.dir}`")
    return 0


def _status(argv: list[str]) -> int:
    from tessera.trainer.status import StatusError, status_lines

    usage = ("usage: tessera status RUN_DIR\n\na run's Slurm jobs, last step, last checkpoint, "
             "restarts, hangs, stragglers and hosts left out")
    if argv in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print(usage, file=sys.stderr)
        return 2
    try:
        print("\n".join(status_lines(argv[0])))
    except StatusError as e:
        return _fail("status", e)
    return 0


def _fail(command: str, error: Exception) -> int:
    if not getattr(error, "said_by_rank_0", False):  # (train's ranks: rank 0 prints it)
        sys.stderr.write(f"tessera {command}: error: {error}\n")  # one write: ranks share a pipe
    return 2
