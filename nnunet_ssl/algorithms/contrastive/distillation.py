"""ACTION's contrastive distillation: similarity KL against an anchor bank, and window embeddings.

Global (spec 2.4) and local (spec 2.5) distillation share one loss: the student matches the
teacher's sharp *soft* similarity distribution over a bank of anchors,
``KL(p_t || p_s)`` with ``p_t = softmax(z_t a^T / tau_t)`` and ``p_s = softmax(z_s a^T / tau_s)``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F


def _log_probs(emb: torch.Tensor, anchors: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    logits = emb.float() @ anchors.t() / tau
    return torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=1)


def similarity_kl(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    anchors: torch.Tensor,
    valid: torch.Tensor,
    tau_s: float,
    tau_t: float,
    chunk_size: Optional[int] = None,
    return_stats: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
    """``KL(p_t || p_s)`` over an anchor bank, averaged over rows (``kl_div(..., 'batchmean')``).

    Invalid anchors (unfilled queue rows) get logit ``-inf`` on both sides, i.e. they are dropped from
    both softmaxes; with no valid anchor the loss is 0 (still attached to the student graph). Runs in
    float32 with autocast off. The teacher side is computed under ``no_grad``.

    Args:
        student_emb: ``(N, D)`` student embeddings (L2-normalised by the caller), with gradient.
        teacher_emb: ``(N, D)`` teacher embeddings (L2-normalised), row ``i`` paired with student row ``i``.
        anchors: ``(K, D)`` anchor bank (e.g. ``FIFOQueue.data``); never receives gradient.
        valid: ``(K,)`` bool, usable anchors (e.g. ``FIFOQueue.valid_mask()``).
        tau_s: student temperature (spec 0.1).
        tau_t: teacher temperature (spec 0.01).
        chunk_size: process rows in chunks of this many (3D local distillation has B * 343 rows);
            the result is identical.
        return_stats: also return the mean entropies of ``p_t`` and ``p_s`` (collapse diagnostics).

    Returns:
        Scalar loss ``(1/N) sum_i sum_j p_t(i,j) [log p_t(i,j) - log p_s(i,j)]``, and with
        ``return_stats`` a dict with detached scalars ``entropy_t`` and ``entropy_s``.
    """
    if student_emb.shape != teacher_emb.shape or student_emb.ndim != 2:
        raise ValueError(f"student/teacher rows must both be (N, D), got {tuple(student_emb.shape)}, "
                         f"{tuple(teacher_emb.shape)}")
    if anchors.ndim != 2 or anchors.shape[1] != student_emb.shape[1] or valid.shape != anchors.shape[:1]:
        raise ValueError(f"anchors must be (K, {student_emb.shape[1]}) with valid (K,), got "
                         f"{tuple(anchors.shape)}, {tuple(valid.shape)}")
    device = student_emb.device
    n = student_emb.shape[0]
    nan = torch.full((), float("nan"), device=device)
    if n == 0 or not bool(valid.any()):
        zero = student_emb.float().sum() * 0.0
        return (zero, {"entropy_t": nan, "entropy_s": nan}) if return_stats else zero
    chunk = n if chunk_size is None else max(int(chunk_size), 1)
    anchors = anchors.detach().float().to(device)
    valid = valid.to(device=device, dtype=torch.bool)
    total = student_emb.new_zeros((), dtype=torch.float32)
    ent_t = torch.zeros((), device=device)
    ent_s = torch.zeros((), device=device)
    with torch.autocast(device_type=device.type, enabled=False):
        for start in range(0, n, chunk):
            with torch.no_grad():
                log_pt = _log_probs(teacher_emb[start:start + chunk].detach(), anchors, valid, tau_t)
                pt = log_pt.exp()
            log_ps = _log_probs(student_emb[start:start + chunk], anchors, valid, tau_s)
            # invalid columns hold p_t = 0 and log p = -inf: keep them out of the sum, not 0 * inf = nan
            kl = torch.where(valid, pt * (log_pt - log_ps), torch.zeros_like(log_ps))
            total = total + kl.sum()
            if return_stats:
                with torch.no_grad():
                    zero = torch.zeros_like(log_pt)
                    ent_t += -torch.where(valid, pt * log_pt, zero).sum()
                    ent_s += -torch.where(valid, log_ps.exp() * log_ps, zero).sum()
    loss = total / n
    if return_stats:
        return loss, {"entropy_t": ent_t / n, "entropy_s": ent_s / n}
    return loss


def pooled_grid(z: torch.Tensor, cells: int) -> torch.Tensor:
    """Adaptive-average-pool ``z`` to a grid of ``4 * cells`` per spatial axis.

    Args:
        z: ``(B, C, *S)`` full-resolution logits, ``S = (H, W)`` or ``(D, H, W)``.
        cells: ``P``, pooled cells per window axis (spec: 8 in 2D, 4 in 3D).

    Returns:
        ``(B, C, 4P, ..., 4P)``.
    """
    n = z.ndim - 2
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[n]
    return pool(z, (4 * cells,) * n)


def windows_from_grid(grid: torch.Tensor, cells: int, normalize: bool = True) -> torch.Tensor:
    """Window embeddings from a pooled grid: every ``P^n`` block of cells at a stride of ``P/2`` cells.

    On a grid of ``4P`` cells per axis this gives 7 windows per axis (``N_w = 49`` in 2D, 343 in 3D).
    Each row is one window flattened over ``(C, P, ..., P)`` (channel-major), which is the paper's
    intent; the released code's ``reshape`` mixed windows and channels (spec 2.5, fixed here).

    Args:
        grid: ``(B, C, G, ..., G)`` with ``G = 4P`` (output of ``pooled_grid``, optionally passed
            through the window head).
        cells: ``P``, even.
        normalize: L2-normalise each row.

    Returns:
        ``(B * N_w, C * P^n)`` float32, rows ordered by batch, then window position (C order over axes).
    """
    if cells % 2:
        raise ValueError(f"cells per window must be even (stride P/2), got {cells}")
    n = grid.ndim - 2
    w = grid
    for axis in range(2, 2 + n):
        w = w.unfold(axis, cells, cells // 2)
    # w: (B, C, W_1..W_n, P_1..P_n) -> (B, W_1..W_n, C, P_1..P_n)
    w = w.movedim(1, 1 + n)
    return flatten_windows(w, n, normalize)


def flatten_windows(w: torch.Tensor, n: int, normalize: bool = True) -> torch.Tensor:
    """``(B, W_1..W_n, C, P_1..P_n)`` windows -> ``(B * prod W, C * prod P)`` rows, one per window.

    Separate so the row layout (one window per row, no window/channel mixing) can be tested directly.
    """
    b = w.shape[0]
    n_w = 1
    for s in w.shape[1:1 + n]:
        n_w *= s
    rows = w.reshape(b * n_w, -1).float()
    return F.normalize(rows, dim=1) if normalize else rows


def window_embeddings(z: torch.Tensor, cells: int, normalize: bool = True) -> torch.Tensor:
    """Local window embeddings of spec 2.5: window ``S_a/4``, stride ``S_a/8``, pooled to ``P`` per axis.

    Pooled-grid exact form: adaptive-average-pool ``z`` to ``4P`` cells per axis, then take every
    ``P^n`` block at a stride of ``P/2`` cells. Equals crop-then-``adaptive_avg_pool(P)`` whenever
    ``S_a`` is divisible by ``4P``.

    Args:
        z: ``(B, C, *S)``, ``S = (H, W)`` or ``(D, H, W)``.
        cells: ``P`` (8 in 2D, 4 in 3D).
        normalize: L2-normalise each row.

    Returns:
        ``(B * 7^n, C * P^n)`` float32.
    """
    return windows_from_grid(pooled_grid(z, cells), cells, normalize)
