"""First-in-first-out embedding queue used by ACTION's distillation anchors and ACTION++'s SAACL.

The queue is an ``nn.Module`` whose whole state (rows, optional labels, write pointer, fill count,
number of enqueues) lives in buffers, so ``state_dict`` / ``load_state_dict`` restore it exactly on
resume.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..distributed import all_gather_cat


class FIFOQueue(nn.Module):
    """Fixed-size FIFO of ``(K, D)`` rows with optional integer labels.

    Rows are written at a moving pointer with wrap-around; ``valid_mask()`` marks the rows written so
    far (and, with labels, drops padding rows labelled ``-1``). With ``ddp_gather=True`` every rank
    all-gathers its rows in rank order before writing, so all ranks hold identical queues.

    When one enqueue brings more than ``K`` rows, a random subset of whole groups of ``group_size``
    rows is kept (spec: "enqueue a random 36 images"; a group is one image's windows). The subset is
    drawn from a generator seeded with ``(seed, number of enqueues)``: identical on every rank and
    reproducible on resume, with no RNG state to checkpoint.

    Args:
        size: capacity ``K`` in rows.
        dim: row width ``D``.
        with_labels: keep an int64 label per row (SAACL); unlabelled queues ignore ``labels``.
        ddp_gather: all-gather rows (and labels) over ranks before enqueueing.
        seed: seed of the subset draw for oversized enqueues.

    Buffers:
        ``data`` ``(K, D)`` float32, ``labels`` ``(K,)`` int64 (``-1`` = empty; only with labels),
        ``ptr``, ``fill`` and ``num_enqueues`` int64 scalars.
    """

    def __init__(self, size: int, dim: int, with_labels: bool = False, ddp_gather: bool = True, seed: int = 0):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"queue size and dim must be positive, got {size}, {dim}")
        self.size = int(size)
        self.dim = int(dim)
        self.with_labels = bool(with_labels)
        self.ddp_gather = bool(ddp_gather)
        self.seed = int(seed)
        self.register_buffer("data", torch.zeros(self.size, self.dim))
        if self.with_labels:
            self.register_buffer("labels", torch.full((self.size,), -1, dtype=torch.long))
        else:
            self.labels = None
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("fill", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_enqueues", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, with_labels={self.with_labels}"

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None, group_size: int = 1,
                pad_to: Optional[int] = None) -> None:
        """Append rows, overwriting the oldest ones.

        Args:
            x: ``(N, D)`` rows (detached and cast to float32 here).
            labels: ``(N,)`` integer labels; required iff the queue keeps labels.
            group_size: rows per group for the random subset of an oversized enqueue
                (``N`` must be divisible by it).
            pad_to: labelled queues only: pad this rank's rows to ``pad_to`` with label ``-1``
                (masked by ``valid_mask``) so ranks with different ``N`` can all-gather.
        """
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (N, {self.dim}), got {tuple(x.shape)}")
        if self.with_labels != (labels is not None):
            raise ValueError("labels must be given exactly when the queue keeps labels")
        x = x.detach().to(self.data)
        if labels is not None:
            labels = labels.detach().to(device=self.data.device, dtype=torch.long).reshape(-1)
            if labels.numel() != x.shape[0]:
                raise ValueError("one label per row expected")
        if pad_to is not None:
            if labels is None:
                raise ValueError("pad_to needs a labelled queue (padding rows are masked by label -1)")
            if x.shape[0] > pad_to:
                raise ValueError(f"{x.shape[0]} rows do not fit pad_to={pad_to}")
            extra = pad_to - x.shape[0]
            x = torch.cat([x, x.new_zeros(extra, self.dim)])
            labels = torch.cat([labels, labels.new_full((extra,), -1)])
        if self.ddp_gather:
            x = all_gather_cat(x)
            if labels is not None:
                labels = all_gather_cat(labels)
        n = x.shape[0]
        if n == 0:
            return
        if n % group_size:
            raise ValueError(f"{n} rows are not whole groups of {group_size}")
        if n > self.size:
            keep_groups = self.size // group_size
            if keep_groups == 0:
                raise ValueError(f"group_size {group_size} exceeds the queue size {self.size}")
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.num_enqueues))
            groups = torch.randperm(n // group_size, generator=g)[:keep_groups].sort().values
            rows = (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1).to(x.device)
            x = x[rows]
            if labels is not None:
                labels = labels[rows]
            n = x.shape[0]
        idx = (self.ptr + torch.arange(n, device=x.device)) % self.size
        self.data[idx] = x
        if labels is not None:
            self.labels[idx] = labels
        self.ptr.copy_((self.ptr + n) % self.size)
        self.fill.copy_(torch.clamp(self.fill + n, max=self.size))
        self.num_enqueues += 1

    def valid_mask(self) -> torch.Tensor:
        """``(K,)`` bool: rows written so far, minus padding rows (label ``-1``) in labelled queues."""
        # rows are written from index 0 onwards, so the filled ones are always a prefix
        valid = torch.arange(self.size, device=self.data.device) < self.fill
        if self.with_labels:
            valid &= self.labels >= 0
        return valid

    @property
    def fill_fraction(self) -> float:
        """Fraction of the ``K`` rows written so far (diagnostic)."""
        return float(self.fill) / self.size

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue (pointer, fill count and labels; row values become irrelevant)."""
        self.data.zero_()
        if self.with_labels:
            self.labels.fill_(-1)
        self.ptr.zero_()
        self.fill.zero_()
