"""Distribution alignment of dense pseudo-labels (ReMixMatch, Berthelot et al., ICLR 2020, section 3.2).

A teacher's class shares on the unlabeled patches can drift from the data's: on ACDC with 3 labeled patients, BCP's
teacher labels about 1.5 times the true left-ventricle volume of the unlabeled pool, and the student learns it back
(``benchmarks/README.md``). Distribution alignment rescales every voxel's class probabilities by ``prior_c /
running_c`` and renormalises, ``q = normalize(p * prior / running)``: ``prior`` = the labeled cases' class shares,
``running`` = a running mean of the teacher's own softmax over the unlabeled patches. For argmax pseudo-labels the
rescaling is a constant shift of the logits, ``log(prior_c) - log(running_c)``, so a class the teacher predicts more
often than the labeled data holds loses ground at its decision boundaries, and a starved class gains it.

Project choices (not in ReMixMatch): the running mean starts at the first batch's mean (not at uniform), and the
ratio ``prior / running`` is clamped to ``[1 / max_ratio, max_ratio]`` so that a class the teacher has not predicted
yet cannot flood the pseudo-labels. Pure torch / numpy; no nnU-Net import.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch

from nnunet_ssl.algorithms.distributed import all_reduce_sum


def class_fractions(segmentations: Iterable, num_classes: int, ignore_label: Optional[int] = None) -> torch.Tensor:
    """Share of each class among the valid voxels of some segmentations (e.g. the labeled training cases).

    Args:
        segmentations: integer arrays or tensors of any shape (nnU-Net's ``(1, *spatial)`` seg included). Values
            outside ``[0, num_classes)`` (nnU-Net's ``-1`` outside the crop mask) and ``ignore_label`` do not count.
        num_classes: ``C``, background included.
        ignore_label: the dataset's ignore label, if any.

    Returns:
        ``(C,)`` float64, summing to 1 (voxels pooled over all segmentations).

    Raises:
        ValueError: no valid voxel at all.
    """
    counts = np.zeros(num_classes, dtype=np.float64)
    for seg in segmentations:
        v = np.asarray(seg.cpu() if isinstance(seg, torch.Tensor) else seg).reshape(-1).astype(np.int64)
        keep = (v >= 0) & (v < num_classes)
        if ignore_label is not None:
            keep &= v != ignore_label
        counts += np.bincount(v[keep], minlength=num_classes)
    if counts.sum() == 0:
        raise ValueError(f"class_fractions: no voxel with a label in [0, {num_classes}) (ignore label "
                         f"{ignore_label}) in the segmentations given; cannot estimate the class shares")
    return torch.from_numpy(counts / counts.sum())


class DistributionAlignment(torch.nn.Module):
    """Shifts ``(B, C, *spatial)`` logits by ``log(prior / running)`` (clamped), after updating ``running``.

    Buffers (saved in ``state_dict``): ``prior`` ``(C,)`` float64 (zeros until :meth:`set_prior`), ``running``
    ``(C,)`` float64, ``num_updates`` ``()`` int64.

    Args:
        num_classes: ``C``, background included.
        momentum: weight of the old value in ``running <- m running + (1 - m) batch_mean`` (0.99: about the last
            hundred steps; ReMixMatch averages the last 128 batches).
        max_ratio: ``prior_c / running_c`` is clamped to ``[1 / max_ratio, max_ratio]``.
        eps: floor of ``running`` and ``prior`` inside the logarithm.
    """

    def __init__(self, num_classes: int, momentum: float = 0.99, max_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if max_ratio < 1.0:
            raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
        self.num_classes, self.momentum, self.max_ratio, self.eps = int(num_classes), float(momentum), \
            float(max_ratio), float(eps)
        self.register_buffer("prior", torch.zeros(self.num_classes, dtype=torch.float64))
        self.register_buffer("running", torch.full((self.num_classes,), 1.0 / self.num_classes, dtype=torch.float64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    @property
    def has_prior(self) -> bool:
        return bool(self.prior.sum() > 0)

    def set_prior(self, prior: torch.Tensor) -> None:
        """``prior``: ``(C,)`` non-negative class shares (normalised here), e.g. from :func:`class_fractions`."""
        prior = torch.as_tensor(prior, dtype=torch.float64).reshape(-1)
        if prior.numel() != self.num_classes or bool((prior < 0).any()) or float(prior.sum()) <= 0:
            raise ValueError(f"prior must be {self.num_classes} non-negative shares with a positive sum, got "
                             f"{prior.tolist()}")
        self.prior.copy_(prior / prior.sum())

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> None:
        """One step of the running mean from the unaligned ``(B, C, *spatial)`` logits (softmax in float32, the
        mean over batch and voxels pooled over DDP ranks: every rank must call it, it is a collective)."""
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} channels, expected {self.num_classes} (B, C, *spatial)")
        p = torch.softmax(logits.float(), 1).transpose(0, 1).reshape(self.num_classes, -1)
        both = all_reduce_sum(torch.cat([p.sum(1).double(), p.new_tensor([p.shape[1]], dtype=torch.float64)]))
        mean = (both[:-1] / both[-1]).to(self.running.device)
        m = self.momentum if int(self.num_updates) > 0 else 0.0
        self.running.copy_(m * self.running + (1.0 - m) * mean)
        self.num_updates += 1

    def ratio(self) -> torch.Tensor:
        """``(C,)`` float64 ``prior / running``, clamped: the factor each class's probabilities get."""
        r = self.prior.clamp(min=self.eps) / self.running.clamp(min=self.eps)
        return r.clamp(1.0 / self.max_ratio, self.max_ratio)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """Aligned logits ``(B, C, *spatial)`` float32: ``logits + log(ratio)`` per class (softmax of the result =
        ``normalize(p * ratio)``). Identity until a prior is set."""
        if not self.has_prior:
            return logits.float()
        shift = self.ratio().log().to(device=logits.device, dtype=torch.float32)
        return logits.float() + shift.view(1, -1, *([1] * (logits.dim() - 2)))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, momentum={self.momentum}, max_ratio={self.max_ratio}"

