"""SAACL, ACTION++'s supervised adaptive anatomical contrast (spec section 5.1).

Labeled pixels are contrasted SupCon-style against a queue of teacher embeddings and, in addition,
pulled toward one of ``K`` fixed, uniformly spread class centres. Centres are assigned to classes by
Hungarian matching against an EMA of the class centroids.

Axes: embeddings are ``(N, d)`` rows; labels ``(N,)`` long in ``[0, K)`` (``-1`` = padding);
centres and centroids ``(K, d)``; label maps ``(B, *S)`` with ``S = (H, W)`` or ``(D, H, W)``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from ..distributed import all_reduce_sum
from .point_gather import sample_coords


# ----------------------------------------------------------------------------------------- centres
def uniformity_energy(centres: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """The papers' energy ``L_unif = sum_c log sum_c' exp(psi_c . psi_c' / tau)``; ``(K, d) -> ()``."""
    return torch.logsumexp(centres @ centres.t() / tau, dim=1).sum()


def simplex_centres(num_classes: int, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Regular simplex ``psi_c = sqrt(K/(K-1)) (e_c - 1/K)``, zero-padded to ``dim`` (needs ``K <= dim``).

    Returns:
        ``(K, dim)`` unit rows with all pairwise cosines ``-1/(K-1)``.
    """
    k = int(num_classes)
    if k < 2 or k > dim:
        raise ValueError(f"simplex centres need 2 <= K <= d, got K={k}, d={dim}")
    eye = torch.eye(k, dtype=torch.float64)
    psi = math.sqrt(k / (k - 1)) * (eye - 1.0 / k)
    return F.pad(psi, (0, dim - k)).to(dtype)


def helmert_basis(k: int) -> torch.Tensor:
    """``(k-1, k)`` orthonormal rows spanning the sum-zero subspace of ``R^k`` (Helmert sub-matrix)."""
    rows = []
    for i in range(1, k):
        r = torch.zeros(k, dtype=torch.float64)
        r[:i] = 1.0
        r[i] = -float(i)
        rows.append(r / math.sqrt(i * (i + 1)))
    return torch.stack(rows)


def class_centres(num_classes: int, dim: int, steps: int = 10000, lr: float = 1e-3, tau: float = 0.07,
                  seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Deterministic, uniformly spread unit class centres ``Psi`` (spec 5.1).

    * ``K <= d``: the regular simplex, zero-padded.
    * ``K = d + 1``: the simplex written in an orthonormal basis of the sum-zero subspace of ``R^K``.
    * ``K > d + 1``: minimise ``uniformity_energy`` (temperature ``tau``) with Adam (``lr``) for
      ``steps`` steps in float64 from a ``seed``-ed Gaussian start, renormalising after every step.

    For ``K <= d + 1`` the simplex minimises ``L_unif``; its rotation does not matter because the
    assignment adapts to it.

    Args:
        num_classes: ``K`` (>= 2).
        dim: ``d``.
        steps, lr, tau, seed: optimiser settings for ``K > d + 1`` (spec: 10000, 1e-3, 0.07, 0).
        dtype: dtype of the result.

    Returns:
        ``(K, d)`` with unit rows.
    """
    k, d = int(num_classes), int(dim)
    if k < 2:
        raise ValueError(f"need at least 2 classes, got {k}")
    if k <= d:
        return simplex_centres(k, d, dtype)
    if k == d + 1:
        simplex = math.sqrt(k / (k - 1)) * (torch.eye(k, dtype=torch.float64) - 1.0 / k)
        return (simplex @ helmert_basis(k).t()).to(dtype)
    g = torch.Generator().manual_seed(int(seed))
    psi = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    opt = torch.optim.Adam([psi], lr=lr)
    for _ in range(int(steps)):
        opt.zero_grad()
        uniformity_energy(psi, tau).backward()
        opt.step()
        with torch.no_grad():
            psi.copy_(F.normalize(psi, dim=1))
    return psi.detach().to(dtype)


def hungarian_assignment(centroids: torch.Tensor, centres: torch.Tensor, cost: str = "dot") -> torch.Tensor:
    """Assign one centre to each class: ``perm[c]`` is the centre index of class ``c``.

    Args:
        centroids: ``Phi`` ``(K, d)`` class centroids (zero rows for unseen classes).
        centres: ``Psi`` ``(K, d)``.
        cost: ``'dot'`` maximises ``sum_c phi_c . psi_perm(c)`` (released code; for unit vectors the
            same as minimising squared distances); ``'l2'`` minimises the paper's unsquared
            ``sum_c ||psi_perm(c) - phi_c||_2``.

    Returns:
        ``(K,)`` long permutation on ``centroids.device``. Deterministic, so identical on every rank.
    """
    phi = centroids.detach().double().cpu()
    psi = centres.detach().double().cpu()
    if cost == "dot":
        matrix = -(phi @ psi.t())
    elif cost == "l2":
        matrix = torch.cdist(phi, psi)
    else:
        raise ValueError(f"unknown assignment cost {cost!r}; use 'dot' or 'l2'")
    rows, cols = linear_sum_assignment(matrix.numpy())
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm).to(centroids.device)


class CentreAssigner(nn.Module):
    """Fixed class centres ``Psi``, class-centroid EMA ``Phi`` and the Hungarian assignment ``pi``.

    All state is in buffers (``centres``, ``centroids``, ``seen``, ``perm``), so it round-trips through
    ``state_dict``; a loaded copy of ``centres`` wins over the freshly computed one.

    Args:
        num_classes: ``K``.
        dim: ``d``.
        momentum: EMA weight of the old centroid (0.9).
        cost: assignment cost, see ``hungarian_assignment``.
        centre_steps: optimiser steps for ``K > d + 1`` centres (spec 10000).
    """

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.9, cost: str = "dot",
                 centre_steps: int = 10000):
        super().__init__()
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.momentum = float(momentum)
        self.cost = cost
        self.register_buffer("centres", class_centres(num_classes, dim, steps=centre_steps))
        self.register_buffer("centroids", torch.zeros(num_classes, dim))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("perm", torch.arange(num_classes))

    @torch.no_grad()
    def update(self, embeddings: torch.Tensor, labels: torch.Tensor) -> int:
        """EMA-update the centroids with this step's embeddings, then recompute ``perm``.

        For each class ``c`` present (globally, after all-reducing per-class sums and counts):
        ``m_c = normalise(mean of s_i with y_i = c)``; ``phi_c <- normalise(0.9 phi_c + 0.1 m_c)``, or
        ``phi_c = m_c`` the first time ``c`` is seen.

        Args:
            embeddings: ``(N, d)`` student embeddings ``s`` (detached here).
            labels: ``(N,)`` long, ``-1`` rows ignored.

        Returns:
            The number of classes whose centre changed.
        """
        s = F.normalize(embeddings.detach().float(), dim=1)
        labels = labels.to(s.device).long()
        keep = (labels >= 0) & (labels < self.num_classes)
        stats = torch.zeros(self.num_classes, self.dim + 1, device=s.device)
        stats[:, : self.dim].index_add_(0, labels[keep], s[keep])
        stats[:, self.dim] = torch.bincount(labels[keep], minlength=self.num_classes).float()
        all_reduce_sum(stats)
        sums, counts = stats[:, : self.dim], stats[:, self.dim]
        here = (counts > 0).to(self.seen.device)
        mean = F.normalize(sums, dim=1).to(self.centroids)
        ema = F.normalize(self.momentum * self.centroids + (1.0 - self.momentum) * mean, dim=1)
        new = torch.where(self.seen[:, None], ema, mean)
        self.centroids.copy_(torch.where(here[:, None], new, self.centroids))
        self.seen |= here
        old = self.perm.clone()
        self.perm.copy_(hungarian_assignment(self.centroids, self.centres, self.cost))
        return int((old != self.perm).sum())

    def alignment(self) -> torch.Tensor:
        """Mean ``phi_c . psi_pi(c)`` over seen classes (diagnostic); nan before any update."""
        dots = (self.centroids * self.centres[self.perm]).sum(1)
        return dots[self.seen].mean() if bool(self.seen.any()) else torch.tensor(float("nan"))


# -------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_class_points(y: torch.Tensor, valid: torch.Tensor, num_classes: int, num_per_class: int = 256,
                        generator: Optional[torch.Generator] = None, probs: Optional[torch.Tensor] = None,
                        hard_threshold: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_per_class`` pixels uniformly, with replacement, per class present in the labels.

    Args:
        y: ``(B, *S)`` integer ground truth.
        valid: ``(B, *S)`` bool (GT != ignore label).
        num_classes: ``K``; labels outside ``[0, K)`` are never drawn.
        num_per_class: draws per present class (256).
        generator: ``torch.Generator`` of this rank.
        probs: ``(B, K, *S)`` probabilities, only for the ``'hard'`` mode.
        hard_threshold: if given (``saacl_sampling='hard'``, 0.7), draw only pixels with
            ``p_c < hard_threshold``; a class without such pixels is not drawn.

    Returns:
        ``coords`` ``(N, 1 + n)`` long and ``labels`` ``(N,)`` long, ``N = num_per_class * classes drawn``.
    """
    valid = valid.to(torch.bool)
    coords, labels = [], []
    for c in range(num_classes):
        mask = valid & (y == c)
        if hard_threshold is not None:
            if probs is None:
                raise ValueError("hard sampling needs probs")
            mask &= probs[:, c] < hard_threshold
        pts = sample_coords(mask, num_per_class, generator)
        if pts.shape[0]:
            coords.append(pts)
            labels.append(torch.full((pts.shape[0],), c, dtype=torch.long, device=y.device))
    if not coords:
        return torch.zeros((0, y.ndim), dtype=torch.long, device=y.device), torch.zeros(0, dtype=torch.long,
                                                                                          device=y.device)
    return torch.cat(coords), torch.cat(labels)


# ------------------------------------------------------------------------------------------- loss
def saacl_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, queue: torch.Tensor,
               queue_labels: torch.Tensor, queue_valid: torch.Tensor, centres: torch.Tensor, perm: torch.Tensor,
               tau: float, lambda_a: float = 0.2) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """SAACL loss of spec 5.1 (released code's SupCon-style ``1/n_i``).

    Row ``i`` holds the logits ``[s_i . t_i, s_i . Q_j (valid j), s_i . psi_k (k = 1..K)] / tau``;
    ``lp_i`` is its log-softmax, ``P_i = {self} + {j : y_j = y_i}``, ``nu_i = perm[y_i]`` and
    ``n_i = |P_i| + 1``. Then ``L = mean_i [ -(1/n_i) sum_{p in P_i} lp_{i,p} - (lambda_a/n_i) lp_{i,nu_i} ]``.
    Invalid queue rows (unfilled, or label ``-1``) get logit ``-inf`` and are never positives.
    Float32, autocast off.

    Args:
        student: ``(N, d)`` student embeddings ``s`` (normalised here), with gradient.
        teacher: ``(N, d)`` teacher embeddings ``t`` of the same pixels (normalised, detached here).
        labels: ``(N,)`` long class of each pixel, in ``[0, K)``.
        queue: ``(Q, d)`` queued teacher rows; ``queue_labels`` ``(Q,)`` long; ``queue_valid`` ``(Q,)`` bool.
        centres: ``(K, d)`` class centres ``Psi``.
        perm: ``(K,)`` long centre index of each class.
        tau: temperature ``tau_sa`` (ATS-scheduled).
        lambda_a: weight of the assigned-centre term (0.2).

    Returns:
        ``(loss, stats)``: scalar loss (0 for ``N = 0``) and detached ``contrast`` and ``centre`` parts,
        with ``loss = contrast + centre``.
    """
    device = student.device
    if student.shape[0] == 0:
        zero = student.float().sum() * 0.0
        return zero, {"contrast": zero.detach(), "centre": zero.detach()}
    with torch.autocast(device_type=device.type, enabled=False):
        s = F.normalize(student.float(), dim=1)
        t = F.normalize(teacher.detach().float(), dim=1)
        q = queue.detach().float().to(device)
        psi = centres.detach().float().to(device)
        labels = labels.to(device).long()
        qvalid = queue_valid.to(device=device, dtype=torch.bool)
        qlabels = queue_labels.to(device).long()
        self_logit = (s * t).sum(1, keepdim=True)
        queue_logits = (s @ q.t()).masked_fill(~qvalid[None, :], float("-inf"))
        logits = torch.cat([self_logit, queue_logits, s @ psi.t()], dim=1) / tau
        lp = torch.log_softmax(logits, dim=1)
        n_queue = q.shape[0]
        positive = qvalid[None, :] & (qlabels[None, :] == labels[:, None])
        # masked -inf columns must not meet a 0 weight (0 * -inf = nan)
        pos_sum = lp[:, 0] + torch.where(positive, lp[:, 1:1 + n_queue], torch.zeros_like(lp[:, 1:1 + n_queue])).sum(1)
        n_i = positive.sum(1).float() + 2.0  # |P_i| = 1 + matches; n_i = |P_i| + 1
        centre_col = 1 + n_queue + perm.to(device).long()[labels]
        lp_centre = lp.gather(1, centre_col[:, None]).squeeze(1)
        contrast = (-pos_sum / n_i).mean()
        centre = (-lambda_a * lp_centre / n_i).mean()
    return contrast + centre, {"contrast": contrast.detach(), "centre": centre.detach()}
