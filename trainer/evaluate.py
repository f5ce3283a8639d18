"""Held-out evaluation: eval/loss and eval/perplexity on `data.valid_shards`.

The held-out windows are the first `train.eval_batches` global batches of the data loader over the
validation shards, read in order (shuffle off, one stream), so they are the same windows at every
evaluation, in every run and in every parallel layout. Every rank reads each global batch and
keeps the micro-batches of its data-parallel rank, the same split as training (the few extra reads
cost nothing next to the forward passes). The loss is the mean over all micro-batches of the
per-token mean cross entropy; with pp > 1 DeepSpeed's `PipelineEngine.eval_batch` runs the
forward passes through the stages and averages over data-parallel ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.engine import PipelineEngine

from tessera.data.format import DataError
from tessera.data.loader import TrainLoader
from tessera.data.progress import counted
from tessera.data.sources import DEFAULT_SOURCE, Source, resolve_shards
from tessera.parallel.engine import Engine
from tessera.parallel.mcore import parallel_state
from tessera.parallel.topology import Topology
from tessera.trainer.batches import to_device, with_documents
from tessera.trainer.config import Config
from tessera.trainer.metrics import warn


def resolve_valid(spec: str | list[str], train_sources: Sequence[Source]) -> list[Source]:
    """`data.valid_shards` as one source; it must share the training data's tokenizer and hold
    none of its shards."""
    try:
        shards = resolve_shards(spec)
    except DataError as e:
        raise DataError(str(e).replace("data.shards", "data.valid_shards")) from None
    train = train_sources[0].shards[0]
    valid = shards[0]
    if (valid.vocab_size, valid.eos_id) != (train.vocab_size, train.eos_id):
        raise DataError(
            f"data.valid_shards: {valid.path} was prepared with another tokenizer (vocab "
            f"{valid.vocab_size}, eos {valid.eos_id}) than the training data (vocab "
            f"{train.vocab_size}, eos {train.eos_id}); prepare it with the training data's "
            f"tokenizer: tessera prepare TEXT --output DIR --tokenizer TRAIN_DIR/tokenizer.json"
        )
    training = {s.path for source in train_sources for s in source.shards}
    shared = sorted(s.path for s in shards if s.path in training)
    if shared:
        raise DataError(
            f"data.valid_shards: {shared[0]} is also training data "
            f"({counted(len(shared), 'shard')} in both), so eval/loss would not be held out; "
            f"prepare held-out text into its own directory, or split one prepared directory "
            f"with two patterns, e.g. "
            f"data.shards='DIR/shard-00000[1-9].tar' data.valid_shards=DIR/shard-000000.tar"
        )
    return [Source(name=DEFAULT_SOURCE, weight=1.0, shards=tuple(shards))]


class Evaluator:
    """Runs the held-out evaluation every `train.eval_interval` steps and at the last step."""

    def __init__(self, cfg: Config, topo: Topology, sources: list[Source]):
        t = cfg.train
        self.interval = t.eval_interval
        self.total_steps = t.steps
        self.eval_batches = t.eval_batches
        self.micro_batches_per_batch = t.global_batch_size // t.micro_batch_size
        self.per_rank = self.micro_batches_per_batch // topo.dp
        self.dp_rank = topo.dp_rank
        self.masking = cfg.data.document_masking
        self.loader = TrainLoader(
            sources,
            seq_len=cfg.model.seq_len,
            micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size,
            dp_rank=0,
            dp_size=1,
            num_streams=1,
            shuffle=False,
            shuffle_buffer=0,
            seed=cfg.run.seed,
            warn=topo.rank == 0,
        )
        needed = t.eval_batches * t.global_batch_size * (cfg.model.seq_len + 1)
        available = sum(s.num_tokens for s in sources[0].shards)
        if needed > available and topo.rank == 0:
            warn(
                f"data.valid_shards holds {available:,} tokens, fewer than the {needed:,} of "
                f"train.eval_batches={t.eval_batches} global batches: evaluation windows repeat"
            )

    def due(self, step: int) -> bool:
        return step == self.total_steps or (self.interval > 0 and step % self.interval == 0)

    def rank_batches(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per held-out global batch, this data-parallel rank's micro-batches of it."""
        batches = iter(self.loader)
        start = self.dp_rank * self.per_rank
        for _ in range(self.eval_batches):
            global_batch = [next(batches) for _ in range(self.micro_batches_per_batch)]
            mine = global_batch[start : start + self.per_rank]
            yield list(with_documents(iter(mine), self.loader.eos_id)) if self.masking else mine

    @torch.no_grad()
    def run(self, engine: Engine) -> dict[str, float]:
        """Collective: {"eval/loss", "eval/perplexity"}, the same value on every rank."""
        losses = [self._batch_loss(engine, micro_batches) for micro_batches in self.rank_batches()]
        loss = sum(losses) / len(losses)
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0))}

    def _batch_loss(self, engine: Engine, micro_batches: list) -> float:
        """The mean loss of one global batch, from this rank's micro-batches of it."""
        if isinstance(engine, PipelineEngine):
            loss = engine.eval_batch(iter(micro_batches), num_micro_batches=len(micro_batches))
            return float(loss.float().mean())
        engine.eval()
        try:
            total = torch.zeros((), dtype=torch.float64, device=engine.device)
            for inputs, labels in micro_batches:
                total += engine(to_device(inputs, engine.device),
                                to_device(labels, engine.device)).double()
        finally:
            engine.train()
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return total.item() / self.micro_batches_per_batch
