"""Tiny synthetic nnU-Net datasets with known ground truth (labeled, unlabeled and test cases).

Each case is a smooth, noisy background with an ellipsoidal "organ" (label 1) holding a smaller
eccentric "lesion" (label 2); the two differ in mean intensity by less than the noise, so shape and
context matter. Used by the demo and the tests; 2D datasets follow nnU-Net's convention of a single
slice with a large through-plane spacing.
"""
from __future__ import annotations

import os
from typing import Sequence, Tuple

import numpy as np

LABELS = {"background": 0, "organ": 1, "lesion": 2}


def _case(rng: np.random.Generator, shape: Sequence[int], num_channels: int) -> Tuple[np.ndarray, np.ndarray]:
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    seg = np.zeros(shape, np.uint8)
    centre = rng.uniform(-0.3, 0.3, len(shape))
    radii = rng.uniform(0.35, 0.6, len(shape))
    if shape[0] == 1:  # 2D: the through-plane axis must not cut the organ away
        centre[0], radii[0] = 0.0, 10.0
    organ = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1
    seg[organ] = 1
    lc = centre + rng.uniform(-0.3, 0.3, len(shape)) * radii
    lr = radii * rng.uniform(0.4, 0.55)
    if shape[0] == 1:
        lc[0], lr[0] = 0.0, 10.0
    lesion = (sum(((g - c) / r) ** 2 for g, c, r in zip(grids, lc, lr)) <= 1) & organ
    seg[lesion] = 2
    images = []
    for ch in range(num_channels):
        smooth = sum(np.sin((ch + 1 + rng.uniform(1, 3)) * g + rng.uniform(0, 6)) for g in grids)
        img = 100 + 8 * smooth + rng.normal(0, 12, shape)
        img[organ] += 30 + 5 * ch
        img[lesion] -= 40
        images.append(img.astype(np.float32))
    return np.stack(images), seg


def make_synthetic_dataset(raw_root: str, dataset_id: int = 990, name: str = "SSLSynthetic", dim: int = 3,
                           n_labeled: int = 4, n_unlabeled: int = 8, n_test: int = 4,
                           shape: Sequence[int] | None = None, num_channels: int = 1, seed: int = 0,
                           file_ending: str = ".nii.gz") -> str:
    """Write ``DatasetXXX_Name`` (imagesTr/labelsTr, imagesUnlabeled, imagesTs/labelsTs, dataset.json).

    Args:
        raw_root: the ``nnUNet_raw`` folder.
        dim: 3 (volumes, default shape (16, 40, 40), spacing (2, 1, 1) mm) or 2 (one slice, shape (1, 64, 64),
            spacing (999, 1, 1) mm as nnU-Net's 2D datasets).
        n_labeled, n_unlabeled, n_test: cases per split.

    Returns:
        The dataset folder.
    """
    import SimpleITK as sitk
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    shape = tuple(shape) if shape is not None else ((16, 40, 40) if dim == 3 else (1, 64, 64))
    spacing_zyx = (2.0, 1.0, 1.0) if dim == 3 else (999.0, 1.0, 1.0)
    rng = np.random.default_rng(seed)
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)

    def write(arr: np.ndarray, path: str) -> None:
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))  # SimpleITK spacing is (x, y, z)
        sitk.WriteImage(im, path)

    splits = (("imagesTr", "labelsTr", "train", n_labeled), ("imagesUnlabeled", None, "unl", n_unlabeled),
              ("imagesTs", "labelsTs", "test", n_test))
    for img_dir, lbl_dir, prefix, n in splits:
        for i in range(n):
            images, seg = _case(rng, shape, num_channels)
            case = f"{prefix}{i:03d}"
            for ch, img in enumerate(images):
                write(img, os.path.join(folder, img_dir, f"{case}_{ch:04d}{file_ending}"))
            if lbl_dir is not None:
                write(seg, os.path.join(folder, lbl_dir, f"{case}{file_ending}"))
    generate_dataset_json(folder, {i: ("MRI" if i == 0 else f"ch{i}") for i in range(num_channels)}, LABELS,
                          n_labeled, file_ending, dataset_name=f"Dataset{dataset_id:03d}_{name}",
                          description="nnunet-ssl synthetic dataset", numUnlabeled=n_unlabeled,
                          license="CC0 (synthetic)", converted_by="nnunet_ssl.synthetic")
    return folder
