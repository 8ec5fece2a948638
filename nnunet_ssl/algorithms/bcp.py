"""Bidirectional copy-paste (BCP; Bai et al., CVPR 2023): box, pairing, mixing, LCC filter, region targets.

Specification: ``specs/bcp.md`` (section numbers below refer to it). One box ``B`` per iteration, about
``beta = 2/3`` of every patch axis, placed at a random position, is shared by all images and both directions:

* ``X_LU = B * L + (1 - B) * U`` (a labeled box on an unlabeled background),
* ``X_UL = B * U + (1 - B) * L`` (an unlabeled box on a labeled background),

and the targets are cut with the same box from the ground truth ``y_L`` and the EMA teacher's hard pseudo-label
``y^_U`` of the *clean* unlabeled image. Each mixed target splits into a ground-truth region ``R_lab`` and a
pseudo-labeled region ``R_pse``; :func:`region_targets` writes the complementary region as an ignore index, so
that any loss with an ignore index (nnU-Net's ``DC_and_CE_loss``) becomes the loss restricted to the region.

Axes: images ``(B, C, *S)``, hard label maps ``(B, *S)`` or nnU-Net's ``(B, 1, *S)``, box masks ``(*S)`` bool
(broadcast over the batch and channel axes), with ``S = (H, W)`` or ``(D, H, W)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from nnunet_ssl.algorithms.mixing import partner

#: the paper's beta: the box spans 2/3 of every axis (4/9 of a 2D patch, 8/27 of a 3D patch)
DEFAULT_BOX_FRACTION = Fraction(2, 3)


def box_sides(spatial: Sequence[int], fraction: Union[float, Fraction] = DEFAULT_BOX_FRACTION) -> Tuple[int, ...]:
    """Box side per axis: ``side_a = max(1, floor(fraction * S_a))`` (spec 2.1).

    The product is computed with an exact fraction (``2/3`` as a float times 6 must give 4, not 3.999...).

    Args:
        spatial: patch size ``S`` (2 or 3 axes, any number works).
        fraction: ``beta`` in ``(0, 1]``.

    Returns:
        ``sides``, one int per axis.
    """
    beta = Fraction(fraction).limit_denominator(10 ** 6)
    if not 0 < beta <= 1:
        raise ValueError(f"box fraction must be in (0, 1], got {fraction}")
    return tuple(max(1, math.floor(beta * int(s))) for s in spatial)


def draw_box_starts(spatial: Sequence[int], sides: Sequence[int],
                    generator: Optional[torch.Generator] = None) -> Tuple[int, ...]:
    """Uniform box position: ``start_a ~ U{0, ..., S_a - side_a}``, drawn per axis in axis order.

    Every legal position is reachable, including the one touching the high border (the released code's
    ``randint(0, S - side)`` never reaches it, spec 4.3). One ``torch.randint(0, S_a - side_a + 1, (1,))``
    per axis, so a seeded CPU generator reproduces spec test T2.
    """
    return tuple(int(torch.randint(0, int(s) - int(side) + 1, (1,), generator=generator))
                 for s, side in zip(spatial, sides))


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in a patch.

    Attributes:
        spatial: patch size ``S``.
        sides: box side per axis.
        starts: first index of the box per axis.
    """

    spatial: Tuple[int, ...]
    sides: Tuple[int, ...]
    starts: Tuple[int, ...]

    def __post_init__(self):
        if not len(self.spatial) == len(self.sides) == len(self.starts):
            raise ValueError(f"spatial {self.spatial}, sides {self.sides} and starts {self.starts} differ in length")
        for s, side, start in zip(self.spatial, self.sides, self.starts):
            if not (1 <= side <= s and 0 <= start <= s - side):
                raise ValueError(f"box (sides {self.sides}, starts {self.starts}) does not fit in {self.spatial}")

    @property
    def volume_fraction(self) -> float:
        """Share of the patch inside the box."""
        return math.prod(self.sides) / math.prod(self.spatial)

    def mask(self, device: Optional[Union[torch.device, str]] = None) -> torch.Tensor:
        """``(*S)`` bool, True inside the box (``B`` of the spec; the released ``img_mask`` is ``~B``)."""
        m = torch.zeros(self.spatial, dtype=torch.bool, device=device)
        m[tuple(slice(a, a + side) for a, side in zip(self.starts, self.sides))] = True
        return m


def random_box(spatial: Sequence[int], fraction: Union[float, Fraction] = DEFAULT_BOX_FRACTION,
               generator: Optional[torch.Generator] = None, starts: Optional[Sequence[int]] = None) -> Box:
    """The BCP box of a patch of size ``spatial``: :func:`box_sides`, then ``starts`` or :func:`draw_box_starts`."""
    spatial = tuple(int(s) for s in spatial)
    sides = box_sides(spatial, fraction)
    starts = tuple(int(a) for a in starts) if starts is not None else draw_box_starts(spatial, sides, generator)
    return Box(spatial, sides, starts)


@dataclass(frozen=True)
class BCPPairs:
    """Which labeled/unlabeled pairs ``(L_i, U_i)`` feed which direction (spec 2.2).

    Attributes:
        k: ``min(B_l, B_u)``; cases with index ``>= k`` are unused (not even by the teacher).
        lu: indices ``i`` of the pairs mixed as ``X_LU``.
        ul: indices ``i`` of the pairs mixed as ``X_UL``.
    """

    k: int
    lu: Tuple[int, ...]
    ul: Tuple[int, ...]


def bcp_pairs(n_labeled: int, n_unlabeled: int) -> BCPPairs:
    """``k = min(B_l, B_u)``, ``n_UL = floor(k / 2)``, ``n_LU = k - n_UL``; LU takes the first ``n_LU`` pairs,
    UL the rest. With ``k = 1`` the single pair is used in both directions, so both losses always exist (and
    every DDP rank makes the same loss calls)."""
    k = min(int(n_labeled), int(n_unlabeled))
    if k < 1:
        raise ValueError(f"BCP needs at least one labeled and one unlabeled case, got {n_labeled} and {n_unlabeled}")
    if k == 1:
        return BCPPairs(1, (0,), (0,))
    n_lu = k - k // 2
    return BCPPairs(k, tuple(range(n_lu)), tuple(range(n_lu, k)))


def copy_paste(box_mask: torch.Tensor, inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """``B * inside + (1 - B) * outside`` as a selection (exact, dtype kept).

    Args:
        box_mask: ``(*S)`` bool; broadcast over the leading axes of the other inputs.
        inside: ``(..., *S)`` content of the box (image ``(B, C, *S)`` or labels ``(B, [1,] *S)``).
        outside: same shape as ``inside``: the background.

    Returns:
        Tensor of ``inside``'s shape and dtype.
    """
    if inside.shape != outside.shape or inside.shape[inside.ndim - box_mask.ndim:] != box_mask.shape:
        raise ValueError(f"copy_paste: inside {tuple(inside.shape)}, outside {tuple(outside.shape)} and box mask "
                         f"{tuple(box_mask.shape)} do not match")
    return torch.where(box_mask, inside, outside)


def bidirectional_mix(box_mask: torch.Tensor, labeled: torch.Tensor, unlabeled: torch.Tensor,
                      pairs: BCPPairs) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(X_LU, X_UL)`` of ``labeled`` ``(B_l, C, *S)`` and ``unlabeled`` ``(B_u, C, *S)``.

    Returns:
        ``X_LU = B L_i + (1 - B) U_i`` for ``i in pairs.lu`` (``(len(lu), C, *S)``) and
        ``X_UL = B U_i + (1 - B) L_i`` for ``i in pairs.ul`` (``(len(ul), C, *S)``).
    """
    lu, ul = list(pairs.lu), list(pairs.ul)
    return (copy_paste(box_mask, labeled[lu], unlabeled[lu]), copy_paste(box_mask, unlabeled[ul], labeled[ul]))


def pretrain_mix(box_mask: torch.Tensor, images: torch.Tensor, labels: Sequence[torch.Tensor]
                 ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Stage-1 copy-paste of labeled cases among themselves (spec 2.6): case ``i`` is the background, the box
    comes from ``j = (i + 1) mod B_l`` (:func:`~nnunet_ssl.algorithms.mixing.partner`). With ``B_l = 1`` the
    case is its own partner, i.e. nothing is mixed.

    Args:
        box_mask: ``(*S)`` bool at full resolution.
        images: ``(B_l, C, *S)``.
        labels: per deep-supervision scale ``(B_l, 1, *S_s)`` (scale 0 = full resolution).

    Returns:
        ``(X, [Y_s])``: the mixed images and the mixed labels of every scale, cut by the same box
        (:func:`resize_nearest` of ``box_mask`` to each ``S_s``).
    """
    mixed = [copy_paste(resize_nearest(box_mask, y.shape[2:]), partner(y), y) for y in labels]
    return copy_paste(box_mask, partner(images), images), mixed


def resize_nearest(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-exact resampling of the trailing ``len(size)`` axes, as nnU-Net's ``DownsampleSegForDSTransform``.

    Pure index selection (``src = floor((dst + 0.5) * S / size)``), so it commutes with :func:`copy_paste`:
    resizing a mixed label map equals mixing the resized label maps with the resized box.

    Args:
        x: ``(*lead, *S)`` of any dtype (bool and integer maps included); ``lead`` may be empty.
        size: the target ``S'``.

    Returns:
        ``(*lead, *S')`` with ``x``'s dtype; ``x`` itself when ``S' == S``.
    """
    size = tuple(int(s) for s in size)
    n = len(size)
    if tuple(x.shape[x.ndim - n:]) == size:
        return x
    lead = x.shape[:x.ndim - n]
    flat = x.reshape(1, -1, *x.shape[x.ndim - n:])
    # float32 holds every label index exactly; interpolate is undefined for bool/int
    out = F.interpolate(flat.float(), size=size, mode="nearest-exact")
    return out.reshape(*lead, *size).to(x.dtype)


def region_targets(box_mask: torch.Tensor, y_labeled: torch.Tensor, y_pseudo: torch.Tensor, direction: str,
                   ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mixed target ``Y`` split into its ground-truth and pseudo-labeled regions (spec 2.4).

    * ``LU``: ``Y = B y_L + (1 - B) y^_U``, ``R_lab = B``, ``R_pse = 1 - B``;
    * ``UL``: ``Y = B y^_U + (1 - B) y_L``, ``R_lab = 1 - B``, ``R_pse = B``.

    Args:
        box_mask: ``(*S)`` bool, the box at this resolution.
        y_labeled: ``(n, 1, *S)`` (or ``(n, *S)``) ground truth of the paired labeled cases; voxels equal to
            the dataset's ignore label stay ignored.
        y_pseudo: the pseudo-labels of the paired unlabeled cases, same shape (any integer or float dtype).
        direction: ``"LU"`` or ``"UL"``.
        ignore_index: written outside each region (``IGN``: the dataset's ignore label, else ``C``).

    Returns:
        ``(target_lab, target_pse)`` with ``y_labeled``'s shape and dtype: ``Y`` on ``R_lab`` (resp. ``R_pse``)
        and ``ignore_index`` elsewhere. A loss with ``ignore_index`` on them is the loss restricted to the region.
    """
    if direction not in ("LU", "UL"):
        raise ValueError(f"direction must be 'LU' or 'UL', got {direction!r}")
    if y_labeled.shape != y_pseudo.shape:
        raise ValueError(f"labels {tuple(y_labeled.shape)} and pseudo-labels {tuple(y_pseudo.shape)} differ")
    r_lab = box_mask if direction == "LU" else ~box_mask
    ign = torch.full((), ignore_index, dtype=y_labeled.dtype, device=y_labeled.device)
    return (torch.where(r_lab, y_labeled, ign), torch.where(r_lab, ign, y_pseudo.to(y_labeled.dtype)))


def region_targets_ds(box_mask: torch.Tensor, y_labeled: Sequence[torch.Tensor], y_pseudo: torch.Tensor,
                      direction: str, ignore_index: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """:func:`region_targets` at every deep-supervision scale (spec 3, "Deep supervision").

    Args:
        box_mask: ``(*S)`` bool at full resolution.
        y_labeled: nnU-Net's per-scale ground truths ``(n, 1, *S_s)`` (scale 0 = full resolution).
        y_pseudo: ``(n, *S)`` full-resolution pseudo-labels.
        direction, ignore_index: as in :func:`region_targets`.

    Returns:
        ``([target_lab_s], [target_pse_s])``. The box and the pseudo-labels are brought to each scale with
        :func:`resize_nearest`, so this equals resizing the full-resolution targets as nnU-Net resizes labels.
    """
    lab, pse = [], []
    for y in y_labeled:
        size = y.shape[2:]
        t_lab, t_pse = region_targets(resize_nearest(box_mask, size), y,
                                      resize_nearest(y_pseudo, size).unsqueeze(1), direction, ignore_index)
        lab.append(t_lab)
        pse.append(t_pse)
    return lab, pse


def largest_component_per_class(labels: Union[torch.Tensor, np.ndarray]
                                ) -> Tuple[Union[torch.Tensor, np.ndarray], int, int]:
    """Keep, per image and per foreground class, only the largest connected component (spec 2.3).

    Full connectivity (8 neighbours in 2D, 26 in 3D, skimage's default); other components of class ``c``
    become background 0. On a size tie, the component whose first voxel in C order comes first is kept
    (``scipy.ndimage.label`` numbers components in that order). Runs on the CPU.

    Args:
        labels: ``(B, *S)`` hard labels, 0 = background (tensor on any device, or array).

    Returns:
        ``(filtered, n_removed, n_foreground)``: the filtered labels (same type, dtype and device), the number of
        foreground voxels set to 0 and the number of foreground voxels before filtering.
    """
    is_tensor = torch.is_tensor(labels)
    arr = labels.detach().cpu().numpy() if is_tensor else np.asarray(labels)
    out = arr.copy()
    n_fg = int(np.count_nonzero(arr))
    removed = 0
    for b in range(arr.shape[0]):
        img = out[b]
        structure = ndimage.generate_binary_structure(img.ndim, img.ndim)
        for c in np.unique(img):
            if c == 0:
                continue
            comp, n = ndimage.label(img == c, structure=structure)
            if n < 2:
                continue
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            drop = (comp > 0) & (comp != int(np.argmax(sizes)))  # argmax: first (C-order) of the largest
            removed += int(np.count_nonzero(drop))
            img[drop] = 0
    if is_tensor:
        return torch.from_numpy(out).to(labels.device), removed, n_fg
    return out, removed, n_fg


def stage_boundary(num_epochs: int, fraction: float) -> int:
    """First epoch of stage 2: ``E_pre = round(fraction * num_epochs)``, halves rounded up (as ACTION's stages).

    ``fraction = 0`` starts the mean-teacher stage at epoch 0 (no pre-training).
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"pretrain fraction must be in [0, 1], got {fraction}")
    return min(int(num_epochs), int(math.floor(fraction * num_epochs + 0.5)))
