"""The few collective operations SSL statistics need, as no-ops outside ``torch.distributed``.

Statistics that must agree across DDP ranks (class thresholds, class means, queues) go through
these helpers, so the same code runs single-process, on CPU with gloo, and with NCCL.
"""
from __future__ import annotations

from typing import Sequence

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


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks, in place, with one flattened all-reduce.

    For modules that DDP does not wrap (heads, a network called unwrapped). A parameter whose ``.grad`` is None
    on a rank (its loss term was empty there) counts as zeros in the mean; it gets a gradient if *some* rank had
    one and stays None otherwise, so every rank applies the same update. All ranks must pass the same
    parameters in the same order. No-op when not distributed or ``params`` is empty.

    Args:
        params: parameters of any shapes; gradients are averaged in float32 and cast back to ``p.dtype``.
    """
    if not is_distributed() or not params:
        return
    dev = params[0].device
    grads = [p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=dev)
             for p in params]
    has = torch.tensor([float(p.grad is not None) for p in params], device=dev)
    flat = all_reduce_sum(torch.cat(grads + [has]))
    world = dist.get_world_size()
    offset = 0
    for p, h in zip(params, flat[-len(params):].tolist()):
        chunk = flat[offset:offset + p.numel()]
        offset += p.numel()
        if h > 0:
            p.grad = (chunk / world).view_as(p).to(p.dtype)
