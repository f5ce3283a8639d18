"""The job's configuration: YAML plus `dotted.key=value` overrides, into typed dataclasses.

omegaconf parses the YAML and the dotted overrides and merges them (the edge); everything past
`load_config` sees plain frozen-free dataclasses. Unknown keys and wrong types are reported by our
own walk over the schema so that each message names the key (and the nearest valid one).
"""

from __future__ import annotations

import dataclasses
import difflib
import signal
import types
import typing
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration a user got wrong; the message names the key."""


@dataclasses.dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 1234
    name: str | None = None  # defaults to the basename of `dir`


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int | None = None  # None: taken from the prepared data's tokenizer
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    ffn_hidden_size: int = 176
    seq_len: int = 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False  # GPU only (megatron-core's implementation uses CUDA)
    pipeline_partition: Any = "parameters"  # parameters | uniform | a list of blocks per stage


@dataclasses.dataclass
class TrainConfig:
    steps: int = 100
    global_batch_size: int = 8  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 4  # sequences per forward/backward on one rank
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    precision: str = "fp32"  # fp32 | bf16
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    activation_checkpointing: str = "none"  # none | full (recompute each block in backward)


@dataclasses.dataclass
class DataConfig:
    shards: Any = None  # str or list[str]: a prepared directory, a glob/brace pattern, or a list
    num_workers: int = 0
    streams: int | None = None  # independent read streams; None: chosen at first start, kept
    shuffle: bool = True


@dataclasses.dataclass
class CheckpointConfig:
    interval: int = 100  # steps between saves; 0 saves only at the end
    keep_last: int = 3


@dataclasses.dataclass
class LogConfig:
    interval: int = 1  # steps between metrics lines


@dataclasses.dataclass
class LaunchConfig:
    nproc_per_node: int = 1
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | gloo | nccl


@dataclasses.dataclass
class SlurmConfig:
    partition: str | None = None  # None: the cluster's default partition
    nodes: int = 1
    tasks_per_node: int = 1  # srun launcher: one task per GPU; torchrun launcher: must be 1
    gpus_per_node: int = 0  # 0: a CPU job
    time_min: int = 60
    signal: str = "USR2"  # sent signal_lead_s before the time limit: save, exit, requeue
    launcher: str = "srun"  # srun: Slurm starts every rank | torchrun: one task per node
    # starts launch.nproc_per_node ranks
    cpus_per_task: int | None = None  # None: Slurm's default
    mem_gb: float | None = None  # memory per node; None: Slurm's default
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str | None = None  # None: tessera-<run name>
    signal_lead_s: int = 120  # seconds before the time limit that `signal` arrives
    max_requeues: int = 10  # requeues after a stop on a signal; then the job ends
    sbatch_options: Any = dataclasses.field(default_factory=dict)  # other #SBATCH flags,
    # e.g. {exclusive: true, mail-type: END}
    setup: Any = dataclasses.field(default_factory=list)  # shell lines run before srun


@dataclasses.dataclass
class Config:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    launch: LaunchConfig = dataclasses.field(default_factory=LaunchConfig)
    slurm: SlurmConfig = dataclasses.field(default_factory=SlurmConfig)


# ---------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> plain dict -> typed dataclasses


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Merge a YAML file and `dotted.key=value` overrides (a leading `--` is accepted)."""
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except (OmegaConfBaseException, ValueError, OSError) as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
    layers.append(_parse_overrides(overrides))
    try:
        merged = OmegaConf.to_container(OmegaConf.merge(*layers), resolve=True) if layers else {}
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot merge the config: {e}") from e
    if merged is None:
        merged = {}
    if not isinstance(merged, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return _build(Config, merged, prefix="")


def _parse_overrides(overrides: list[str]):
    items = []
    for raw in overrides:
        item = raw[2:] if raw.startswith("--") else raw
        if "=" not in item:
            raise ConfigError(f"override {raw!r} is not of the form dotted.key=value")
        items.append(item)
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {items}: {e}") from e


def _build(cls: type, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + str(key), prefix, list(fields)))
    kwargs = {}
    for name, value in values.items():
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, hint)
    return cls(**kwargs)


def _unknown_key_message(key: str, prefix: str, valid: list[str]) -> str:
    leaf = key[len(prefix) :]
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    section = prefix.rstrip(".") or "the top level"
    return f"unknown config key '{key}'{hint} (valid keys in {section}: {', '.join(valid)})"


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against a field's annotation; ints widen to float, nothing else converts."""
    if hint is Any:
        return value
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"config key '{key}' must be {_type_name(hint)}, got null")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    raise ConfigError(
        f"config key '{key}' must be {_type_name(hint)}, got {type(value).__name__} {value!r}"
    )


def _type_name(hint: Any) -> str:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    names = ["null" if o is type(None) else o.__name__ for o in options]
    return " or ".join(names)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg)))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))


# ---------------------------------------------------------------------------------------------
# Cross-field checks


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Checks that need several fields; `world_size` adds the layout checks when known."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    _check(m.hidden_size % m.num_heads == 0, "model.hidden_size", f"{m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", f"{m.num_kv_heads} does not divide model.num_heads={m.num_heads}")
    _check(m.head_dim % 2 == 0, "model.hidden_size", f"head dim {m.head_dim} must be even for rotary embeddings")
    for key, value in [("parallel.tp", p.tp), ("parallel.pp", p.pp), ("train.steps", t.steps),
                       ("train.global_batch_size", t.global_batch_size),
                       ("train.micro_batch_size", t.micro_batch_size), ("model.seq_len", m.seq_len),
                       ("model.num_layers", m.num_layers), ("log.interval", cfg.log.interval),
                       ("launch.nproc_per_node", cfg.launch.nproc_per_node)]:
        _check(value >= 1, key, f"must be at least 1, got {value}")
    _check(m.num_heads % p.tp == 0, "parallel.tp", f"tp={p.tp} does not divide model.num_heads={m.num_heads}")
    _check(m.num_kv_heads % p.tp == 0, "parallel.tp", f"tp={p.tp} does not divide model.num_kv_heads={m.num_kv_heads}")
    _check(m.ffn_hidden_size % p.tp == 0, "parallel.tp", f"tp={p.tp} does not divide model.ffn_hidden_size={m.ffn_hidden_size}")
    _check(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"must be 0, 1, 2 or 3, got {p.zero_stage}")
    _check(p.pp == 1 or p.zero_stage <= 1, "parallel.zero_stage",
           f"ZeRO stage {p.zero_stage} with pp={p.pp}: DeepSpeed's pipeline engine supports only stages 0 and 1")
    _check(p.pp <= m.num_layers, "parallel.pp", f"pp={p.pp} exceeds model.num_layers={m.num_layers}")
    _check_partition(cfg)
    _check(t.activation_checkpointing in ("none", "full"), "train.activation_checkpointing",
           f"must be none or full, got {t.activation_checkpointing!r}")
    _check(t.precision in ("fp32", "bf16"), "train.precision", f"must be fp32 or bf16, got {t.precision!r}")
    _check(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 turns clipping off), got {t.grad_clip}")
    _check(0 <= t.min_lr <= t.lr, "train.min_lr", f"{t.min_lr} must lie between 0 and train.lr={t.lr}")
    _check(t.lr > 0, "train.lr", f"must be positive, got {t.lr}")
    _check(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _check(t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size",
           f"{t.global_batch_size} is not divisible by train.micro_batch_size={t.micro_batch_size}")
    _check(cfg.checkpoint.interval >= 0, "checkpoint.interval", f"must be >= 0, got {cfg.checkpoint.interval}")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {cfg.checkpoint.keep_last}")
    _check(cfg.data.num_workers >= 0, "data.num_workers", f"must be >= 0, got {cfg.data.num_workers}")
    _check(cfg.launch.backend in ("auto", "gloo", "nccl"), "launch.backend", f"must be auto, gloo or nccl, got {cfg.launch.backend!r}")
    shards = cfg.data.shards
    _check(shards is None or isinstance(shards, str) or (isinstance(shards, list) and all(isinstance(s, str) for s in shards)),
           "data.shards", f"must be a path, a pattern or a list of them, got {shards!r}")
    _check_slurm(cfg.slurm)
    if world_size is not None:
        validate_layout(cfg, world_size)


# Flags that have their own slurm.* key (or that submitit sets); not accepted in sbatch_options.
_MANAGED_SBATCH_FLAGS = ("partition", "time", "nodes", "ntasks-per-node", "gpus-per-node",
                         "cpus-per-task", "mem", "account", "qos", "constraint", "job-name",
                         "signal", "output", "error")


def _check_slurm(s: SlurmConfig) -> None:
    _check(s.launcher in ("srun", "torchrun"), "slurm.launcher", f"must be srun or torchrun, got {s.launcher!r}")
    for key, value, least in [("slurm.nodes", s.nodes, 1), ("slurm.tasks_per_node", s.tasks_per_node, 1),
                              ("slurm.gpus_per_node", s.gpus_per_node, 0), ("slurm.time_min", s.time_min, 1),
                              ("slurm.signal_lead_s", s.signal_lead_s, 0), ("slurm.max_requeues", s.max_requeues, 0)]:
        _check(value >= least, key, f"must be at least {least}, got {value}")
    _check(s.cpus_per_task is None or s.cpus_per_task >= 1, "slurm.cpus_per_task", f"must be at least 1, got {s.cpus_per_task}")
    _check(s.mem_gb is None or s.mem_gb > 0, "slurm.mem_gb", f"must be positive, got {s.mem_gb}")
    name = s.signal.strip().upper()
    _check((name if name.startswith("SIG") else "SIG" + name) in signal.Signals.__members__, "slurm.signal",
           f"{s.signal!r} is not a signal name (e.g. USR1, USR2, TERM)")
    _check(s.signal_lead_s < min(s.time_min * 60, 65536), "slurm.signal_lead_s",
           f"{s.signal_lead_s} s must be shorter than slurm.time_min ({s.time_min} min) and 65536 s")
    options = s.sbatch_options
    _check(isinstance(options, dict) and all(isinstance(k, str) and isinstance(v, (str, int, float, bool))
                                             for k, v in options.items()),
           "slurm.sbatch_options", f"must map sbatch flags to values, got {options!r}")
    for flag in options:
        _check(flag.replace("_", "-").lstrip("-") not in _MANAGED_SBATCH_FLAGS, "slurm.sbatch_options",
               f"'{flag}' has its own key under slurm (or is set by tessera submit)")
    _check(isinstance(s.setup, list) and all(isinstance(line, str) for line in s.setup), "slurm.setup",
           f"must be a list of shell lines, got {s.setup!r}")


def _check_partition(cfg: Config) -> None:
    partition, pp, layers = cfg.parallel.pipeline_partition, cfg.parallel.pp, cfg.model.num_layers
    key = "parallel.pipeline_partition"
    if isinstance(partition, str):
        _check(partition in ("parameters", "uniform"), key,
               f"must be parameters, uniform or a list of blocks per stage, got {partition!r}")
        return
    _check(isinstance(partition, list) and all(isinstance(n, int) and not isinstance(n, bool)
                                               and n >= 0 for n in partition), key,
           f"must be parameters, uniform or a list of block counts, got {partition!r}")
    _check(len(partition) == pp, key, f"lists {len(partition)} stages but parallel.pp={pp}")
    _check(sum(partition) == layers, key,
           f"{partition} sums to {sum(partition)} blocks but model.num_layers={layers}")


def validate_layout(cfg: Config, world_size: int) -> None:
    p, t = cfg.parallel, cfg.train
    model_parallel = p.tp * p.pp
    _check(world_size % model_parallel == 0, "parallel.tp",
           f"world size {world_size} is not divisible by tp*pp = {p.tp}*{p.pp} = {model_parallel}")
    dp = world_size // model_parallel
    _check(t.global_batch_size % (t.micro_batch_size * dp) == 0, "train.global_batch_size",
           f"{t.global_batch_size} is not divisible by train.micro_batch_size*dp = "
           f"{t.micro_batch_size}*{dp} (dp = world {world_size} / (tp*pp))")


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // (cfg.parallel.tp * cfg.parallel.pp)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")
