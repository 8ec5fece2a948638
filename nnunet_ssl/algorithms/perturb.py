"""Input perturbations for the student's view of unlabeled images."""
from __future__ import annotations

from typing import Optional

import torch


def clipped_gaussian_noise(x: torch.Tensor, std: float = 0.1, clip: float = 0.2,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``x + clamp(N(0, std^2), -clip, clip)``: the input noise of the Mean Teacher segmentation baselines.

    Args:
        x: images ``(B, C_in, *spatial)``, z-scored as nnU-Net normalises them (so ``std`` is in units of
            the image's standard deviation).
        std, clip: noise standard deviation and symmetric clipping bound.
        generator: optional ``torch.Generator`` on ``x.device`` for reproducible noise.

    Returns:
        A new tensor of the shape and dtype of ``x``.
    """
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * std
    return x + noise.clamp_(-clip, clip)
