"""GPU intensity operations that turn the loader's weak view into the strong view (ACTION spec 2.3).

The weak view is the nnU-Net loader output; the strong view adds, per sample and each with
probability ``p``: brightness ``x * U(0.75, 1.25)``; contrast ``(x - mean) * U(0.75, 1.25) + mean``
about the per-channel mean; Gaussian blur with ``sigma ~ U(0.15, 1.15)`` voxels (isotropic, every
channel). Spatially nothing changes, so pseudo-labels from the weak view stay aligned.

Axes: ``(B, C, *S)``, ``S = (H, W)`` or ``(D, H, W)``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def _uniform(shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    # drawn on the generator's device, so a CPU generator can drive CUDA tensors
    if generator is None:
        return torch.rand(tuple(shape), device=device)
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample ``sigma``, edges replicated.

    Args:
        x: ``(B, C, *S)`` float, ``S`` of length 1, 2 or 3.
        sigma: ``(B,)`` standard deviations in voxels (> 0).
        radius: kernel half-width (the kernel has ``2 radius + 1`` taps on every axis).

    Returns:
        ``(B, C, *S)``, same dtype as ``x``.
    """
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    n = len(spatial)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    offs = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offs[None, :] / sigma.float()[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, k)
    # one grouped convolution per axis handles every sample's own sigma at once
    out = x.float().reshape(1, b * c, *spatial)
    for a in range(n):
        shape = [b * c, 1] + [1] * n
        shape[2 + a] = 2 * radius + 1
        pad = [0, 0] * n
        pad[2 * (n - 1 - a)] = radius
        pad[2 * (n - 1 - a) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), kernel.view(shape), groups=b * c)
    return out.reshape(x.shape).to(x.dtype)


class StrongView:
    """Per-sample brightness, contrast and Gaussian blur, each applied with probability ``p``.

    Args:
        p: probability of each operation per sample (0.5).
        brightness: range of the multiplicative brightness factor.
        contrast: range of the contrast factor (applied about the per-sample, per-channel mean).
        blur_sigma: range of the blur standard deviation in voxels.

    Call:
        ``view(x, generator)`` with ``x`` ``(B, C, *S)`` returns a new tensor of the same shape and
        dtype. All random numbers come from ``generator`` (any device), so a seeded generator gives
        identical views.
    """

    def __init__(self, p: float = 0.5, brightness: Tuple[float, float] = (0.75, 1.25),
                 contrast: Tuple[float, float] = (0.75, 1.25), blur_sigma: Tuple[float, float] = (0.15, 1.15)):
        self.p = float(p)
        self.brightness = tuple(float(v) for v in brightness)
        self.contrast = tuple(float(v) for v in contrast)
        self.blur_sigma = tuple(float(v) for v in blur_sigma)
        self.radius = max(1, int(math.ceil(3.0 * self.blur_sigma[1])))

    @staticmethod
    def _span(u: torch.Tensor, bounds: Tuple[float, float]) -> torch.Tensor:
        return bounds[0] + u * (bounds[1] - bounds[0])

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        b = x.shape[0]
        view = (b,) + (1,) * (x.ndim - 1)
        # all draws up front, in a fixed order, so results do not depend on which ops fire
        u = _uniform((6, b), generator, x.device)
        out = x.float()
        factor = torch.where(u[0] < self.p, self._span(u[1], self.brightness), torch.ones_like(u[1]))
        out = out * factor.view(view)
        fire = u[2] < self.p
        if bool(fire.any()):
            mean = out.flatten(2).mean(2).view(b, x.shape[1], *([1] * (x.ndim - 2)))
            # where() rather than a factor of 1, so samples without contrast change stay bit-identical
            out = torch.where(fire.view(view), (out - mean) * self._span(u[3], self.contrast).view(view) + mean, out)
        blur = (u[4] < self.p).nonzero().squeeze(1)
        if blur.numel():
            sigma = self._span(u[5][blur], self.blur_sigma)
            out[blur] = gaussian_blur(out[blur], sigma, self.radius)
        return out.to(x.dtype)
