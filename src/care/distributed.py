"""Collectives for training on several processes (Lightning DDP), and no-ops on one.

InfoNCE compares each anchor with the samples of every rank, so its candidates are gathered *with*
gradients. The backward pass sums the incoming gradients over ranks before each rank takes its own
slice: every rank's loss depends on every rank's embeddings. Combined with DDP's averaging of
parameter gradients, this gives exactly the gradient of the single-process loss on the global batch
(when each rank averages its loss over its local anchors). Implementations that return only the
local slice of the gradient, or that also rescale it by the world size, get a gradient that is off
by up to a factor of the world size on the candidate path; ``tests/test_distributed.py`` checks ours
against a single process.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_global_zero() -> bool:
    """True on rank 0, and before a process group exists on the process the launcher made rank 0
    (Lightning, torchrun and SLURM's ``srun`` set ``RANK``/``LOCAL_RANK``/``NODE_RANK`` or
    ``SLURM_PROCID`` for the others)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    launcher_ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return all(os.environ.get(k, "0") in ("", "0") for k in launcher_ranks)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> tuple[Tensor, ...]:
        gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, x.contiguous())
        return tuple(gathered)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Tensor:
        stacked = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return stacked[dist.get_rank()]


def gather_with_grad(x: Tensor) -> Tensor:
    """Rows of ``x`` from every rank, concatenated in rank order, differentiable (see module doc).

    Every rank must pass a tensor of the same shape.
    """
    if not is_distributed():
        return x
    return torch.cat(_GatherWithGrad.apply(x))


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Rows of ``x`` from every rank, concatenated in rank order, without gradient (MoCo's keys)."""
    if not is_distributed():
        return x.detach()
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x.detach().contiguous())
    return torch.cat(gathered)


_HOST_GROUPS: dict[int, Any] = {}


def host_group() -> Any:
    """A process group whose collectives run on the CPU and never wait for the accelerator: the
    default group when its backend is gloo, else a gloo group made on the first call (a
    collective: every rank must call it, in the same order)."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    key = id(dist.group.WORLD)  # one per default group (a test may make several in turn)
    if key not in _HOST_GROUPS:
        _HOST_GROUPS[key] = dist.new_group(backend="gloo")
    return _HOST_GROUPS[key]


def any_rank(flag: bool, group: Any = None) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a NaN loss stops all ranks).

    With ``group`` from :func:`host_group` it costs one CPU all-reduce and no device sync.
    """
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    if group is None and dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item() > 0)
