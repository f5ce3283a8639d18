"""The topology (tp fastest, then dp, then pp) and one process's process group."""

import os

import pytest
import torch

from tessera.parallel.engine import GradNormClipper
from tessera.parallel.topology import Topology, distributed


def test_ranks_are_ordered_tp_then_dp_then_pp():
    coords = [(t.tp_rank, t.dp_rank, t.pp_rank)
              for t in (Topology(world_size=8, rank=r, local_rank=r, tp=2, pp=2) for r in range(8))]
    assert coords == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0),
                      (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    assert Topology(world_size=8, rank=0, local_rank=0, tp=2, pp=2).dp == 2


def test_one_process_leaves_no_launch_behind():
    """No RANK/WORLD_SIZE/MASTER_* left in the environment: a command this process starts
    would take them for a launch."""
    import torch.distributed as dist

    with distributed(1, 1, "gloo") as topo:
        assert (topo.world_size, topo.rank, dist.is_initialized()) == (1, 0, True)
    assert not dist.is_initialized()
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        assert key not in os.environ, key


def clipped(max_norm: float, grads: list[torch.Tensor]) -> tuple[float, list, bool]:
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    optimizer = torch.optim.SGD(params, lr=0.0)
    with distributed(1, 1, "gloo"):
        clipper = GradNormClipper(optimizer, max_norm)
        optimizer.step()
    return clipper.last_norm, [p.grad for p in params], getattr(optimizer, "overflow", None)


def test_the_clipper_measures_the_global_norm_and_clips_to_it():
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    norm, clipped_grads, overflow = clipped(2.5, grads)
    assert norm == pytest.approx(5.0) and overflow is False
    assert torch.cat([g.flatten() for g in clipped_grads]).norm() == pytest.approx(2.5, rel=1e-5)
    norm, kept, _ = clipped(0.0, grads)  # 0: measure only
    assert norm == pytest.approx(5.0) and torch.equal(kept[0], grads[0])


def test_a_non_finite_norm_drops_the_gradients_and_flags_the_step():
    norm, grads, overflow = clipped(1.0, [torch.tensor([1.0, float("nan")])])
    assert norm != norm and overflow is True and grads == [None]
