"""Reading: manifests checked (names confined to the checkpoint, sizes before hashes), the
checkpoint's fit with the current config, resume with fallback to the newest valid one, and
loading (full state or weights only)."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
import torch.distributed as dist

from tessera import __version__
from tessera.data.format import TokenizerInfo
from tessera.data.tokenizer import (
    HF_TOKENIZER_FILE,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    find_tokenizer,
    json_text,
    load_tokenizer,
)
from tessera.parallel.engine import Engine
from tessera.parallel.mcore import parallel_state
from tessera.trainer.checkpoint.engine import checkpoint_engine
from tessera.trainer.checkpoint.files import file_sha256, safe_load
from tessera.trainer.checkpoint.format import (
    ARCHITECTURE_FIELDS,
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    LATEST_FILE,
    MANIFEST_FILE,
    SHA256_RE,
    STATE_FILE,
    TOKENIZER_DIR,
    TOKENIZER_INFO,
    CarriedTokenizer,
    CheckpointError,
    committed_steps,
    is_count,
    rank,
    read_latest,
    step_of,
    tag_for,
    train_state_problem,
    warn,
)
from tessera.trainer.checkpoint.rng import restore_rng_at_first_forward
from tessera.trainer.checkpoint.save import canonical_shapes
from tessera.trainer.config import Config, ConfigError, load_config
from tessera.trainer.memory import is_out_of_memory


def carried_tokenizer(directory: str | Path) -> CarriedTokenizer | None:
    """The tokenizer a committed checkpoint carries, its files checked against the manifest;
    None for a checkpoint saved without one."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if TOKENIZER_INFO not in manifest["files"]:
        return None
    files = [TOKENIZER_INFO]
    try:
        info = TokenizerInfo(**json.loads((directory / TOKENIZER_INFO).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{directory / TOKENIZER_INFO}: unreadable ({e})") from e
    if info.kind not in ("bytes", "hf"):
        raise CheckpointError(f"{directory / TOKENIZER_INFO}: unknown tokenizer kind {info.kind!r}")
    # The file is always ours, whatever info.json names: nothing outside the checkpoint is read.
    info = dataclasses.replace(info, file=HF_TOKENIZER_FILE if info.kind == "hf" else None)
    if info.kind == "hf":
        files.append(f"{TOKENIZER_DIR}/{HF_TOKENIZER_FILE}")
    for relative in files:
        entry = manifest["files"].get(relative)
        problem = "not listed in the manifest" if entry is None else \
            check_file(directory, relative, entry, checksum=True)
        if problem:
            raise CheckpointError(problem if entry else f"{directory / relative}: {problem}")
    text = (directory / files[1]).read_text() if len(files) > 1 else None
    return info, text


def check_same_tokenizer(directory: str | Path, data: CarriedTokenizer | None) -> None:
    """Collective: checkpoint.load_from's weights were trained on the token ids of the tokenizer
    the checkpoint carries; data prepared with another one would feed them other text for the
    same ids, and train without a word. Rank 0 compares (`data` is the data's tokenizer there)
    and every rank raises its verdict, rather than leave the others in their next collective.
    A checkpoint that carries none (an import without one) is taken on trust, as is any
    where rank 0 has no `data` to compare it with."""
    verdict = [_tokenizer_mismatch(directory, data) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise CheckpointError(verdict[0])


def _tokenizer_mismatch(directory: str | Path, data: CarriedTokenizer | None) -> str | None:
    carried = None if data is None else carried_tokenizer(directory)
    if carried is None or _token_ids_of(carried) == _token_ids_of(data):
        return None
    return (
        f"checkpoint.load_from: {directory} was trained with another tokenizer than the one "
        f"data.shards was prepared with ({_described(carried)} vs {_described(data)}): the same "
        f"token ids would mean other text; prepare the data with `tessera prepare ... "
        f"--tokenizer {directory}`"
    )


# Text in several scripts, code and numbers: two tokenizers that give it the same ids are taken
# for the same (what a JSON layout, or a byte tokenizer written as tokenizer.json, cannot tell)
PROBE_TEXT = ("The quick brown fox, 1234567 jumps; def f(x): return x ** 2  # ok\n"
              "Größe, naïve café — 東京の天気は晴れ。Привет, мир! مرحبا 🙂\t</s><|endoftext|>")


def _token_ids_of(tokenizer: CarriedTokenizer) -> tuple:
    """What tells tokenizers apart: vocabulary size, EOS, and the ids of PROBE_TEXT."""
    info, text = tokenizer
    try:
        encoder = (ByteTokenizer() if text is None
                   else HFTokenizer.from_str(text, eos_id=info.eos_id))
        probe = tuple(encoder.encode(PROBE_TEXT))
    except Exception:  # noqa: BLE001 - a tokenizer.json tokenizers cannot read: unlike any other
        probe = None
    return info.vocab_size, info.eos_id, probe


def _described(tokenizer: CarriedTokenizer) -> str:
    info, _ = tokenizer
    return f"{info.kind}, vocabulary {info.vocab_size}, EOS {info.eos_id}"


def tokenizer_of(step_dir: Path, override: str | None = None) -> Tokenizer:
    """`override` (a tokenizer.json or a directory with one, from the user's command line),
    else the tokenizer the checkpoint carries. An override that tokenizes otherwise than the
    carried one is refused: the model would read and write other text for its ids. Nothing the
    checkpoint's config names (its data paths, which may be `pipe:` commands) is ever opened."""
    if override is not None:
        chosen = find_tokenizer(override)
        _check_override(step_dir, override, chosen)
        return chosen
    carried = carried_tokenizer(step_dir)
    if carried is None:
        raise CheckpointError(
            f"{step_dir}: the checkpoint carries no tokenizer (saved by an older Tessera, or "
            f"imported without one); pass --tokenizer with the prepared data directory or its "
            f"tokenizer.json"
        )
    info, _ = carried
    return load_tokenizer(info, step_dir / TOKENIZER_DIR)


def _check_override(step_dir: Path, override: str, chosen: Tokenizer) -> None:
    """The tokenizer --tokenizer names tokenizes as the one the checkpoint carries, if any."""
    carried = carried_tokenizer(step_dir)
    given = (chosen.info(), json_text(chosen))
    if carried is not None and _token_ids_of(carried) != _token_ids_of(given):
        raise CheckpointError(
            f"--tokenizer {override}: another tokenizer than the one {step_dir} was trained "
            f"with ({_described(given)} vs {_described(carried)}); leave --tokenizer out to "
            f"use the checkpoint's"
        )


def saved_config(directory: str | Path) -> Config:
    """The config a checkpoint was saved with (its config.yaml)."""
    path = Path(directory) / CONFIG_FILE
    try:
        return load_config(path, [], saved=True)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing; the directory is not a committed checkpoint"
        ) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a Tessera checkpoint manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {manifest.get('format_version')} is not "
            f"{FORMAT_VERSION} (Tessera {__version__})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}: lists no files")
    for name, entry in files.items():
        problem = _entry_problem(name, entry)
        if problem:
            raise CheckpointError(f"{path}: file entry {name!r} {problem}")
    problem = _layout_problem(manifest.get("layout"), files) or _model_problem(manifest)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    expected_step = step_of(Path(directory).name)
    if expected_step is not None and manifest.get("step") != expected_step:
        raise CheckpointError(
            f"{path}: says step {manifest.get('step')}, the directory step {expected_step}"
        )
    return manifest


def _entry_problem(name: str, entry: Any) -> str | None:
    """What is wrong with a manifest's file entry: the name must be a plain relative path inside
    the checkpoint (no `..`, no absolute or empty parts), the size a count, the hash 64 hex."""
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        return "is not a plain relative path inside the checkpoint"
    if not isinstance(entry, dict) or not is_count(entry.get("bytes")):
        return "has no byte count"
    if not isinstance(entry.get("sha256"), str) or not SHA256_RE.fullmatch(entry["sha256"]):
        return "has no sha256"
    return None


def _layout_problem(layout: Any, files: dict) -> str | None:
    """What is wrong with a manifest's layout: rank counts that are not counts or do not
    multiply, a ZeRO stage outside 0-3, or ranks without their files (every rank of a save
    writes rng/rank-NNNNN.pt), so that no reader trusts a layout larger than the files."""
    if not isinstance(layout, dict):
        return "'layout' is not an object"
    for key in ("world_size", "tp", "pp", "dp"):
        if not is_count(layout.get(key), least=1):
            return f"layout.{key} is not a count of ranks: {layout.get(key)!r}"
    if not is_count(layout.get("zero_stage")) or layout["zero_stage"] > 3:
        return f"layout.zero_stage is not 0-3: {layout.get('zero_stage')!r}"
    world = layout["world_size"]
    if layout["tp"] * layout["pp"] * layout["dp"] != world:
        return f"layout: tp x pp x dp is not its world_size {world}"
    if world > len(files):
        return f"layout: {world} ranks, but the manifest lists {len(files)} files"
    missing = next((r for r in range(world) if f"rng/rank-{r:05d}.pt" not in files), None)
    if missing is not None:
        return f"lists no rng/rank-{missing:05d}.pt: rank {missing} of {world} saved nothing"
    return None


def _model_problem(manifest: dict) -> str | None:
    if not isinstance(manifest.get("model", {}), dict):
        return "'model' is not an object"
    tensors = manifest.get("tensors", {})
    if not isinstance(tensors, dict) or not all(isinstance(v, list) for v in tensors.values()):
        return "'tensors' is not an object of shapes"
    return None


def read_state(directory: str | Path) -> dict:
    """A committed checkpoint's tessera_state.json, checked: a "train" object that reads back
    into a TrainState at the manifest's step, a "data" object where there is one."""
    directory = Path(directory)
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not an object")
    problem = train_state_problem(state.get("train"))
    if problem is None and not isinstance(state.get("data", {}), dict):
        problem = "'data' is not an object"
    step = read_manifest(directory)["step"]
    if problem is None and state["train"].get("step", 0) != step:
        problem = f"train.step {state['train'].get('step', 0)} is not the manifest's step {step}"
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return state


def check_file(directory: Path, relative: str, entry: dict, checksum: bool) -> str | None:
    """None if the file matches its manifest entry, else what is wrong (naming the file). Only a
    regular file inside `directory` matches: no link, device or fifo (a hash of /dev/zero
    never ends); the size is compared before any byte is hashed."""
    path = directory / relative
    try:
        info = path.lstat()
    except OSError:
        return f"{path}: missing"
    if not stat.S_ISREG(info.st_mode):
        return f"{path}: not a regular file (a link, directory or device)"
    if not path.resolve().is_relative_to(directory.resolve()):
        return f"{path}: lies outside the checkpoint (through a linked directory)"
    size = info.st_size
    if size != entry["bytes"]:
        return f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or rewritten)"
    if checksum and file_sha256(path) != entry["sha256"]:
        return f"{path}: sha256 does not match the manifest (the file is corrupt)"
    return None


def problems(
    directory: str | Path, checksum: bool = True, share: tuple[int, int] = (0, 1)
) -> list[str]:
    """What makes `directory` unusable (empty: valid). `share` = (index, count) checks only every
    count-th file from index, so that ranks can split the work."""
    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except CheckpointError as e:
        return [str(e)]
    index, count = share
    found = []
    if index == 0:  # a tensor file the manifest does not vouch for could still be read
        listed = set(manifest["files"])
        found += [
            f"{path}: not listed in the manifest"
            for path in sorted(directory.rglob("*.pt"))
            if path.relative_to(directory).as_posix() not in listed
        ]
        try:  # a state that is no training state reads as a fresh start: fall back instead
            read_state(directory)
        except CheckpointError as e:
            found.append(str(e))
    for relative, entry in sorted(manifest["files"].items())[index::count]:
        problem = check_file(directory, relative, entry, checksum)
        if problem:
            found.append(problem)
    return found


def problems_collective(directory: Path, checksum: bool) -> list[str]:
    """Collective: the ranks split the files, and all get the same list of problems."""
    mine = problems(directory, checksum, share=(dist.get_rank(), dist.get_world_size()))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return sorted({p for rank_problems in everyone for p in rank_problems})


def _model_differences(manifest: dict, cfg: Config, module: torch.nn.Module) -> list[str]:
    # a field the checkpoint does not name (saved before it existed) has its default
    saved = {**dataclasses.asdict(type(cfg.model)()), **manifest.get("model", {})}
    current = dataclasses.asdict(cfg.model)
    diffs = [
        f"model.{key}: checkpoint {saved.get(key)!r}, config {current[key]!r}"
        for key in ARCHITECTURE_FIELDS
        if saved.get(key) != current[key]
    ]
    if diffs:
        return diffs
    saved_shapes, shapes = manifest.get("tensors", {}), canonical_shapes(module)
    for name in sorted(set(saved_shapes) | set(shapes)):
        if name not in shapes:
            diffs.append(f"tensor {name}: in the checkpoint, not in the model")
        elif name not in saved_shapes:
            diffs.append(f"tensor {name}: in the model, not in the checkpoint")
        elif saved_shapes[name] != shapes[name]:
            diffs.append(f"tensor {name}: checkpoint {saved_shapes[name]}, model {shapes[name]}")
    return diffs


def _layout_differences(manifest: dict, cfg: Config, weights_only: bool) -> list[str]:
    saved = manifest.get("layout", {})
    world = dist.get_world_size()
    current = {
        "tp": cfg.parallel.tp,
        "pp": cfg.parallel.pp,
        "dp": world // (cfg.parallel.tp * cfg.parallel.pp),
        "zero_stage": cfg.parallel.zero_stage,
    }
    keys = ["tp", "pp"]
    if weights_only:
        if saved.get("zero_stage") == 3:  # its model files hold partitions, not whole tensors
            return [
                (
                    "zero_stage: a ZeRO-3 checkpoint holds no whole weights to load alone "
                    "(convert it first with `tessera convert reshard`)"
                )
            ]
    else:
        keys.append("zero_stage")
        if current["zero_stage"] > 0 or saved.get("zero_stage", 0) > 0:
            keys.append("dp")  # ZeRO's optimizer partitions follow dp
    labels = {"dp": "data-parallel size (world / (tp*pp))"}
    return [
        f"{labels.get(k, 'parallel.' + k)}: checkpoint {saved.get(k)}, now {current[k]}"
        for k in keys
        if saved.get(k) != current[k]
    ]


def check_compatible(directory: Path, manifest: dict, cfg: Config, module: torch.nn.Module,
                     weights_only: bool) -> None:
    diffs = _model_differences(manifest, cfg, module)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise CheckpointError(f"{directory} was saved for another model: {shown}; set the "
                              f"model keys as its {CONFIG_FILE} has them, or train in a new "
                              f"run.dir")
    diffs = _layout_differences(manifest, cfg, weights_only)
    if diffs:
        raise CheckpointError(
            f"{directory} was saved at another parallel layout ({'; '.join(diffs)}); "
            f"reshard it with `tessera convert reshard {directory} OUT_DIR ...` and load that"
        )


def _candidates(root: Path) -> tuple[list[Path], str | None]:
    """Checkpoints to try, in order: the one `latest` names, then the others newest first.
    Also a note when `latest` is missing or names no committed checkpoint."""
    steps = committed_steps(root)
    latest = read_latest(root)
    ordered = [root / tag_for(s) for s in reversed(steps)]
    note = None
    if latest is not None and (root / latest) in ordered:
        ordered.remove(root / latest)
        ordered.insert(0, root / latest)
    elif ordered:
        why = (
            "is missing or names no step" if latest is None
            else f"names {latest}, which is not a committed checkpoint"
        )
        note = f"{root / LATEST_FILE} {why}"
    return ordered, note


def _first_valid(candidates: list[Path], note: str | None, checksum: bool,
                 check: Callable[[Path, bool], list[str]] = problems_collective) -> Path:
    """Collective (unless `check` is not): the first candidate without problems; warns for each
    one skipped."""
    rejected = []
    for directory in candidates:
        found = check(directory, checksum)
        if not found:
            if rank() == 0 and (rejected or note):
                reasons = "; ".join(([note] if note else []) + rejected)
                warn(f"{reasons}; loading {directory}, the newest valid checkpoint")
            return directory
        rejected.append(
            f"{directory} is not valid: {found[0]}"
            + (f" (and {len(found) - 1} more problems)" if len(found) > 1 else "")
        )
    more = f"; and {len(rejected) - 3} older ones" if len(rejected) > 3 else ""
    raise CheckpointError("no valid checkpoint to load: " + "; ".join(rejected[:3]) + more)


def _uncommitted_steps(root: Path) -> str:
    """With no committed checkpoint in `root`: what says checkpoints were there (`latest`, step
    directories without a manifest, linked ones, which resume never follows), or "" for a run
    that never committed one. Starting afresh there would delete them at the first save."""
    found = [f"{LATEST_FILE} names {read_latest(root) or 'no step'}"] \
        if (root / LATEST_FILE).exists() else []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if step_of(path.name) is not None:
            found.append(f"{path.name} is a link" if path.is_symlink()
                         else f"{path.name} has no {MANIFEST_FILE}")
    return "; ".join(found[:4]) + ("; ..." if len(found) > 4 else "")


def resolve_step_dir(path: str | Path) -> Path:
    """A step directory as given, or the newest committed one of a checkpoints directory or a
    run directory (what checkpoint.load_from and the commands take)."""
    path = Path(path)
    if (path / MANIFEST_FILE).exists():
        return path
    if path.exists() and not path.is_dir():
        raise CheckpointError(not_a_checkpoint_file(path))
    if step_of(path.name) is not None:
        if not path.is_dir():
            steps = committed_steps(path.parent)
            held = f"; {path.parent} holds steps {', '.join(map(str, steps))}" if steps else ""
            raise CheckpointError(f"{path} does not exist{held}")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        raise CheckpointError(f"{path} does not exist")
    candidates, _ = _candidates(root)
    if not candidates:
        raise CheckpointError(f"{path} holds no committed checkpoint")
    return candidates[0]


def valid_step_dir(path: str | Path, checksum: bool = True) -> Path:
    """A step directory as given, if valid; for a run or checkpoints directory, its newest valid
    checkpoint, as a resume takes it (a warning names each newer one skipped). Not collective:
    one process reads every file."""
    directory = resolve_step_dir(path)
    if directory != Path(path):  # the newest of a run or checkpoints directory
        return _first_valid(*_candidates(directory.parent), checksum, check=problems)
    found = problems(directory, checksum)
    if found:
        raise CheckpointError(f"{directory} is not a valid checkpoint: {found[0]}")
    return directory


def not_a_checkpoint_file(path: Path) -> str:
    """Why a file given for a checkpoint is none; for `latest`, the step directory it names."""
    if path.name == LATEST_FILE:
        tag = read_latest(path.parent)
        if tag is not None:
            return (f"{path} is a file, not a checkpoint directory: the pointer to the newest "
                    f"checkpoint, step {step_of(tag)} ({path.parent / tag}); give that "
                    f"directory, or {path.parent}")
    return f"{path} is a file, not a checkpoint directory"


def resume(engine: Engine, root: str | Path, cfg: Config,
           tokenizer: CarriedTokenizer | None = None) -> dict | None:
    """Collective: restore the newest valid checkpoint of this run, else `checkpoint.load_from`
    (whose tokenizer must be the data's: `tokenizer` on rank 0, see check_same_tokenizer).

    Returns the saved Tessera state ({"train", "data", "layout"}) plus "directory" for a full
    restore, only "directory" for a weights-only start, None when there is nothing to load.
    """
    root = Path(root)
    candidates, note = _candidates(root)
    if candidates:
        if cfg.checkpoint.load_from and rank() == 0:
            print(f"tessera: {root} has checkpoints: resuming them, not checkpoint.load_from")
        directory = _first_valid(candidates, note, cfg.checkpoint.verify)
        return load(engine, directory, cfg)
    orphans = _uncommitted_steps(root)
    if orphans:
        raise CheckpointError(
            f"{root} holds checkpoints but none committed ({orphans}): nothing was loaded or "
            f"deleted; restore them, train in another run.dir, or remove them to start afresh"
        )
    if cfg.checkpoint.load_from:
        try:
            directory = resolve_step_dir(cfg.checkpoint.load_from)
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint.load_from: {e}") from None
        found = problems_collective(directory, cfg.checkpoint.verify)
        if found:
            raise CheckpointError(f"checkpoint.load_from: {directory} is not valid: {found[0]}")
        check_same_tokenizer(directory, tokenizer)
        weights_only = cfg.checkpoint.load_weights_only
        return load(engine, directory, cfg, weights_only=weights_only)
    return None


def load(engine: Engine, directory: str | Path, cfg: Config, weights_only: bool = False) -> dict:
    """Collective: restore a verified checkpoint directory into `engine` (and this rank's RNG)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    check_compatible(directory, manifest, cfg, engine.module, weights_only)
    state = None if weights_only else read_state(directory)  # before DeepSpeed loads anything
    if weights_only and engine.zero_optimization_partition_weights():
        _load_weights_into_zero3(engine, directory)
        return {"directory": str(directory)}
    try:
        path, _ = engine.load_checkpoint(
            str(directory.parent),
            tag=directory.name,
            load_optimizer_states=not weights_only,
            load_lr_scheduler_states=not weights_only,
            load_module_only=weights_only,
        )
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError,
            AssertionError) as e:  # (DeepSpeed checks its files with assert)
        if is_out_of_memory(e):
            raise
        # files the manifest vouches for (re-signed by a tool or a hand) but not of this model
        raise CheckpointError(f"{directory}: its files do not load into the model: "
                              f"{_load_failure(e)}") from e
    finally:
        checkpoint_engine(engine).forget_loads()
    if path is None:
        raise CheckpointError(f"{directory}: DeepSpeed found no model files for this rank")
    if weights_only:
        if dist.get_rank() == 0:
            print(f"tessera: loaded the weights of {directory}", flush=True)
        return {"directory": str(directory)}
    rng_file = directory / "rng" / f"rank-{dist.get_rank():05d}.pt"
    if rng_file.is_file():
        restore_rng_at_first_forward(engine.module, safe_load(rng_file))
    note = restarted_rng_note(directory, manifest["layout"]["world_size"], dist.get_world_size())
    if note and dist.get_rank() == 0:
        warn(note)
    return {**state, "directory": str(directory)}


def _load_failure(error: Exception) -> str:
    """The last line of what DeepSpeed or torch said (it names the tensor), or the missing key."""
    if isinstance(error, KeyError):
        return f"no entry {error} in a file"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:400] if lines else type(error).__name__


def restarted_rng_note(directory: Path, saved_world: int, world: int) -> str | None:
    """What a resume by more ranks than saved says: the new ranks have no RNG state to restore
    (each rank restores its own file where there is one)."""
    if saved_world >= world:
        return None
    return (f"{directory} was saved by {saved_world} ranks, this run has {world}: the RNG "
            f"streams of ranks {saved_world} and up restart from the seed")


def _load_weights_into_zero3(engine: Engine, directory: Path) -> None:
    """Weights only into a ZeRO-3 engine. DeepSpeed's own path for this goes through
    zero_to_fp32, which unpickles with weights_only=False and reads the `latest` of the source
    instead of the chosen step; so: the source's whole tensors (its ZeRO stage is at most 2),
    loaded safely, copied in while DeepSpeed gathers the partitions, then DeepSpeed refreshes its
    fp32 master partitions (as its load_checkpoint does after a module-only load)."""
    path = (
        directory / f"mp_rank_{parallel_state.get_tensor_model_parallel_rank():02d}_model_states.pt"
    )
    tensors = safe_load(path)["module"]
    params = dict(engine.module.named_parameters())
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: holds no tensor for {', '.join(missing[:5])}")
    gathered = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0)
    with gathered, torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])
    engine.optimizer._restore_from_bit16_weights()
    if dist.get_rank() == 0:
        print(f"tessera: loaded the weights of {directory}", flush=True)


def latest_tag(root: str | Path) -> str | None:
    """The tag `latest` names if committed, else the newest committed one (not verified)."""
    candidates, _ = _candidates(Path(root))
    return candidates[0].name if candidates else None
