"""The job's configuration: YAML plus `dotted.key=value` overrides, into typed dataclasses.

omegaconf parses the YAML and the dotted overrides and merges them (the edge); everything past
`load_config` sees plain frozen-free dataclasses. Unknown keys and wrong types are reported by our
own walk over the schema so that each message names the key (and the nearest valid one).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import signal
import stat
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tessera.data.ramp import BatchSizes
from tessera.launch.config import (
    MIN_HANG_TIMEOUT_S,
    LaunchConfig,
    ResilienceConfig,
    SlurmConfig,
)
from tessera.trainer.architecture import model_problems


class ConfigError(ValueError):
    """A configuration a user got wrong; the message names the key."""


@dataclasses.dataclass
class RunConfig:
    dir: str = "runs/default"  # the run directory: config, metrics, checkpoints, tensorboard
    seed: int = 1234  # the initial weights and the data order derive from it
    name: str | None = None  # defaults to the basename of `dir`


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int | None = None  # None: taken from the prepared data's tokenizer
    hidden_size: int = 64  # model width d
    num_layers: int = 2  # transformer blocks
    num_heads: int = 4  # attention heads (query)
    num_kv_heads: int = 4  # key/value heads: fewer than num_heads is grouped-query attention
    ffn_hidden_size: int = 176  # SwiGLU inner width
    seq_len: int = 64  # tokens per training sequence
    rope_theta: float = 10000.0  # rotary embedding base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # the output projection reuses the input embedding matrix
    init_std: float = 0.02  # standard deviation of the normal initialization of matrices
    head_dim: int | None = None  # per attention head; null: hidden_size / num_heads (Qwen3 and
    # others set their own)
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2, Qwen2.5)
    qk_norm: bool = False  # RMSNorm over each head of q and k before the rotary embedding (Qwen3)
    rope_scaling: Any = None  # null, or {type: linear | llama3 | yarn, factor: F, ...}: RoPE for
    # long contexts (Llama 3.1-3.3: llama3 with low_freq_factor, high_freq_factor,
    # original_max_position_embeddings; yarn with original_max_position_embeddings)
    sliding_window: int | None = None  # a token attends to at most this many, itself included
    # (Mistral 7B v0.1: 4096); null: to every token before it
    family: str | None = None  # the Hugging Face architecture an export writes: llama | mistral |
    # qwen2 | qwen3; null: the one the options make (from-hf sets the source's)
    max_positions: int | None = None  # the context an export's config.json declares; null:
    # seq_len (from-hf keeps the source's)

    @property
    def head_size(self) -> int:
        """The width of one attention head: head_dim, or hidden_size / num_heads."""
        return self.head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel ranks (divides the heads and the ffn width)
    pp: int = 1  # pipeline stages (DeepSpeed 1F1B); dp = world size / (tp * pp)
    zero_stage: int = 0  # ZeRO stage 0-3 over the data-parallel ranks (pp > 1: 0 or 1)
    sequence_parallel: bool = False  # GPU only (megatron-core's implementation uses CUDA)
    pipeline_partition: Any = "parameters"  # parameters | uniform | a list of blocks per stage


@dataclasses.dataclass
class TrainConfig:
    steps: int = 100  # total optimizer steps of the run (a resumed run trains up to it)
    stop_at: int | None = None  # stop (saved) after this step although the schedule runs to
    # train.steps: a job that trains part of a run, the next resumes it; null: at train.steps
    global_batch_size: int = 8  # sequences per optimizer step, over all data-parallel ranks
    batch_size_ramp: Any = None  # null, or {start, increment, samples}: the global batch grows
    # from start by increment until `samples` samples are consumed, then stays global_batch_size
    micro_batch_size: int = 4  # sequences per forward/backward on one rank
    lr: float = 3e-4  # peak learning rate (AdamW)
    min_lr: float = 3e-5  # the schedule decays to this at train.steps (cosine, wsd)
    warmup_steps: int = 10  # linear warmup from lr/warmup_steps to lr
    lr_schedule: str = "cosine"  # after warmup: cosine (to min_lr at train.steps) | wsd (warmup,
    # stable at lr, then decay to min_lr over the last train.decay_steps) | constant (lr)
    decay_steps: int = 0  # wsd: steps of the final decay
    decay_shape: str = "linear"  # wsd's decay: linear | 1-sqrt (lr * (1 - sqrt(progress)))
    allow_schedule_change: bool = False  # resume although the learning rate at the resume step
    # differs under the saved and the new schedule keys (train.steps, lr, lr_schedule, ...)
    weight_decay: float = 0.1  # AdamW decoupled weight decay, matrices only (not norms)
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    precision: str = "fp32"  # fp32 | bf16
    adam_beta1: float = 0.9  # AdamW first-moment decay
    adam_beta2: float = 0.95  # AdamW second-moment decay
    adam_eps: float = 1e-8  # AdamW epsilon
    activation_checkpointing: str = "none"  # none | full (recompute each block in backward)
    compile: bool = False  # torch.compile each transformer block (on CPU: needs a C++ compiler)
    loss_chunk_tokens: int = 0  # > 0: project to the vocabulary and take the loss this many
    # tokens at a time, gradients included, so the micro-batch's fp32 logits never exist at once
    # (the largest activation with a big vocabulary); 0: the whole micro-batch's logits at once
    eval_interval: int = 100  # steps between evaluations on data.valid_shards (also at the end);
    # 0: only at the end
    eval_batches: int = 10  # global batches of held-out windows per evaluation (the same each
    # time)
    skip_nonfinite: bool = True  # a step whose loss or grad norm is not finite on any rank
    # changes nothing (every rank skips the update); false: the first such step stops the run
    max_nonfinite_steps: int = 5  # more skipped steps than this in a row stop the run


@dataclasses.dataclass
class DataConfig:
    shards: Any = None  # str or list[str]: a prepared directory, a glob/brace pattern, or a list
    num_workers: int = 0  # DataLoader worker processes per rank reading the shards; 0: in-process
    streams: int | None = None  # independent read streams; None: chosen at first start, kept
    shuffle: bool = True  # shard order per epoch and windows within data.shuffle_buffer, seeded
    sources: Any = None  # instead of shards: a list of {name, shards, weight}, mixed by weight;
    # a weight may be a schedule, [[step, weight], ...]: piecewise constant from each step on
    shuffle_buffer: int = 32  # windows per stream shuffled together (exactly resumable); 0: off
    allow_mixture_change: bool = False  # resume although data.sources weights changed
    document_masking: bool = False  # a token attends only within its document in a packed
    # window (documents end at the tokenizer's EOS), rotary positions restarting at each
    max_consecutive_errors: int = 100  # more bad samples in a row than this stops the run
    valid_shards: Any = None  # held-out data for eval/loss, prepared like data.shards with the
    # same tokenizer; None: no evaluation


@dataclasses.dataclass
class CheckpointConfig:
    interval: int = 100  # steps between saves; 0 saves only at the end
    keep_last: int = 3  # newest committed checkpoints kept
    keep_every: int = 0  # also kept for good: every checkpoint whose step is a multiple; 0: none
    load_from: str | None = None  # a new run starts from this step, checkpoints or run directory
    load_weights_only: bool = False  # with load_from: weights only (a fresh optimizer, schedule
    # and data position)
    verify: bool = True  # check each file's sha256 against the manifest before loading
    # key `checkpoint.async`: write the files in the background; a step waits only for the copy
    # to host memory (the field has another name: `async` is a Python keyword)
    async_save: bool = dataclasses.field(default=False, metadata={"key": "async"})


@dataclasses.dataclass
class LogConfig:
    interval: int = 1  # steps between metrics lines
    tensorboard: bool = True  # also write TensorBoard event files to run.dir/tensorboard (rank 0)
    wandb: bool = False  # also log to Weights & Biases (`pip install wandb`; rank 0; the same
    # run id after a resume)
    wandb_project: str = "tessera"  # W&B project
    wandb_entity: str | None = None  # W&B entity (team); None: your default entity
    wandb_mode: str | None = None  # online | offline | disabled; None: wandb's own default
    # (the WANDB_MODE environment variable)
    peak_tflops: float | None = None  # one device's peak TFLOP/s for throughput/mfu; None:
    # looked up by CUDA device name (bf16 dense; H100/H200: 989), no MFU on CPU
    loss_spike_factor: float = 3.0  # warn when a step's loss exceeds this times the mean of the
    # previous 100 finite losses (counted in train/loss_spikes); 0: off


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
    resilience: ResilienceConfig = dataclasses.field(default_factory=ResilienceConfig)


# ---------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> plain dict -> typed dataclasses


# Keys that were renamed: the old name is refused, naming the new one; a checkpoint's own
# config.yaml (`saved=True`) is read with the new names.
RENAMED_KEYS = {"train.eval_steps": "train.eval_batches"}  # HF's eval_steps is an interval


def load_config(path: str | Path | None, overrides: list[str] = (), saved: bool = False
                ) -> Config:
    """Merge a YAML file and `dotted.key=value` overrides (a leading `--` is accepted)."""
    layers = []
    if path is not None:
        layers.append(_load_file(Path(path)))
    overrides_layer, empty = _parse_overrides(overrides)
    layers.append(overrides_layer)
    merged = _resolved(layers)
    for old, new in RENAMED_KEYS.items():
        _rename(merged, old, new, refuse=not saved)
    return _build(Config, merged, prefix="", empty=empty)


def _load_file(path: Path) -> DictConfig:
    """The YAML mapping of a config file; anything else is refused in one line that says what
    the path or its content is."""
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config file {path} is {_file_kind(path)}, not a YAML file")
    try:
        # compose, not load: the top node's kind without expanding aliases (OmegaConf.load
        # bounds that); a bare `hello` would load as {hello: null}
        with path.open(encoding="utf-8") as file:
            top = yaml.compose(file, Loader=yaml.SafeLoader)
        mapping = top is None or isinstance(top, yaml.MappingNode)
        loaded = OmegaConf.load(path) if mapping else None
    except (OmegaConfBaseException, ValueError, OSError, yaml.YAMLError) as e:
        reason = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ConfigError(f"{path}: not valid YAML ({reason})") from None
    if loaded is None:
        what = "a list" if isinstance(top, yaml.SequenceNode) else f"the single value {top.value!r}"
        raise ConfigError(f"{path}: the top level must be a mapping of sections (run:, model:, "
                          f"train:, ...), not {what}")
    return loaded


def _file_kind(path: Path) -> str:
    """'a directory', 'a character device', ... for a path that exists but is no regular file."""
    mode = path.stat().st_mode
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
             (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _resolved(layers: list[DictConfig]) -> dict:
    """The layers merged, interpolations (`${train.lr}`) resolved. They resolve against the
    defaults too, so that a key may name one the YAML and the overrides leave out."""
    try:
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot merge the config: {_omegaconf_reason(e)}") from None
    if _has_interpolation(merged):
        try:
            merged = OmegaConf.merge(OmegaConf.create(_as_dict(Config())), merged)
        except (OmegaConfBaseException, TypeError, ValueError):
            pass  # a section that is not a mapping: _build names it
    try:
        return OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        key = f"config key '{e.full_key}': " if getattr(e, "full_key", None) else ""
        raise ConfigError(f"{key}cannot resolve it: {_omegaconf_reason(e)}") from None


def _has_interpolation(config: DictConfig) -> bool:
    """Some value is `${...}` (a string holding `${` that is no interpolation only costs the
    merge onto the defaults)."""
    return "${" in OmegaConf.to_yaml(config)


def _omegaconf_reason(error: OmegaConfBaseException) -> str:
    """The first line of an OmegaConf error (the lines after it restate the key and types)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()),
                type(error).__name__)


def _rename(values: dict, old: str, new: str, refuse: bool) -> None:
    section, old_leaf = old.split(".")
    entries = values.get(section)
    if not isinstance(entries, dict) or old_leaf not in entries:
        return
    if refuse:
        raise ConfigError(f"config key '{old}' is now '{new}'; rename it")
    entries[new.split(".")[1]] = entries.pop(old_leaf)


def _parse_overrides(overrides: list[str]) -> tuple[DictConfig, frozenset[str]]:
    """The overrides as one layer, and the keys given an empty value (`run.dir=`), which
    OmegaConf reads as null: a key that cannot be null is then said to be empty."""
    items = []
    for raw in overrides:
        item = raw[2:] if raw.startswith("--") else raw
        if "=" not in item:
            raise ConfigError(f"override {raw!r} is not of the form dotted.key=value "
                              f"(e.g. train.steps=100; no spaces around '=')")
        items.append(item)
    empty = frozenset(key for key, _, value in (item.partition("=") for item in items)
                      if not value.strip())
    try:
        return OmegaConf.from_dotlist(items), empty
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {items}: {_omegaconf_reason(e)}") from e


def _build(cls: type, values: dict, prefix: str, empty: frozenset[str] = frozenset()) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    fields = {_key(f): f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + str(key), prefix, list(fields)))
    kwargs = {}
    for name, value in values.items():
        key = prefix + name
        field_name = fields[name].name
        hint = hints[field_name]
        if dataclasses.is_dataclass(hint):
            kwargs[field_name] = _build(hint, value, key + ".", empty)
        else:
            kwargs[field_name] = _coerce(key, value, hint, given_empty=key in empty)
    return cls(**kwargs)


def _key(field: dataclasses.Field) -> str:
    """A field's config key: its name, or metadata["key"] where the key is a Python keyword."""
    return field.metadata.get("key", field.name)


def _as_dict(obj: Any) -> dict:
    """dataclasses.asdict with config keys (the inverse of _build)."""
    out = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        nested = dataclasses.is_dataclass(value)
        out[_key(field)] = _as_dict(value) if nested else copy.deepcopy(value)
    return out


def _unknown_key_message(key: str, prefix: str, valid: list[str]) -> str:
    leaf = key[len(prefix) :]
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    section = prefix.rstrip(".") or "the top level"
    return f"unknown config key '{key}'{hint} (valid keys in {section}: {', '.join(valid)})"


def _coerce(key: str, value: Any, hint: Any, given_empty: bool = False) -> Any:
    """Check `value` against a field's annotation; ints widen to float, nothing else converts.
    `given_empty`: an override left the value empty (which OmegaConf reads as null)."""
    if hint is Any:
        return value
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        if given_empty:
            raise ConfigError(f"config key '{key}' is empty; it must be {_type_name(hint)}")
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
    return OmegaConf.to_yaml(OmegaConf.create(_as_dict(cfg)))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))


# ---------------------------------------------------------------------------------------------
# Cross-field checks


RAMP_KEYS = ("start", "increment", "samples")


def batch_sizes(t: TrainConfig) -> BatchSizes:
    """The global batch of each step (train.batch_size_ramp), after `validate`."""
    ramp = t.batch_size_ramp
    if ramp is None:
        return BatchSizes(t.global_batch_size)
    return BatchSizes(t.global_batch_size, ramp["start"], ramp["increment"], ramp["samples"])


def _check_ramp(t: TrainConfig) -> None:
    ramp = t.batch_size_ramp
    if ramp is None:
        return
    key = "train.batch_size_ramp"
    _check(isinstance(ramp, dict) and sorted(ramp) == sorted(RAMP_KEYS)
           and all(isinstance(ramp[k], int) and not isinstance(ramp[k], bool) for k in RAMP_KEYS),
           key, f"must be null or {{start: N, increment: N, samples: N}} (integers), got {ramp!r}")
    start, increment, samples = (ramp[k] for k in RAMP_KEYS)
    _check(1 <= start < t.global_batch_size, key,
           f"start {start} must be at least 1 and below train.global_batch_size "
           f"{t.global_batch_size}")
    _check(increment >= 1 and (t.global_batch_size - start) % increment == 0, key,
           f"increment {increment} must step from start {start} to train.global_batch_size "
           f"{t.global_batch_size}")
    _check(samples >= 0, key, f"samples must be >= 0, got {samples}")
    for batch in batch_sizes(t).sizes():
        _check(batch % t.micro_batch_size == 0, key,
               f"the ramp's global batch {batch} is not divisible by train.micro_batch_size="
               f"{t.micro_batch_size}")


def _check_schedule(t: TrainConfig) -> None:
    _check(t.lr_schedule in ("cosine", "wsd", "constant"), "train.lr_schedule",
           f"must be cosine, wsd or constant, got {t.lr_schedule!r}")
    _check(t.decay_shape in ("linear", "1-sqrt"), "train.decay_shape",
           f"must be linear or 1-sqrt, got {t.decay_shape!r}")
    if t.lr_schedule != "wsd":
        _check(t.decay_steps == 0, "train.decay_steps",
               f"{t.decay_steps} is for lr_schedule=wsd; {t.lr_schedule} does not use it")
        return
    _check(t.decay_steps >= 1, "train.decay_steps",
           f"lr_schedule=wsd needs the length of its final decay (>= 1), got {t.decay_steps}")
    _check(t.decay_steps <= t.steps - t.warmup_steps, "train.decay_steps",
           f"{t.decay_steps} is larger than train.steps - train.warmup_steps = "
           f"{t.steps} - {t.warmup_steps}")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Checks that need several fields; `world_size` adds the layout checks when known."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    _check_numbers(cfg)  # first: the checks below divide by some of them
    _check(cfg.run.dir.strip() != "", "run.dir",
           "is empty; give the run directory (e.g. runs/my-run)")
    _check(m.head_dim is not None or m.hidden_size % m.num_heads == 0, "model.hidden_size",
           f"{m.hidden_size} is not divisible by model.num_heads={m.num_heads} (or set "
           f"model.head_dim)")
    for key, problem in model_problems(m):
        _check(False, key, problem)
    _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
           f"{m.num_kv_heads} does not divide model.num_heads={m.num_heads}")
    _check(m.head_size % 2 == 0, "model.hidden_size",
           f"head size {m.head_size} must be even for rotary embeddings")
    _check(m.num_heads % p.tp == 0, "parallel.tp",
           f"tp={p.tp} does not divide model.num_heads={m.num_heads}")
    _check(m.num_kv_heads % p.tp == 0, "parallel.tp",
           f"tp={p.tp} does not divide model.num_kv_heads={m.num_kv_heads}")
    _check(m.ffn_hidden_size % p.tp == 0, "parallel.tp",
           f"tp={p.tp} does not divide model.ffn_hidden_size={m.ffn_hidden_size}")
    _check(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage",
           f"must be 0, 1, 2 or 3, got {p.zero_stage}")
    _check(p.pp == 1 or p.zero_stage <= 1, "parallel.zero_stage",
           f"ZeRO stage {p.zero_stage} with pp={p.pp}: DeepSpeed's pipeline engine supports only "
           f"stages 0 and 1")
    _check(p.pp <= m.num_layers, "parallel.pp",
           f"pp={p.pp} exceeds model.num_layers={m.num_layers}")
    _check_partition(cfg)
    if p.sequence_parallel:
        _check(p.tp > 1, "parallel.sequence_parallel", "needs tensor parallelism (parallel.tp > 1)")
        _check(m.seq_len % p.tp == 0, "parallel.sequence_parallel",
               f"model.seq_len={m.seq_len} must be divisible by parallel.tp={p.tp}")
    _check(t.activation_checkpointing in ("none", "full"), "train.activation_checkpointing",
           f"must be none or full, got {t.activation_checkpointing!r}")
    _check(t.loss_chunk_tokens >= 0, "train.loss_chunk_tokens",
           f"must be >= 0 (0: no chunks), got {t.loss_chunk_tokens}")
    _check(t.precision in ("fp32", "bf16"), "train.precision",
           f"must be fp32 or bf16, got {t.precision!r}")
    _check(math.isfinite(t.grad_clip) and t.grad_clip >= 0, "train.grad_clip",
           f"must be >= 0 (0 turns clipping off), got {t.grad_clip}")
    _check(0 <= t.min_lr <= t.lr, "train.min_lr",
           f"{t.min_lr} must lie between 0 and train.lr={t.lr}")
    _check(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _check(t.stop_at is None or t.stop_at >= 1, "train.stop_at",
           f"must be >= 1 (or null), got {t.stop_at}")
    _check_schedule(t)
    _check_ramp(t)
    _check(t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size",
           f"{t.global_batch_size} is not divisible by train.micro_batch_size={t.micro_batch_size}")
    _check(cfg.checkpoint.interval >= 0, "checkpoint.interval",
           f"must be >= 0, got {cfg.checkpoint.interval}")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last",
           f"must be >= 1, got {cfg.checkpoint.keep_last}")
    _check(cfg.checkpoint.keep_every >= 0, "checkpoint.keep_every",
           f"must be >= 0 (0: none), got {cfg.checkpoint.keep_every}")
    _check(not cfg.checkpoint.load_weights_only or cfg.checkpoint.load_from,
           "checkpoint.load_weights_only", "true needs checkpoint.load_from (the checkpoint whose "
           "weights the run starts from)")
    _check(m.max_positions is None or m.max_positions >= m.seq_len, "model.max_positions",
           f"{m.max_positions} is below model.seq_len={m.seq_len}: an export would declare a "
           f"context shorter than the one trained; raise it, or set null (seq_len)")
    _check(cfg.data.num_workers >= 0, "data.num_workers",
           f"must be >= 0, got {cfg.data.num_workers}")
    _check(cfg.launch.backend in ("auto", "gloo",
           "nccl"), "launch.backend", f"must be auto, gloo or nccl, got {cfg.launch.backend!r}")
    shards = cfg.data.shards
    _check(_paths_or_none(shards),
           "data.shards", f"must be a path, a pattern or a list of them, got {shards!r}")
    _check_slurm(cfg.slurm)
    _check_resilience(cfg.resilience)
    _check_observability(cfg)
    if world_size is not None:
        validate_layout(cfg, world_size)


# Flags that have their own slurm.* key (or that submitit sets); not accepted in sbatch_options.
_MANAGED_SBATCH_FLAGS = ("partition", "time", "nodes", "ntasks-per-node", "gpus-per-node",
                         "cpus-per-task", "mem", "account", "qos", "constraint", "job-name",
                         "signal", "output", "error")


def _check_slurm(s: SlurmConfig) -> None:
    _check(s.launcher in ("srun", "torchrun"), "slurm.launcher",
           f"must be srun or torchrun, got {s.launcher!r}")
    for key, least in [("nodes", 1), ("tasks_per_node", 1), ("gpus_per_node", 0), ("time_min", 1),
                       ("signal_lead_s", 0), ("max_requeues", 0)]:
        value = getattr(s, key)
        _check(value >= least, f"slurm.{key}", f"must be at least {least}, got {value}")
    _check(s.cpus_per_task is None or s.cpus_per_task >= 1, "slurm.cpus_per_task",
           f"must be at least 1, got {s.cpus_per_task}")
    _check(s.mem_gb is None or s.mem_gb > 0, "slurm.mem_gb", f"must be positive, got {s.mem_gb}")
    name = s.signal.strip().upper()
    _check((name if name.startswith("SIG") else "SIG" + name) in signal.Signals.__members__,
           "slurm.signal", f"{s.signal!r} is not a signal name (e.g. USR1, USR2, TERM)")
    _check(s.signal_lead_s < min(s.time_min * 60, 65536), "slurm.signal_lead_s",
           f"{s.signal_lead_s} s must be shorter than slurm.time_min ({s.time_min} min) and 65536 "
           f"s")
    options = s.sbatch_options
    _check(isinstance(options, dict), "slurm.sbatch_options",
           f"must map sbatch flags to values, got {options!r}")
    for flag, value in options.items():
        _check_sbatch_option(flag, value)
    _check(isinstance(s.setup, list) and all(isinstance(line, str) for line in s.setup),
           "slurm.setup", f"must be a list of shell lines, got {s.setup!r}")


# an sbatch long option without its leading --: `#SBATCH --{flag}={value}` in the script
_SBATCH_FLAG = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def _check_sbatch_option(flag: Any, value: Any) -> None:
    """One `#SBATCH --flag=value` line. sbatch stops reading #SBATCH lines at the first line
    that is not one, so a flag with a space or a value with a newline would end the header and
    silently drop every option after it (--time, --nodes, ...)."""
    key = f"slurm.sbatch_options.{flag}"
    _check(isinstance(flag, str) and _SBATCH_FLAG.fullmatch(flag) is not None, key,
           "not an sbatch long option: letters, digits, '-' and '_', without the leading --")
    _check(flag.replace("_", "-") not in _MANAGED_SBATCH_FLAGS, key,
           "has its own key under slurm (or is set by submit)")
    _check(isinstance(value, (str, int, float, bool)), key,
           f"must be a single value (a string, number or true), got {value!r}")
    _check(not isinstance(value, str) or not any(c in value for c in "\n\r"), key,
           f"must be one line, got {value!r}")


def _check_resilience(r: ResilienceConfig) -> None:
    _check(r.hang_timeout_s == 0 or r.hang_timeout_s >= MIN_HANG_TIMEOUT_S,
           "resilience.hang_timeout_s", f"{r.hang_timeout_s} s is too short to tell a hang from a "
           f"slow step: at least {MIN_HANG_TIMEOUT_S} s (or 0: off)")
    _check(r.straggler_factor == 0 or r.straggler_factor > 1, "resilience.straggler_factor",
           f"must be above 1 (or 0: off), got {r.straggler_factor}")
    _check(r.max_restarts >= 0, "resilience.max_restarts",
           f"must be >= 0 (0: no restart), got {r.max_restarts}")
    _check(r.exclude_after >= 0, "resilience.exclude_after",
           f"must be >= 0 (0: never exclude), got {r.exclude_after}")


def _check_observability(cfg: Config) -> None:
    """Evaluation, non-finite steps and logging."""
    t, log = cfg.train, cfg.log
    _check(t.eval_interval >= 0, "train.eval_interval",
           f"must be >= 0 (0: only at the end), got {t.eval_interval}")
    _check(t.eval_batches >= 1, "train.eval_batches", f"must be at least 1, got {t.eval_batches}")
    _check(t.max_nonfinite_steps >= 0, "train.max_nonfinite_steps",
           f"must be >= 0, got {t.max_nonfinite_steps}")
    _check(log.loss_spike_factor == 0 or log.loss_spike_factor > 1, "log.loss_spike_factor",
           f"must be above 1 (or 0: off), got {log.loss_spike_factor}")
    _check(log.peak_tflops is None or log.peak_tflops > 0, "log.peak_tflops",
           f"must be positive (or null: look up by device name), got {log.peak_tflops}")
    _check(log.wandb_mode in (None, "online", "offline", "disabled"), "log.wandb_mode",
           f"must be online, offline, disabled or null, got {log.wandb_mode!r}")
    valid = cfg.data.valid_shards
    _check(_paths_or_none(valid),
           "data.valid_shards", f"must be a path, a pattern or a list of them, got {valid!r}")


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


def validate_layout(cfg: Config, world_size: int,
                    ranks_from: str = "launch.nproc_per_node x nodes") -> None:
    """`ranks_from`: the keys that set the rank count where the job runs (under Slurm's srun
    launcher, slurm.tasks_per_node x slurm.nodes)."""
    p, t = cfg.parallel, cfg.train
    model_parallel = p.tp * p.pp
    _check(world_size % model_parallel == 0, "parallel.tp",
           f"world size {world_size} is not divisible by tp*pp = {p.tp}*{p.pp} = {model_parallel}; "
           f"run a multiple of {model_parallel} ranks ({ranks_from}) or change "
           f"parallel.tp / parallel.pp")
    dp = world_size // model_parallel
    _check(t.global_batch_size % (t.micro_batch_size * dp) == 0, "train.global_batch_size",
           f"{t.global_batch_size} is not divisible by train.micro_batch_size*dp = "
           f"{t.micro_batch_size}*{dp} (dp = world {world_size} / (tp*pp)); make it a multiple "
           f"of {t.micro_batch_size * dp} or lower train.micro_batch_size")
    for batch in batch_sizes(t).sizes():
        _check(batch % (t.micro_batch_size * dp) == 0, "train.batch_size_ramp",
               f"the ramp's global batch {batch} is not divisible by train.micro_batch_size*dp = "
               f"{t.micro_batch_size}*{dp}: every step is whole micro-batches on every rank")


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // (cfg.parallel.tp * cfg.parallel.pp)


def _check_numbers(cfg: Config) -> None:
    """Every count at least 1, every size of something positive, betas in [0, 1): a value out
    of range fails here, not minutes later inside DeepSpeed or torch."""
    m, p, t, d = cfg.model, cfg.parallel, cfg.train, cfg.data
    at_least_1 = {
        "model.hidden_size": m.hidden_size, "model.num_layers": m.num_layers,
        "model.num_heads": m.num_heads, "model.num_kv_heads": m.num_kv_heads,
        "model.ffn_hidden_size": m.ffn_hidden_size, "model.seq_len": m.seq_len,
        "parallel.tp": p.tp, "parallel.pp": p.pp, "train.steps": t.steps,
        "train.global_batch_size": t.global_batch_size,
        "train.micro_batch_size": t.micro_batch_size, "log.interval": cfg.log.interval,
        "launch.nproc_per_node": cfg.launch.nproc_per_node,
        "data.max_consecutive_errors": d.max_consecutive_errors,
    }
    if m.vocab_size is not None:
        at_least_1["model.vocab_size"] = m.vocab_size
    if d.streams is not None:
        at_least_1["data.streams"] = d.streams
    for key, value in at_least_1.items():
        _check(value >= 1, key, f"must be at least 1, got {value}")
    positive = {"model.rope_theta": m.rope_theta, "model.norm_eps": m.norm_eps,
                "model.init_std": m.init_std, "train.lr": t.lr, "train.adam_eps": t.adam_eps}
    for key, value in positive.items():
        _check(math.isfinite(value) and value > 0, key, f"must be a positive number, got {value}")
        _check(value <= FLOAT32_MAX, key, f"{value} is above float32's largest number "
                                          f"({FLOAT32_MAX:.4g}), in which it is computed")
    for key, value in (("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)):
        _check(0 <= value < 1, key, f"must lie in [0, 1), got {value}")
    _check(math.isfinite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay",
           f"must be >= 0, got {t.weight_decay}")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer",
           f"must be >= 0 (0: off), got {d.shuffle_buffer}")
    _check(cfg.run.seed >= 0, "run.seed", f"must be >= 0, got {cfg.run.seed}")


def _paths_or_none(value: Any) -> bool:
    """A path or pattern, a list of them, or null."""
    return value is None or isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(item, str) for item in value))


FLOAT32_MAX = 3.4028234663852886e38


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")
