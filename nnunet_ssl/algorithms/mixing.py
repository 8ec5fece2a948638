"""CutMix and ClassMix of unlabeled images with their pseudo-labels and confidences (ACTION spec 2.7).

Each case ``b`` is mixed with its partner ``b' = (b + 1) mod B``: where the mask is True the content
(image, hard label, confidence alike) comes from the partner. The same mask is applied to every
tensor, so pseudo-labels stay aligned with the pixels they describe. With ``B = 1`` there is no
partner and the mix is skipped (``skipped=True``) rather than mixing an image with itself.

Axes: images ``(B, C, *S)``, per-voxel maps ``(B, *S)``, masks ``(B, *S)`` bool, with
``S = (H, W)`` or ``(D, H, W)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


def _uniform(shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    # drawn on the generator's device, so a CPU generator can drive CUDA tensors
    if generator is None:
        return torch.rand(tuple(shape), device=device)
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)


@dataclass
class MixResult:
    """Output of a mix.

    Attributes:
        image: ``(B, C, *S)`` mixed image.
        labels: ``(B, *S)`` mixed hard pseudo-labels (dtype kept, e.g. uint8).
        confidence: ``(B, *S)`` mixed confidences (dtype kept, e.g. float16).
        mask: ``(B, *S)`` bool, True where the content came from the partner ``(b + 1) mod B``.
        skipped: True when ``B = 1`` (outputs are the inputs, mask all False).
    """

    image: torch.Tensor
    labels: torch.Tensor
    confidence: torch.Tensor
    mask: torch.Tensor
    skipped: bool


def partner(x: torch.Tensor) -> torch.Tensor:
    """The partner of every case along dim 0: ``out[b] = x[(b + 1) mod B]``."""
    return torch.roll(x, shifts=-1, dims=0)


def apply_mix(mask: torch.Tensor, image: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor,
              skipped: bool = False) -> MixResult:
    """Apply one mask to image, labels and confidences.

    Args:
        mask: ``(B, *S)`` bool, True = take the partner's content.
        image: ``(B, C, *S)``; labels, confidence: ``(B, *S)``.
        skipped: recorded in the result.

    Returns:
        A ``MixResult``; dtypes are preserved.
    """
    return MixResult(
        image=torch.where(mask[:, None], partner(image), image),
        labels=torch.where(mask, partner(labels), labels),
        confidence=torch.where(mask, partner(confidence), confidence),
        mask=mask,
        skipped=skipped,
    )


def _no_mix(image: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor) -> MixResult:
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    return MixResult(image, labels, confidence, mask, skipped=True)


class CutMix:
    """One box per case, filled from the partner.

    The box side is ``round(S_a * area ** (1/n))`` per axis (``area = 0.5``: 0.707 S_a in 2D,
    0.794 S_a in 3D), i.e. about half the patch, placed uniformly inside it.

    Args:
        area: box volume as a fraction of the patch (0.5).
    """

    def __init__(self, area: float = 0.5):
        if not 0.0 < area <= 1.0:
            raise ValueError(f"CutMix area must be in (0, 1], got {area}")
        self.area = float(area)

    def box_mask(self, batch: int, spatial: Sequence[int], generator: Optional[torch.Generator] = None,
                 device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """Random box masks ``(batch, *spatial)`` bool, one box per case."""
        spatial = tuple(int(s) for s in spatial)
        n = len(spatial)
        sides = [max(1, min(s, round(s * self.area ** (1.0 / n)))) for s in spatial]
        u = _uniform((batch, n), generator, device)
        mask = torch.ones((batch, *spatial), dtype=torch.bool, device=device)
        for a, (s, side) in enumerate(zip(spatial, sides)):
            start = (u[:, a] * (s - side + 1)).long().clamp(max=s - side)
            pos = torch.arange(s, device=device)
            inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < start[:, None] + side)  # (B, s)
            view = [batch] + [1] * n
            view[1 + a] = s
            mask &= inside.view(view)
        return mask

    def __call__(self, image: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> MixResult:
        """Mix ``image`` ``(B, C, *S)``, ``labels`` ``(B, *S)`` and ``confidence`` ``(B, *S)`` identically."""
        if image.shape[0] < 2:
            return _no_mix(image, labels, confidence)
        mask = self.box_mask(image.shape[0], image.shape[2:], generator, image.device)
        return apply_mix(mask, image, labels, confidence)


class ClassMix:
    """Paste ``floor(n_b / 2)`` randomly chosen classes of the partner's pseudo-label onto each case.

    The mask for case ``b`` is True where the partner's label ``y_{b'}`` is one of a random half of the
    ``n_{b'}`` classes present in it, so whole partner objects are pasted together with their own
    labels (the original ClassMix rule, written for "True = partner content").
    """

    def class_mask(self, labels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Masks ``(B, *S)`` bool selecting a random half of the classes present in each ``labels[b]``."""
        masks = []
        for b in range(labels.shape[0]):
            present = torch.unique(labels[b])
            k = present.numel() // 2
            order = torch.argsort(_uniform((present.numel(),), generator, labels.device))
            chosen = present[order[:k]]
            masks.append(torch.isin(labels[b], chosen))
        return torch.stack(masks)

    def __call__(self, image: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> MixResult:
        """Mix ``image`` ``(B, C, *S)``, ``labels`` ``(B, *S)`` and ``confidence`` ``(B, *S)`` identically."""
        if image.shape[0] < 2:
            return _no_mix(image, labels, confidence)
        mask = partner(self.class_mask(labels, generator))
        return apply_mix(mask, image, labels, confidence)
