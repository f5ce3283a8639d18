"""Canonical (layout-independent) tensors of a checkpoint of any parallel layout, one at a time:
the weights and Adam's two moments.

A committed checkpoint holds DeepSpeed's own per-rank files. This module reads them directly and
reassembles every full tensor the model's `canonical_parts` describe: the weight (the fp32 master
copy where the optimizer keeps one) and the moments exp_avg and exp_avg_sq.

Why read the files rather than load engines in a process group of the original layout: reading
needs no processes, no accelerator and, files being memory-mapped, little more memory than the
tensor being assembled, so `tessera convert to-hf` runs anywhere for any original world size. The
local-to-full mapping is the model's own (`canonical_parts`, which initialization uses too), and
the metadata DeepSpeed records in its files (names, shapes, partition addresses) is checked
against it: a layout this module does not understand stops with an error, never wrong tensors.
Writing goes the other way (`fill`): real engines at the target layout take the tensors
and DeepSpeed writes its own format.

Where DeepSpeed 0.19 keeps each parameter's state:

    torch optimizer (fp32, ZeRO 0)   mp_rank_XX_model_states.pt "optimizer": state by parameter
                                     index; weights in "module" (pp=1) or the layer_NN-model_TT
                                     files (pp>1)
    FP16_UnfusedOptimizer (bf16, ZeRO 0, pp=1)   the same, plus "fp32_groups": masters by index
    ZeRO 1/2, BF16_Optimizer         [bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt: one flat
                                     fp32 partition per group; "param_slice_mappings" gives each
                                     parameter's (start, numel) in each data-parallel partition
    ZeRO 3                           zero_pp_rank_D_mp_rank_XX_optim_states.pt: every parameter
                                     cut in dp equal pieces (the last padded), in the order of
                                     "param_shapes" (in zero_pp_rank_0_mp_rank_XX_model_states.pt)

XX is the model-parallel rank: the tensor-parallel rank at pp=1, stage * tp + tp rank at pp>1.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime import utils as ds_utils

from tessera.data.format import first_line
from tessera.parallel.pipeline import stage_boundaries
from tessera.parallel.tensor_parallel import Part
from tessera.trainer import checkpoint
from tessera.trainer.architecture import canonical_shapes, layer_parts
from tessera.trainer.checkpoint import CheckpointError
from tessera.trainer.config import Config, ModelConfig

WEIGHT = "weight"  # the fp32 master weight where the optimizer keeps one, else the model's
MOMENTS = ("exp_avg", "exp_avg_sq")
KINDS = (WEIGHT, *MOMENTS)
TIED_PREFIX = "tied_modules.embed."  # DeepSpeed's name for the tied embedding (pp > 1)


# ---------------------------------------------------------------------------------------------
# The layer list and where each layer's parameters live


def local_rows(part: Part, tp: int) -> int:
    """Rows of `part` inside one tensor-parallel rank's local tensor."""
    rows = part.padded_rows or part.shape[0]
    return rows // tp if part.split_dim == 0 else rows


def local_shape(parts: tuple[Part, ...], tp: int) -> tuple[int, ...]:
    first = parts[0]
    rest = list(first.shape[1:])
    if first.split_dim is not None and first.split_dim > 0:
        rest[first.split_dim - 1] //= tp
    return (sum(local_rows(p, tp) for p in parts), *rest)


def stage_bounds(cfg: Config) -> list[int]:
    """Where each pipeline stage's layers start (and where the last ends), as DeepSpeed's
    PipelineModule partitions them for `parallel.pipeline_partition`."""


    pp, partition, tp = cfg.parallel.pp, cfg.parallel.pipeline_partition, cfg.parallel.tp
    layers = layer_parts(cfg.model, tp)
    if pp == 1:
        return [0, len(layers)]
    if isinstance(partition, list):
        return stage_boundaries(partition)
    if partition == "uniform":
        return [int(b) for b in ds_utils.partition_uniform(num_items=len(layers), num_parts=pp)]
    counts = [
        sum(math.prod(local_shape(tuple(parts), tp)) for parts in layer.values())
        for layer in layers
    ]
    return [int(b) for b in ds_utils.partition_balanced(weights=counts, num_parts=pp)]


@dataclasses.dataclass(frozen=True)
class LocalParam:
    """One parameter of a pipeline stage under the name DeepSpeed's files give it."""

    name: str  # "blocks.0.qkv.weight" (pp=1), "3.qkv.weight" or "tied_modules.embed.embed.weight"
    layer: int  # index in the layer list
    param: str  # its name inside its layer, e.g. "qkv.weight"
    parts: tuple[Part, ...]


def stage_params(cfg: Config, stage: int) -> list[LocalParam]:
    """A pipeline stage's parameters in module order (the order the optimizer was given them)."""
    layers = layer_parts(cfg.model, cfg.parallel.tp)
    last = len(layers) - 1
    tied = cfg.model.tie_embeddings
    if cfg.parallel.pp == 1:
        prefixes = {0: "embedding.", last - 1: "final_norm."}
        prefixes.update({i + 1: f"blocks.{i}." for i in range(cfg.model.num_layers)})
        if not tied:
            prefixes[last] = "output."
        order = sorted(prefixes)
    else:
        bounds = stage_bounds(cfg)
        here = range(bounds[stage], bounds[stage + 1])
        tied_here = [i for i in here if tied and i in (0, last)]
        # PipelineModule registers its tied modules before the numbered layers
        prefixes = {i: TIED_PREFIX for i in tied_here[:1]}
        prefixes.update({i: f"{i}." for i in here if i not in tied_here})
        order = list(prefixes)
    return [
        LocalParam(prefixes[i] + name, i, name, tuple(parts))
        for i in order
        for name, parts in layers[i].items()
    ]


# ---------------------------------------------------------------------------------------------
# DeepSpeed's files


def load_file(path: str | Path) -> Any:
    """A DeepSpeed file, memory-mapped (tensors are read from disk where used), unpickled with
    `weights_only=True` and the checkpoint module's allow-list: no code runs from a checkpoint."""
    try:
        with torch.serialization.safe_globals(checkpoint.safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read ({first_line(e)})") from e


def _narrow_across(pieces: list[torch.Tensor], start: int, length: int) -> torch.Tensor:
    """torch.cat(pieces).narrow(0, start, length) without concatenating everything."""
    out = []
    for piece in pieces:
        size = piece.numel()
        if start < size and length > 0:
            take = min(size - start, length)
            out.append(piece.narrow(0, start, take))
            length -= take
        start = max(0, start - size)
    if length > 0:
        raise CheckpointError("a parameter reaches past the end of its flat partition")
    return out[0] if len(out) == 1 else torch.cat(out)


def _first_step(state: dict) -> float:
    for entry in state.values():
        if "step" in entry:
            return float(entry["step"])
    return 0.0


class _Slice:
    """One model-parallel rank's files: local tensors by DeepSpeed name and kind."""

    def tensor(self, param: LocalParam, kind: str) -> torch.Tensor:
        raise NotImplementedError

    def adam_step(self) -> float:
        raise NotImplementedError


class _IndexedSlice(_Slice):
    """ZeRO 0: a torch optimizer (or DeepSpeed's unfused bf16 wrapper around one) whose state is
    keyed by parameter index: matrices first, then vectors (`trainer.optim.param_groups`)."""

    def __init__(
        self,
        path: Path,
        optimizer: dict,
        params: list[LocalParam],
        tp: int,
        model_weight: Callable[[LocalParam], torch.Tensor],
    ) -> None:
        self.path = path
        self.model_weight = model_weight
        inner = optimizer.get("optimizer_state_dict", optimizer)
        self.state = inner["state"]
        self.masters = optimizer.get("fp32_groups")  # unfused bf16: fp32 masters, by group
        groups = [
            [p for p in params if len(local_shape(p.parts, tp)) >= 2],
            [p for p in params if len(local_shape(p.parts, tp)) < 2],
        ]
        groups = [g for g in groups if g]  # DeepSpeed drops empty groups
        saved = [g["params"] for g in inner["param_groups"]]
        if [len(g) for g in groups] != [len(g) for g in saved]:
            raise CheckpointError(
                f"{path}: optimizer groups of {[len(g) for g in saved]} "
                f"parameters; the model has {[len(g) for g in groups]}"
            )
        self.where = {
            param.name: (g, j, index)
            for g, (mine, theirs) in enumerate(zip(groups, saved))
            for j, (param, index) in enumerate(zip(mine, theirs))
        }

    def tensor(self, param: LocalParam, kind: str) -> torch.Tensor:
        g, j, index = self.where[param.name]
        if kind == WEIGHT:
            return self.masters[g][j] if self.masters is not None else self.model_weight(param)
        if kind not in self.state.get(index, {}):
            raise CheckpointError(f"{self.path}: no optimizer state {kind} for {param.name}")
        return self.state[index][kind]

    def adam_step(self) -> float:
        return _first_step(self.state)


class _FlatSlice(_Slice):
    """ZeRO 1/2 (and BF16_Optimizer): flat fp32 partitions with each parameter's address."""

    def __init__(self, files: list[Path]) -> None:
        self.ranks = [load_file(f)["optimizer_state_dict"] for f in files]

    def tensor(self, param: LocalParam, kind: str) -> torch.Tensor:
        pieces = []
        for sd in self.ranks:  # data-parallel partitions, in rank order
            for g, mapping in enumerate(sd["param_slice_mappings"]):
                if param.name in mapping:
                    address = mapping[param.name]
                    if kind == WEIGHT:
                        flat = sd["single_partition_of_fp32_groups"][g]
                    else:
                        base = sd["base_optimizer_state"]
                        flat = base["state"][base["param_groups"][g]["params"][0]][kind]
                    pieces.append(flat.narrow(0, address.start, address.numel))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0] if pieces else torch.empty(0)

    def adam_step(self) -> float:
        return _first_step(self.ranks[0]["base_optimizer_state"]["state"])


class _Zero3Slice(_Slice):
    """ZeRO 3: each parameter cut in dp equal pieces, in `param_shapes` order on every rank
    (DeepSpeed's zero_to_fp32 protocol), weights and moments alike."""

    def __init__(self, files: list[Path], param_shapes: list[dict]) -> None:
        dp = len(files)
        self.ranks = [load_file(f)["optimizer_state_dict"] for f in files]
        self.offsets: dict[str, tuple[int, int, int]] = {}
        offset = 0
        for shapes in param_shapes:
            for name, shape in shapes.items():
                numel = math.prod(shape)
                self.offsets[name] = (offset, -(-numel // dp), numel)
                offset += -(-numel // dp)
        total = sum(t.numel() for t in self.ranks[0]["fp32_flat_groups"])
        if offset != total:
            raise CheckpointError(
                f"{files[0]}: its partitions hold {total} values; the parameter "
                f"shapes need {offset}"
            )

    def _flats(self, sd: dict, kind: str) -> list[torch.Tensor]:
        if kind == WEIGHT:
            return list(sd["fp32_flat_groups"])
        inner = sd["optimizer_state_dict"]
        return [inner["state"][i][kind] for group in inner["param_groups"] for i in group["params"]]

    def tensor(self, param: LocalParam, kind: str) -> torch.Tensor:
        if param.name not in self.offsets:
            return torch.empty(0)
        offset, piece, numel = self.offsets[param.name]
        return torch.cat(
            [_narrow_across(self._flats(sd, kind), offset, piece) for sd in self.ranks]
        )[:numel]

    def adam_step(self) -> float:
        return _first_step(self.ranks[0]["optimizer_state_dict"]["state"])


# ---------------------------------------------------------------------------------------------
# The reader


class CheckpointReader:
    """Full tensors of one committed checkpoint directory (any tp, pp, dp, ZeRO stage), read
    one at a time; also its config, Tessera state, schedule and counters."""

    def __init__(self, directory: str | Path, verify: bool = True) -> None:
        self.directory = checkpoint.valid_step_dir(directory, checksum=verify)
        self.manifest = checkpoint.read_manifest(self.directory)
        self.cfg = checkpoint.saved_config(self.directory)
        self.state = checkpoint.read_state(self.directory)
        layout = self.manifest["layout"]
        self.tp, self.pp, self.dp = layout["tp"], layout["pp"], layout["dp"]
        self.zero_stage = layout["zero_stage"]
        if (self.cfg.parallel.tp, self.cfg.parallel.pp) != (self.tp, self.pp):
            raise CheckpointError(
                f"{self.directory}: its config.yaml and manifest disagree on the layout"
            )
        self.shapes = canonical_shapes(self.cfg.model)
        saved = {k: tuple(v) for k, v in self.manifest.get("tensors", {}).items()}
        if saved and saved != self.shapes:
            odd = sorted(set(saved) ^ set(self.shapes)) or [
                k for k in saved if saved[k] != self.shapes[k]
            ]
            raise CheckpointError(
                f"{self.directory}: tensor {odd[0]} does not match the model "
                f"its config.yaml describes"
            )
        self.stage_params = [stage_params(self.cfg, s) for s in range(self.pp)]
        self._where = {}
        for stage, params in enumerate(self.stage_params):
            for param in params:
                for index, part in enumerate(param.parts):
                    self._where.setdefault(part.name, (stage, param, index))
        self._files: dict[Path, Any] = {}
        self._slices: dict[tuple[int, int], _Slice] = {}

    def names(self) -> list[str]:
        return list(self.shapes)

    def tensor(self, name: str, kind: str = WEIGHT) -> torch.Tensor:
        """Full fp32 tensor `name` ("layers.0.q.weight"); `kind`: weight, exp_avg, exp_avg_sq."""
        stage, param, index = self._where[name]
        part = param.parts[index]
        pieces = []
        for tp_rank in range(self.tp if part.split_dim is not None else 1):
            local = self._local(stage, tp_rank, param, kind)
            pieces.append(local.split([local_rows(p, self.tp) for p in param.parts])[index])
        full = torch.cat(pieces, dim=part.split_dim) if len(pieces) > 1 else pieces[0].clone()
        return full[: part.shape[0]].float().contiguous()

    def adam_step(self) -> float:
        """Adam's step count (the same for every parameter); 0 before the first step."""
        return self._slice(0, 0).adam_step()

    def model_states(self) -> dict:
        """DeepSpeed's model-states file of model-parallel rank 0: schedule and counters."""
        return self._file(self._model_states_file(0, 0))

    # -- internals

    def _file(self, path: Path) -> Any:
        if path not in self._files:
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (the checkpoint's layout needs it)")
            self._files[path] = load_file(path)
        return self._files[path]

    def _mp_rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    def _model_states_file(self, stage: int, tp_rank: int) -> Path:
        mp = self._mp_rank(stage, tp_rank)
        if self.zero_stage == 3:
            return self.directory / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"
        return self.directory / f"mp_rank_{mp:02d}_model_states.pt"

    def _optim_files(self, stage: int, tp_rank: int) -> list[Path]:
        """The ZeRO optimizer partitions of one model-parallel rank, in data-parallel order,
        as the manifest lists them (none: the optimizer state is in the model states file)."""
        mp = self._mp_rank(stage, tp_rank)
        pattern = re.compile(rf"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_{mp:02d}_optim_states\.pt")
        by_dp_rank = {int(m.group(1)): name for name in self.manifest["files"]
                      if (m := pattern.fullmatch(name))}
        if by_dp_rank and sorted(by_dp_rank) != list(range(self.dp)):
            raise CheckpointError(
                f"{self.directory}: optimizer partitions of model-parallel rank {mp} for "
                f"data-parallel ranks {sorted(by_dp_rank)[:8]} where dp={self.dp}"
            )
        return [self.directory / by_dp_rank[d] for d in sorted(by_dp_rank)]

    def _slice(self, stage: int, tp_rank: int) -> _Slice:
        if (stage, tp_rank) not in self._slices:
            self._slices[stage, tp_rank] = self._open_slice(stage, tp_rank)
        return self._slices[stage, tp_rank]

    def _open_slice(self, stage: int, tp_rank: int) -> _Slice:
        optim_files = self._optim_files(stage, tp_rank)
        model_file = self._model_states_file(stage, tp_rank)
        states = self._file(model_file)
        if optim_files:
            if self.zero_stage == 3:
                return _Zero3Slice(optim_files, states["param_shapes"])
            return _FlatSlice(optim_files)
        optimizer = states.get("optimizer")
        if not isinstance(optimizer, dict):
            raise CheckpointError(
                f"{model_file}: holds no optimizer state, and no optimizer "
                f"partition files lie beside it"
            )
        return _IndexedSlice(
            model_file,
            optimizer,
            self.stage_params[stage],
            self.tp,
            lambda p: self._model_weight(stage, tp_rank, p),
        )

    def _model_weight(self, stage: int, tp_rank: int, param: LocalParam) -> torch.Tensor:
        if self.pp == 1:
            return self._file(self._model_states_file(stage, tp_rank))["module"][param.name]
        # the tied embedding's last-stage copy has no file of its own; both copies are equal
        layer = 0 if param.name.startswith(TIED_PREFIX) else param.layer
        path = self.directory / f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"
        return self._file(path)[param.param]

    def _local(self, stage: int, tp_rank: int, param: LocalParam, kind: str) -> torch.Tensor:
        local = self._slice(stage, tp_rank).tensor(param, kind)
        shape = local_shape(param.parts, self.tp)
        if local.numel() != math.prod(shape):
            raise CheckpointError(
                f"{self.directory}: {param.name} ({kind}) of model-parallel rank "
                f"{self._mp_rank(stage, tp_rank)} holds {local.numel()} values, not {list(shape)}"
            )
        return local.reshape(shape)


def load_canonical_state(ckpt_dir: str | Path, verify: bool = True
                         ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Every full weight of a checkpoint of any layout at once, with its model config."""
    reader = CheckpointReader(ckpt_dir, verify)
    return reader.cfg.model, {name: reader.tensor(name) for name in reader.names()}
