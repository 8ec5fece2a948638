"""The few collective operations SSL statistics need, as no-ops outside ``torch.distributed``.

Statistics that must agree across DDP ranks (class thresholds, class means, queues) go through
these helpers, so the same code runs single-process, on CPU with gloo, and with NCCL.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` (any shape) over ranks, in place, and return it. Identity when not distributed."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` ``(N, *F)`` from every rank along dim 0, in rank order.

    Every rank must pass the same ``N`` and trailing shape (pad and mask otherwise). The result does
    not carry gradient; it is meant for queues of detached teacher embeddings.
    """
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)
