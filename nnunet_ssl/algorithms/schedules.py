"""Schedules expressed in fractions of the training budget.

nnU-Net budgets range from a 5-minute CPU run to 1000 epochs x 250 iterations; a ramp written in
absolute iterations would be wrong for all but one of them, so the ramps here take the global
iteration ``t`` (0-based) and the total number of iterations ``total``, and training stages are given
as fractions of the epoch budget (:func:`stage_boundaries`).
"""
from __future__ import annotations

import bisect
import math
from typing import Callable, List, Sequence, Tuple

import torch


def sigmoid_rampup(t: float, total: float, fraction: float) -> float:
    """Laine & Aila's sigmoid-shaped ramp-up, ``exp(-5 (1 - min(t / (fraction * total), 1))^2)``.

    Args:
        t: 0-based global iteration.
        total: total number of training iterations ``T`` (> 0).
        fraction: ramp length as a fraction of ``T``; ``0`` means no ramp (returns 1).

    Returns:
        A float in ``(0, 1]``: ``exp(-5) = 6.7379e-3`` at ``t = 0``, ``1`` from ``t >= fraction * T`` on.
    """
    if total <= 0:
        raise ValueError(f"total iterations must be > 0, got {total}")
    if not 0 <= fraction <= 1:
        raise ValueError(f"ramp-up fraction must be in [0, 1], got {fraction}")
    if fraction == 0:
        return 1.0
    phase = 1.0 - min(max(t, 0) / (fraction * total), 1.0)
    return float(math.exp(-5.0 * phase * phase))


def cosine_cycle(t: float, period_total: float, low: float, high: float, cycles: int = 1) -> float:
    """Cosine schedule between ``high`` and ``low`` (ACTION++'s anatomy-aware temperature schedule, ATS).

    ``tau(t) = low + 0.5 (1 + cos(2 pi cycles t / period_total)) (high - low)``: ``high`` at ``t = 0``,
    ``low`` at ``t = period_total / (2 cycles)``, ``high`` again at ``t = period_total``.

    Args:
        t: iterations since the schedule began.
        period_total: length ``T_s`` of the schedule in iterations (> 0).
        low, high: the two extremes.
        cycles: number of full cosine cycles over ``period_total``.
    """
    if period_total <= 0:
        raise ValueError(f"schedule length must be > 0, got {period_total}")
    return float(low + 0.5 * (1.0 + math.cos(2.0 * math.pi * cycles * t / period_total)) * (high - low))


def stage_boundaries(fractions: Sequence[float], num_epochs: int) -> Tuple[int, ...]:
    """First epochs ``(E_1, ..., E_{S-1})`` of stages 2..S, for stages taking ``fractions`` of ``num_epochs``.

    ``E_k = round((f_1 + ... + f_k) * num_epochs)``, halves rounded up, and never below ``E_{k-1}``: a stage
    whose fraction rounds to no epoch is empty. The last fraction only closes the list (stage ``S`` runs to
    the end).

    Args:
        fractions: ``S`` stage fractions ``f_1..f_S`` (summing to 1).
        num_epochs: the epoch budget ``E``.
    """
    bounds: List[int] = []
    cumulative = 0.0
    for f in fractions[:-1]:
        cumulative += f
        e = int(math.floor(cumulative * num_epochs + 0.5))
        bounds.append(max(e, bounds[-1]) if bounds else e)
    return tuple(bounds)


def epoch_stage(epoch: int, boundaries: Sequence[int]) -> int:
    """The 1-based stage of 0-based ``epoch`` given :func:`stage_boundaries` (empty stages are skipped)."""
    return bisect.bisect_right(list(boundaries), epoch) + 1


class StagewisePolyLR:
    """nnU-Net's poly learning rate, restarted at every stage boundary.

    ``lr(e) = lr0 * (1 - (e - E_s) / (E_{s+1} - E_s)) ** exponent`` for ``E_s <= e < E_{s+1}`` and 0 from the
    last boundary on. Like nnU-Net's ``PolyLRScheduler`` it is stepped with the epoch and sets the lr of *every*
    parameter group.

    Args:
        optimizer: the optimizer whose groups it sets.
        initial_lr: ``lr0``.
        boundaries: returns ``(0, E_1, ..., E)``, the first epoch of every stage and the budget; a callable, so
            a budget changed after the scheduler was built (variants, tests) moves the stages along.
        exponent: the poly exponent (nnU-Net: 0.9).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float,
                 boundaries: Callable[[], Sequence[int]], exponent: float = 0.9):
        self.optimizer = optimizer
        self.initial_lr = float(initial_lr)
        self.boundaries = boundaries
        self.exponent = float(exponent)
        self._last_lr = [g["lr"] for g in optimizer.param_groups]

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 0-based ``epoch``."""
        b = tuple(int(e) for e in self.boundaries())
        for start, end in zip(b[:-1], b[1:]):
            if start <= epoch < end:
                return self.initial_lr * (1.0 - (epoch - start) / (end - start)) ** self.exponent
        return self.initial_lr * 0.0

    def step(self, current_step: int) -> None:
        """Set every group's lr to :meth:`lr_at` ``(current_step)`` (nnU-Net passes the epoch)."""
        lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)

    def get_last_lr(self) -> List[float]:
        return self._last_lr
