"""The training job: topology, model, engine, data, then the step loop (run on every rank)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.engine import PipelineEngine
from torch.optim.lr_scheduler import LambdaLR

from tessera.data.format import DataError
from tessera.data.loader import Source, TrainLoader, choose_num_streams, resolve_data
from tessera.data.sources import data_vocab_size, prepared_tokenizer
from tessera.launch import faults
from tessera.launch.signals import Interrupted, StopSignal
from tessera.launch.watchdog import Watchdog
from tessera.parallel import engine as ds_engine
from tessera.parallel.engine import Engine, GradNormClipper
from tessera.parallel.mcore import parallel_state
from tessera.parallel.pipeline import build_pipeline
from tessera.parallel.topology import Topology, distributed, env_world
from tessera.trainer import checkpoint
from tessera.trainer.batches import to_device, with_documents
from tessera.trainer.checkpoint import TrainState
from tessera.trainer.config import (
    Config,
    ConfigError,
    batch_sizes,
    save_config,
    validate,
    validate_layout,
)
from tessera.trainer.evaluate import resolve_valid
from tessera.trainer.health import NonFiniteError
from tessera.trainer.memory import out_of_memory_named
from tessera.trainer.metrics import tag_output_with_rank, tag_warnings_with_rank
from tessera.trainer.model import (
    Block,
    build_model,
    check_compile_works,
    compile_blocks,
    init_weights,
    loss_function,
    pipeline_layer_specs,
)
from tessera.trainer.monitor import TrainMonitor
from tessera.trainer.optim import (
    build_optimizer,
    build_scheduler,
    check_schedule_change,
    count_skipped_update,
    follow_schedule_at,
)
from tessera.trainer.run_dir import check_shared, check_writable, run_lock
from tessera.trainer.stragglers import ForwardClock, injected_delay_s


def resolve_vocab(cfg: Config, shards: list[Source]) -> None:
    """model.vocab_size defaults to the vocabulary the shards were prepared with."""
    data_vocab = data_vocab_size(shards)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = data_vocab
    elif cfg.model.vocab_size < data_vocab:
        raise ConfigError(
            f"config key 'model.vocab_size': {cfg.model.vocab_size} is smaller than the data's "
            f"tokenizer vocabulary ({data_vocab}); set it to at least {data_vocab}, or to null to "
            f"take the tokenizer's"
        )


def train(cfg: Config) -> TrainState:
    """Run (or resume) the configured job to `train.steps`; returns the final state, whose step
    is below `train.steps` when a signal stopped the run (after saving a checkpoint)."""
    validate(cfg)
    check_writable(cfg.run.dir)
    rank, world_size, _ = env_world()
    tag_output_with_rank(rank)  # every line of ranks other than 0 says "[rank N]"
    # from here on a hang is named and a failing rank stops its peers (tessera.launch.watchdog)
    watchdog = Watchdog(cfg.run.dir, rank, world_size, cfg.resilience.hang_timeout_s).start()
    try:
        state = _start(cfg, watchdog)
    except Interrupted:  # Ctrl-C, saved at a step boundary
        watchdog.close(faults.STOPPED)
        raise
    except (ConfigError, DataError, checkpoint.CheckpointError, NonFiniteError) as e:
        # fatal: a restart would meet it again. said_by_rank_0: rank 0 met the same and prints
        # it; the command line leaves it to rank 0, so that 512 ranks say it once
        e.said_by_rank_0 = watchdog.fail(e, fatal=True)
        raise
    except BaseException as e:
        watchdog.fail(e, fatal=False)
        raise
    watchdog.close(faults.FINISHED if state.step >= cfg.train.steps else faults.STOPPED)
    return state


def _start(cfg: Config, watchdog: Watchdog) -> TrainState:
    if cfg.data.shards is None and not cfg.data.sources:
        raise ConfigError("config key 'data.shards': not set; point it at a `tessera prepare` "
                          "output")
    if cfg.parallel.sequence_parallel and not torch.cuda.is_available():
        raise ConfigError("config key 'parallel.sequence_parallel': needs CUDA (megatron-core's "
                          "implementation uses CUDA buffers)")
    shards = resolve_data(cfg.data.shards, cfg.data.sources)
    resolve_vocab(cfg, shards)
    if cfg.data.valid_shards is not None:
        resolve_valid(cfg.data.valid_shards, shards)  # a bad path fails now, not after the build
    world_size = dist.get_world_size() if dist.is_initialized() else env_world()[1]
    # one line for a torchrun/srun rank count that does not fit, naming the key that sets it
    under_srun = "SLURM_STEP_NUM_TASKS" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ
    ranks_from = ("slurm.tasks_per_node x slurm.nodes" if under_srun
                  else "launch.nproc_per_node x nodes")
    validate_layout(cfg, world_size, ranks_from)
    if cfg.resilience.hang_timeout_s and "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ:
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")  # the last collectives, for a
        # hang's report (torch's Flight Recorder; TORCH_NCCL_TRACE_BUFFER_SIZE is its old name)
    with distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.launch.backend) as topo:
        validate_layout(cfg, topo.world_size)
        with run_lock(cfg.run.dir, topo.rank):  # one job per run directory
            check_shared(cfg.run.dir, topo.rank)  # every node writes into the same run.dir
            return _train(cfg, topo, shards, watchdog)


def _train(cfg: Config, topo: Topology, shards: list[Source], watchdog: Watchdog) -> TrainState:
    run_dir = Path(cfg.run.dir)
    ckpt_root = run_dir / "checkpoints"
    if topo.rank == 0:
        print(f"tessera: {topo.describe()}  run.dir={run_dir}", flush=True)
    tag_warnings_with_rank(topo.rank, topo.world_size)  # warnings of rank r say "[rank r]"
    _seed_everything(cfg.run.seed)

    with out_of_memory_named(cfg):
        engine, scheduler, clipper = build_training_engine(cfg, topo)

    state, resumed_config = TrainState(), None
    # Every checkpoint carries the data's tokenizer (rank 0 writes it): generate and convert
    # read it there and never open a data path a checkpoint's config names.
    tokenizer = prepared_tokenizer(shards[0].shards[0]) if topo.rank == 0 else None
    checkpoint.install(engine, cfg, tokenizer)
    # None: fresh; without "train": weights only
    saved = checkpoint.resume(engine, ckpt_root, cfg, tokenizer)
    if saved is not None and "train" in saved:
        state = TrainState(**saved["train"])
        resumed_config = checkpoint.saved_config(saved["directory"])
        check_schedule_change(resumed_config.train, cfg.train, state.step)
        follow_schedule_at(scheduler, state.step)
        if topo.rank == 0:
            print(f"tessera: resumed from {saved['directory']} at step {state.step}", flush=True)
    if state.num_streams == 0:
        state.num_streams = cfg.data.streams or choose_num_streams(
            shards, cfg.train.global_batch_size, topo.dp
        )

    loader = TrainLoader(
        shards,
        seq_len=cfg.model.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        global_batch_size=cfg.train.global_batch_size,
        dp_rank=topo.dp_rank,
        dp_size=topo.dp,
        num_streams=state.num_streams,
        num_workers=cfg.data.num_workers,
        seed=cfg.run.seed,
        shuffle=cfg.data.shuffle,
        shuffle_buffer=cfg.data.shuffle_buffer,
        start_step=state.step,
        max_consecutive_errors=cfg.data.max_consecutive_errors,
        allow_mixture_change=cfg.data.allow_mixture_change,
        batch_sizes=batch_sizes(cfg.train),
        warn=topo.tp_rank == 0 and topo.pp_rank == 0,
    )
    if saved is not None and "data" in saved:
        loader.check_resume(saved["data"])
    if topo.rank == 0:  # only now: a refused resume leaves the run's config.yaml as it was
        save_config(cfg, run_dir / "config.yaml")

    monitor = TrainMonitor(cfg, topo, engine, loader, shards, state.step, resumed_config)
    try:
        # Slurm's warning signal, SIGTERM and Ctrl-C stop the loop at a step boundary, saved
        with StopSignal([cfg.slurm.signal, "TERM", "INT"]) as stop:
            stopped_by = _loop(cfg, topo, engine, clipper, loader, state, monitor, ckpt_root, stop,
                               watchdog)
            checkpoint.wait(engine)  # an asynchronous save still writing commits before the end
    finally:
        monitor.close()
    if topo.rank == 0:
        print(run_summary(cfg, state), flush=True)
    if stopped_by == signal.SIGINT:
        raise Interrupted(f"interrupted (Ctrl-C) and saved at step {state.step}; the same "
                          f"command resumes")
    return state


def run_summary(cfg: Config, state: TrainState) -> str:
    """Where a person finds what the run wrote."""
    run_dir = Path(cfg.run.dir)
    ckpt_root = run_dir / "checkpoints"
    latest = ckpt_root / checkpoint.LATEST_FILE
    newest = latest.read_text().strip() if latest.is_file() else "none"
    status = "finished" if state.step >= cfg.train.steps else "stopped (run again to resume)"
    lines = [
        f"tessera: {status} at step {state.step}/{cfg.train.steps}",
        f"  run directory  {run_dir}",
        f"  metrics        {run_dir / 'metrics.jsonl'}"
        + (f"  (TensorBoard: {run_dir / 'tensorboard'})" if cfg.log.tensorboard else ""),
        f"  checkpoints    {ckpt_root}  (latest: {newest})",
    ]
    return "\n".join(lines)


def _loop(cfg: Config, topo: Topology, engine: Engine, clipper: GradNormClipper | None,
          loader: TrainLoader, state: TrainState, monitor: TrainMonitor, ckpt_root: Path,
          stop: StopSignal, watchdog: Watchdog) -> signal.Signals | None:
    """The steps up to train.steps (or train.stop_at), or to the signal that stopped them
    (returned). Each phase is announced to the watchdog."""
    steps = loader.steps(engine.device)  # collective: a data error on one rank stops all
    last_saved = state.step
    stopped_by = None
    end = min(cfg.train.steps, cfg.train.stop_at or cfg.train.steps)
    forward_clock = ForwardClock(engine.device)
    delay_s = injected_delay_s(topo.rank)  # the straggler test hook; 0 unless set
    while state.step < end:
        watchdog.phase(state.step + 1, "data")
        stopped_by = stop.agreed(engine.device)  # every rank stops after the same step
        if stopped_by:
            break
        started = time.perf_counter()
        if delay_s:
            time.sleep(delay_s)
        lr = engine.get_lr()[0]
        global_batch = loader.batch_sizes.batch_at(state.step)  # train.batch_size_ramp
        if global_batch != engine.train_batch_size():
            engine.set_train_batch_size(global_batch)  # the micro-batches one update sums
        micro_batches = next(steps)
        batches = iter(micro_batches)
        if cfg.data.document_masking:
            batches = with_documents(batches, loader.eos_id)
        data_s = time.perf_counter() - started
        own_data_s = loader.read_done_at - started  # without the wait for the other ranks
        watchdog.phase(state.step + 1, "forward/backward")
        with out_of_memory_named(cfg, state.step + 1):
            loss, grad_norm = train_step(engine, clipper, batches, len(micro_batches),
                                         forward_clock, lambda: watchdog.phase(state.step + 1,
                                                                               "optimizer"))
        count_skipped_update(engine)
        step_s = time.perf_counter() - started
        state.step += 1
        state.consumed_samples += global_batch
        state.loss = loss
        watchdog.phase(state.step, "metrics")
        # skipped non-finite updates, loss spikes, stragglers, evaluation, metrics row and
        # console line
        monitor.after_step(engine, state.step, state.consumed_samples, global_batch, loss=loss,
                           lr=lr, grad_norm=grad_norm, step_s=step_s, data_s=data_s,
                           own_s=own_data_s + forward_clock.take_s())
        interval = cfg.checkpoint.interval
        if (interval and state.step % interval == 0) or state.step == end:
            watchdog.phase(state.step, "save")
            save_started = time.perf_counter()
            _save(engine, ckpt_root, state, loader, cfg)
            monitor.saved(time.perf_counter() - save_started)
            last_saved = state.step
    if last_saved != state.step:
        watchdog.phase(state.step, "save")
        _save(engine, ckpt_root, state, loader, cfg)
    return stopped_by


def build_training_engine(cfg: Config, topo: Topology
                          ) -> tuple[Engine, LambdaLR, GradNormClipper | None]:
    """Model (one stage's layers when pp > 1), optimizer, schedule, DeepSpeed engine."""
    checkpointing = cfg.train.activation_checkpointing == "full"
    sequence_parallel, chunk_tokens = cfg.parallel.sequence_parallel, cfg.train.loss_chunk_tokens
    if topo.pp == 1:
        model, _ = build_model(cfg.model, topo.tp, sequence_parallel=sequence_parallel,
                               checkpoint_activations=checkpointing, loss_chunk_tokens=chunk_tokens)
    else:
        specs = pipeline_layer_specs(cfg.model, topo.tp, sequence_parallel=sequence_parallel,
                                     checkpoint_activations=checkpointing,
                                     loss_chunk_tokens=chunk_tokens)
        loss_fn = loss_function(cfg.model, sequence_parallel, chunk_tokens)
        model = build_pipeline(specs, loss_fn, topo, cfg.parallel.pipeline_partition)
    init_weights(model, cfg.model, cfg.run.seed)
    if cfg.train.precision == "fp32" and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # fp32 matmuls on TF32 tensor cores
    if cfg.train.compile:
        check_compile_works()
        compile_blocks(model)
    optimizer = build_optimizer(model, cfg.train)
    options = engine_options(cfg)
    clipper = None
    if options.clips_own_gradients():
        clipper = ds_engine.GradNormClipper(optimizer, cfg.train.grad_clip)
    scheduler = build_scheduler(optimizer, cfg.train)
    engine = ds_engine.build_engine(model, optimizer, scheduler, options, topo)
    return engine, scheduler, clipper


def engine_options(cfg: Config) -> ds_engine.EngineOptions:
    t = cfg.train
    return ds_engine.EngineOptions(
        global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
        grad_clip=t.grad_clip, precision=t.precision, zero_stage=cfg.parallel.zero_stage,
        leaf_module=Block,  # ZeRO 3 gathers one transformer block at a time
    )


def train_step(engine: Engine, clipper: GradNormClipper | None,
               batches: Iterator[tuple[torch.Tensor, torch.Tensor]], micro_batches: int,
               forward_clock: ForwardClock | None = None,
               optimizer_phase: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Forward/backward over the step's micro-batches and one optimizer step (announced by
    `optimizer_phase`); the forward passes are timed by `forward_clock` (own time, for
    stragglers).

    Returns the loss averaged over micro-batches and data-parallel ranks, and the grad norm.
    """
    if isinstance(engine, PipelineEngine):
        # 1F1B over the micro-batches; the mean loss comes back on every stage.
        loss = engine.train_batch(data_iter=batches).item()
        return loss, ds_engine.step_grad_norm(engine, clipper)
    loss_sum = torch.zeros((), device=engine.device)
    for index in range(micro_batches):
        input_ids, labels = next(batches)
        # said, not counted from DeepSpeed's running micro-step total: a ramp changes the count
        last = index == micro_batches - 1
        engine.set_gradient_accumulation_boundary(last)
        with forward_clock.timing() if forward_clock else contextlib.nullcontext():
            loss = engine(to_device(input_ids, engine.device), to_device(labels, engine.device))
        engine.backward(loss)
        if last:
            optimizer_phase()
        engine.step()
        loss_sum += loss.detach().float()
    mean_loss = loss_sum / micro_batches
    dist.all_reduce(mean_loss, group=parallel_state.get_data_parallel_group())
    loss = mean_loss.item() / parallel_state.get_data_parallel_world_size()
    return loss, ds_engine.step_grad_norm(engine, clipper)


def _save(engine: Engine, ckpt_root: Path, state: TrainState, loader: TrainLoader,
          cfg: Config) -> None:
    payload = {
        "train": dataclasses.asdict(state),
        "data": loader.state_dict(state.step),
        "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": loader.dp_size,
                   "zero_stage": cfg.parallel.zero_stage},
    }
    directory = checkpoint.save(engine, ckpt_root, state.step, payload, cfg)
    if dist.get_rank() == 0:
        verb = "saving" if cfg.checkpoint.async_save else "saved"
        print(f"tessera: {verb} {directory}", flush=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
