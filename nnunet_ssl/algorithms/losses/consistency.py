"""Consistency losses between two predictions of the same voxels."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between softmax probabilities (Mean Teacher's consistency loss).

    Args:
        student_logits: ``(B, C, *spatial)``; receives the gradient.
        teacher_logits: ``(B, C, *spatial)``; treated as a constant target (detached).

    Returns:
        Scalar float32: ``mean_{b,c,voxels} (softmax(z_s)_c - softmax(z_t)_c)^2``, the mean over all
        elements including the class axis, as in the semi-supervised segmentation literature.

    Softmax is taken in float32 with autocast disabled: fp16 probabilities of confident voxels round
    to exactly 0/1 and the difference signal vanishes.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"shape mismatch: student {tuple(student_logits.shape)} vs teacher "
                         f"{tuple(teacher_logits.shape)}")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        p_s = F.softmax(student_logits.float(), dim=1)
        p_t = F.softmax(teacher_logits.detach().float(), dim=1)
        return F.mse_loss(p_s, p_t)
