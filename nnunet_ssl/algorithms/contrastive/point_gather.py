"""Multi-level features at sparse full-resolution points, without building full-resolution maps.

ACTION's representation head looks at the bottleneck and every decoder stage upsampled to full
resolution. Concatenated, that map has ~1100 channels in 3D (gigabytes), yet the contrastive losses
only ever read a few thousand voxels of it. ``FeatureCapture`` keeps references to the stage outputs
(autograd holds them anyway) and ``gather_points`` interpolates each level at just those voxels.

Coordinates are ``(N, 1 + n)`` long tensors: column 0 is the batch index, columns ``1..n`` the voxel
index along the ``n`` spatial axes (``(H, W)`` in 2D, ``(D, H, W)`` in 3D) of the full-resolution grid.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn


def uniform(shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """``U[0, 1)`` float32 samples of ``shape`` on ``device``, drawn from ``generator``.

    Draws on the generator's own device and moves the result, so a CPU generator can drive CUDA
    tensors (``torch.rand`` refuses a generator on another device). ``generator=None`` uses the
    global RNG of ``device``.
    """
    if generator is None:
        return torch.rand(tuple(shape), device=device)
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)


def randint(high: int, shape: Sequence[int], generator: Optional[torch.Generator],
            device: torch.device) -> torch.Tensor:
    """Uniform int64 samples in ``[0, high)`` of ``shape`` on ``device``; see ``uniform`` for ``generator``."""
    if generator is None:
        return torch.randint(0, high, tuple(shape), device=device)
    return torch.randint(0, high, tuple(shape), generator=generator, device=generator.device).to(device)


def unravel(flat: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Flat (C-order) indices ``(N,)`` into a grid of ``shape`` -> coordinates ``(N, len(shape))`` long."""
    cols = []
    rest = flat
    for size in reversed(tuple(shape)):
        cols.append(rest % size)
        rest = rest // size
    return torch.stack(cols[::-1], dim=1) if cols else flat.new_zeros((flat.numel(), 0))


def sample_coords(mask: torch.Tensor, num: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw ``num`` voxels uniformly, with replacement, from the True voxels of ``mask``.

    Args:
        mask: ``(B, *S)`` bool, ``S = (H, W)`` or ``(D, H, W)``.
        num: number of draws.
        generator: ``torch.Generator`` (any device) for reproducible, per-rank sampling.

    Returns:
        ``(num, 1 + n)`` long coordinates ``[b, i_1, ..., i_n]`` on ``mask.device``; ``(0, 1 + n)``
        when ``mask`` is empty or ``num == 0``.
    """
    flat = mask.reshape(-1).nonzero().squeeze(1)
    if flat.numel() == 0 or num <= 0:
        return torch.zeros((0, mask.ndim), dtype=torch.long, device=mask.device)
    pick = flat[randint(flat.numel(), (num,), generator, mask.device)]
    return unravel(pick, mask.shape)


def gather_points(
    features: Sequence[torch.Tensor],
    coords: torch.Tensor,
    full_shape: Sequence[int],
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Features of several resolutions, (bi/tri)linearly upsampled to ``full_shape``, read at ``coords``.

    Equals ``torch.cat([F.interpolate(f, size=full_shape, mode='bilinear'/'trilinear',
    align_corners=False)[b, :, i_1, ..., i_n] for f in features], 1)`` but reads only the ``2^n``
    neighbours of each point, so no full-resolution map is built. Per axis the source position is
    ``(i + 0.5) * S_l / S - 0.5`` clamped to ``[0, S_l - 1]``, exactly PyTorch's rule. Gradients flow
    into ``features``.

    Args:
        features: list of ``(B, C_l, *S_l)`` tensors, ``S_l`` with the same ``n`` as ``full_shape``.
        coords: ``(N, 1 + n)`` long, ``[b, i_1, ..., i_n]`` with ``0 <= i_a < full_shape[a]``.
        full_shape: the full-resolution spatial shape ``S`` (``(H, W)`` or ``(D, H, W)``).
        dtype: output dtype; default the promoted dtype of ``features`` (as ``F.interpolate``).

    Returns:
        ``(N, sum_l C_l)`` with channels in the order of ``features``.
    """
    full_shape = tuple(int(s) for s in full_shape)
    n = len(full_shape)
    if coords.ndim != 2 or coords.shape[1] != n + 1:
        raise ValueError(f"coords must be (N, {n + 1}), got {tuple(coords.shape)}")
    if dtype is None:
        dtype = features[0].dtype
        for f in features[1:]:
            dtype = torch.promote_types(dtype, f.dtype)
    coords = coords.to(features[0].device)
    b = coords[:, 0]
    outs = []
    for f in features:
        spatial = tuple(f.shape[2:])
        if len(spatial) != n:
            raise ValueError(f"feature of shape {tuple(f.shape)} does not have {n} spatial axes")
        # float32 (float64 for double features) positions match the interpolate kernels' arithmetic
        acc_dtype = torch.promote_types(f.dtype, torch.float32)
        lo, hi, frac = [], [], []
        for a in range(n):
            scale = spatial[a] / full_shape[a]
            src = ((coords[:, 1 + a].to(acc_dtype) + 0.5) * scale - 0.5).clamp(0.0, spatial[a] - 1)
            i0 = src.floor().long()
            lo.append(i0)
            hi.append((i0 + 1).clamp(max=spatial[a] - 1))
            frac.append(src - i0.to(acc_dtype))
        strides = [1] * n
        for a in range(n - 2, -1, -1):
            strides[a] = strides[a + 1] * spatial[a + 1]
        flat = f.flatten(2)
        acc = None
        # one corner at a time keeps the transient at (N, C_l) instead of (2^n N, C_l)
        for corner in itertools.product((0, 1), repeat=n):
            idx = torch.zeros_like(b)
            weight = torch.ones_like(frac[0])
            for a, bit in enumerate(corner):
                idx = idx + strides[a] * (hi[a] if bit else lo[a])
                weight = weight * (frac[a] if bit else 1.0 - frac[a])
            term = flat[b, :, idx].to(acc_dtype) * weight[:, None]
            acc = term if acc is None else acc + term
        outs.append(acc)
    return torch.cat(outs, dim=1).to(dtype)


class FeatureCapture:
    """Forward hooks that keep the latest output of each watched module.

    ACTION hooks the bottleneck (``encoder.stages[-1]``) and every ``decoder.stages[k]`` of the
    unwrapped student, after the teacher has been deep-copied (a deepcopy would copy the hooks). The
    store holds references to tensors autograd already keeps, so it costs no memory while the graph
    lives; ``clear()`` it every step so it does not outlive the graph.

    Args:
        modules: the modules to watch; ``features()`` returns their outputs in this order.

    Example:
        >>> cap = FeatureCapture([net.encoder.stages[-1], *net.decoder.stages])
        >>> _ = net(x); feats = cap.features()  # list of (B, C_l, *S_l)
        >>> cap.clear(); cap.remove()
    """

    def __init__(self, modules: Sequence[nn.Module]):
        self.active = True  # switch off around forwards whose features are not needed (validation)
        self._store: Dict[int, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._make_hook(i)) for i, m in enumerate(modules)]
        self._num = len(self._handles)

    def _make_hook(self, index: int):
        def hook(module, inputs, output):
            if not self.active:
                return
            if isinstance(output, (tuple, list)):
                output = output[0]
            # a module run twice in one step keeps its latest output
            self._store[index] = output

        return hook

    def features(self) -> List[torch.Tensor]:
        """Captured outputs ``(B, C_l, *S_l)`` in module order; raises if a module has not run."""
        missing = [i for i in range(self._num) if i not in self._store]
        if missing:
            raise RuntimeError(f"FeatureCapture: modules {missing} produced no output since the last clear()")
        return [self._store[i] for i in range(self._num)]

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        """Drop the stored references (call once per training step)."""
        self._store.clear()

    def remove(self) -> None:
        """Remove the hooks and clear the store."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "FeatureCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
