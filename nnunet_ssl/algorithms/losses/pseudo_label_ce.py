"""Hard pseudo-label cross-entropies: FixMatch's confidence-masked CE and CPS's cross supervision.

Axes: logits ``(B, C, *S)`` with classes on dim 1; hard labels, confidences and masks ``(B, *S)``,
``S = (H, W)`` or ``(D, H, W)``. Everything runs in float32 with autocast disabled (the log of fp16
probabilities underflows, and half-precision argmax ties flip pseudo-labels).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from nnunet_ssl.algorithms.labels import class_argmax


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim < 3 or labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"logits must be (B, C, *S) and labels (B, *S); got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")


def masked_pseudo_label_ce(logits: torch.Tensor, pseudo_labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FixMatch's unsupervised loss ``L = sum_i m_i CE(z_i, y~_i) / N``.

    The mean runs over *all* ``N = B * prod(S)`` voxels (Sohn et al. 2020: masked-out voxels count as 0),
    so the loss shrinks with the mask ratio instead of being renormalised by it.

    Args:
        logits: ``(B, C, *S)`` student logits on the strong view; the only tensor that receives gradient.
        pseudo_labels: ``(B, *S)`` integer hard labels (argmax of the weak view), detached.
        mask: ``(B, *S)`` bool (or 0/1) confidence mask, e.g. ``max p~ >= 0.95``.

    Returns:
        Float32 scalar; 0 (attached to ``logits``) when the mask is empty.
    """
    _check(logits, pseudo_labels)
    if mask.shape != pseudo_labels.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the shape of the pseudo-labels "
                         f"{tuple(pseudo_labels.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        ce = F.cross_entropy(logits.float(), pseudo_labels.detach().long(), reduction="none")
        return (ce * mask.detach().to(ce.dtype)).sum() / ce.numel()


def hard_pseudo_label_ce(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Mean CE of ``logits`` toward ``argmax reference_logits`` (detached): one CPS direction.

    Args:
        logits: ``(B, C, *S)``, receives the gradient.
        reference_logits: ``(B, C, *S)``, only its float32 argmax is used (no gradient).

    Returns:
        Float32 scalar, the mean over all ``B * prod(S)`` voxels.
    """
    if logits.shape != reference_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and reference {tuple(reference_logits.shape)} differ")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        target = class_argmax(reference_logits.detach().float())
        return F.cross_entropy(logits.float(), target)


def cross_pseudo_supervision(logits_1: torch.Tensor, logits_2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """CPS (Chen et al. 2021): each network learns the other's hard pseudo-labels.

    Args:
        logits_1, logits_2: ``(B, C, *S)`` outputs of the two networks on the same unlabeled batch.

    Returns:
        ``(loss_1, loss_2)``: ``loss_1 = CE(z_1, argmax z_2)`` trains network 1 only and
        ``loss_2 = CE(z_2, argmax z_1)`` network 2 only (the targets are detached). Swapping the inputs
        swaps the outputs exactly.
    """
    return hard_pseudo_label_ce(logits_1, logits_2), hard_pseudo_label_ce(logits_2, logits_1)


@torch.no_grad()
def pseudo_label_counts(pseudo_labels: torch.Tensor, confident: torch.Tensor, num_classes: int
                        ) -> Dict[str, torch.Tensor]:
    """Counts behind the mask ratio and the pseudo-label class histogram (no ratios: sum them first).

    Args:
        pseudo_labels: ``(B, *S)`` integer hard labels in ``[0, num_classes)``.
        confident: ``(B, *S)`` bool confidence mask.
        num_classes: ``C``.

    Returns:
        0-dim float64 tensors: ``n_vox`` (all voxels), ``n_conf`` (confident voxels), ``n_pl_{c}``
        (voxels labelled ``c``) and ``n_conf_{c}`` (confident voxels labelled ``c``) for every class.
    """
    if confident.shape != pseudo_labels.shape:
        raise ValueError(f"confident {tuple(confident.shape)} and labels {tuple(pseudo_labels.shape)} differ")
    idx = pseudo_labels.reshape(-1).long()
    conf = confident.reshape(-1).to(torch.float64)
    n_pl = torch.zeros(num_classes, dtype=torch.float64, device=idx.device).scatter_add_(
        0, idx, torch.ones_like(conf))
    n_conf = torch.zeros(num_classes, dtype=torch.float64, device=idx.device).scatter_add_(0, idx, conf)
    out = {"n_vox": n_pl.sum(), "n_conf": n_conf.sum()}
    for c in range(num_classes):
        out[f"n_pl_{c}"] = n_pl[c]
        out[f"n_conf_{c}"] = n_conf[c]
    return out
