"""Confidence-weighted pseudo-label cross-entropy (ACTION spec 2.7, following the released code).

Instead of masking voxels, every case ``b`` gets one weight ``w_b``: the fraction of its voxels whose
teacher confidence reaches ``theta_s``. The weighted per-voxel CE is then averaged over the voxels
with positive CE.

Axes: logits ``(B, C, *S)`` with classes on dim 1; labels and confidences ``(B, *S)``,
``S = (H, W)`` or ``(D, H, W)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def confidence_weights(confidence: torch.Tensor, threshold: float = 0.97) -> torch.Tensor:
    """``w_b = |{i : c_{b,i} >= threshold}| / |{i}|``: ``(B, *S) -> (B,)`` float32."""
    return (confidence.float() >= threshold).flatten(1).float().mean(dim=1)


def confidence_weighted_ce(logits: torch.Tensor, pseudo_labels: torch.Tensor, confidence: torch.Tensor,
                           threshold: float = 0.97) -> torch.Tensor:
    """``L = sum_{b,i} w_b l_{b,i} [l_{b,i} > 0] / |{(b, i) : l_{b,i} > 0}|``, ``l = -log p[y]``.

    Computed in float32 with autocast off; 0 (attached to ``logits``) if no voxel has positive CE.

    Args:
        logits: ``(B, C, *S)`` student logits on the mixed, strongly augmented unlabeled images.
        pseudo_labels: ``(B, *S)`` integer (e.g. uint8) mixed hard pseudo-labels.
        confidence: ``(B, *S)`` mixed teacher confidences (any float dtype).
        threshold: ``theta_s`` (0.97).

    Returns:
        Scalar loss.
    """
    if logits.shape[0] != pseudo_labels.shape[0] or logits.shape[2:] != pseudo_labels.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match pseudo-labels {tuple(pseudo_labels.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        ce = F.cross_entropy(logits.float(), pseudo_labels.long(), reduction="none")
        w = confidence_weights(confidence, threshold).to(ce.device)
        positive = ce > 0
        weighted = w.view(-1, *([1] * (ce.ndim - 1))) * ce * positive
        count = positive.sum()
        return weighted.sum() / count.clamp(min=1)
