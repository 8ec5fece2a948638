"""Schedules expressed in fractions of the total iteration budget.

nnU-Net budgets range from a 5-minute CPU run to 1000 epochs x 250 iterations; a ramp written in
absolute iterations would be wrong for all but one of them, so every schedule here takes the global
iteration ``t`` (0-based) and the total number of iterations ``total``.
"""
from __future__ import annotations

import math


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
