"""Tiny synthetic sources in the real layouts of each converter, with marker voxels whose position is known.

Marker convention: every image holds a unique intensity per case (so a case can be recognised after conversion)
and every label holds the value ``MARK_LABEL`` at ``MARK`` (array index in the source's own axis order).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import pytest

SimpleITK = pytest.importorskip("SimpleITK")
h5py = pytest.importorskip("h5py")
sitk = SimpleITK


def real_data_root() -> Path:
    """``$NNUNET_SSL_DATA`` or ``<repo>/../shared/data``; tests skip when it is absent."""
    env = os.environ.get("NNUNET_SSL_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def require_real(sub: str) -> Path:
    p = real_data_root() / sub
    if not p.is_dir():
        pytest.skip(f"real data {p} is absent (set NNUNET_SSL_DATA to the folder holding ACDC/ and LA/)")
    return p


@pytest.fixture
def synth():
    """This module: the source builders and their marker constants (fixtures work under every pytest import mode)."""
    return sys.modules[__name__]


@pytest.fixture(autouse=True)
def _isolated_nnunet_env(monkeypatch):
    # converters look for id clashes in $nnUNet_preprocessed/$nnUNet_results: a developer's real folders must not
    # leak into the tests
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(v, raising=False)


def read(path) -> "sitk.Image":
    return sitk.ReadImage(str(path))


def arr(path) -> np.ndarray:
    return sitk.GetArrayFromImage(read(path))


# ------------------------------------------------------------------------------------------------------------
# ACDC challenge layout
# ------------------------------------------------------------------------------------------------------------

ACDC_SIZE_ZYX = (4, 10, 12)
ACDC_SPACING_XYZ = (1.4, 1.4, 10.0)
ACDC_ORIGIN = (10.0, -5.0, 3.0)
ACDC_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
ACDC_MARK_ZYX = (1, 3, 2)  # numpy index of the LV marker voxel (SimpleITK index (2, 3, 1))


def _acdc_image(value: float, shape=ACDC_SIZE_ZYX, dtype=np.float32) -> "sitk.Image":
    a = np.full(shape, value, dtype=dtype)
    img = sitk.GetImageFromArray(a)
    img.SetSpacing(ACDC_SPACING_XYZ)
    img.SetOrigin(ACDC_ORIGIN)
    img.SetDirection(ACDC_DIRECTION)
    return img


def acdc_label_array(shape=ACDC_SIZE_ZYX) -> np.ndarray:
    seg = np.zeros(shape, np.uint8)
    seg[:, 5:8, 5:9] = 2
    seg[:, 6, 6:8] = 3
    seg[:, 1:3, 8:11] = 1
    seg[ACDC_MARK_ZYX] = 3
    return seg


def make_acdc_challenge(root: Path, train: Sequence[int] = (1, 38, 50, 99, 100), test: Sequence[int] = (101, 102),
                        test_gt: bool = True) -> Path:
    """``root/database/{training,testing}/patientXXX/`` with Info.cfg, ED/ES frames, _gt, and a 4D file to ignore.

    Image intensity = patient * 100 + frame (unique per case). ES frame = 5 + patient % 3.
    """
    for split, ids in (("training", train), ("testing", test)):
        for pid in ids:
            d = root / "database" / split / f"patient{pid:03d}"
            d.mkdir(parents=True)
            es = 5 + pid % 3
            (d / "Info.cfg").write_text(f"ED: 1\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: 20\nWeight: 80.0\n")
            for t in (1, es):
                case = f"patient{pid:03d}_frame{t:02d}"
                sitk.WriteImage(_acdc_image(pid * 100 + t), str(d / f"{case}.nii.gz"))
                if split == "training" or test_gt:
                    lbl = sitk.GetImageFromArray(acdc_label_array())
                    lbl.CopyInformation(_acdc_image(0))
                    sitk.WriteImage(lbl, str(d / f"{case}_gt.nii.gz"))
            four_d = sitk.GetImageFromArray(np.zeros((3,) + ACDC_SIZE_ZYX, np.float32))
            sitk.WriteImage(four_d, str(d / f"patient{pid:03d}_4d.nii.gz"))
            (d / "MANDATORY_CITATION.md").write_text("cite ACDC\n")
    return root


# ------------------------------------------------------------------------------------------------------------
# ACDC SSL4MIS h5 layout
# ------------------------------------------------------------------------------------------------------------

ACDC_H5_YX = (8, 6)
ACDC_H5_MARK_YX = (2, 4)


def acdc_h5_slice(patient: int, frame: int, k: int):
    """Image value encodes (patient, frame, slice k) = patient + frame / 10 + k / 1000; label 3 at the marker."""
    image = np.full(ACDC_H5_YX, patient + frame / 10 + k / 1000, np.float32)
    label = np.zeros(ACDC_H5_YX, np.uint8)
    label[0, :] = 1
    label[ACDC_H5_MARK_YX] = 3
    return image, label


def make_acdc_h5(root: Path, train: Sequence[int] = (99, 38, 50, 100, 3, 4), val: Sequence[int] = (2,),
                 test: Sequence[int] = (11, 13), n_slices: Dict[int, int] = None) -> Path:
    """SSL4MIS layout; train patients appear in train_slices.list in the given order, slices in lexicographic order
    (slice_1, slice_10, slice_11, slice_2, ... as in the real list). Patient 99 has 11 slices so the numeric order
    differs from the listed one."""
    n_slices = n_slices or {}
    (root / "data" / "slices").mkdir(parents=True)
    lines = []
    for pid in train:
        for fr in (1, 2):
            n = n_slices.get(pid, 11 if pid == 99 else 3)
            names = sorted(f"patient{pid:03d}_frame{fr:02d}_slice_{k}" for k in range(1, n + 1))
            for name in names:
                k = int(name.rsplit("_", 1)[1])
                image, label = acdc_h5_slice(pid, fr, k)
                with h5py.File(root / "data" / "slices" / f"{name}.h5", "w") as f:
                    f.create_dataset("image", data=image, compression="gzip")
                    f.create_dataset("label", data=label, compression="gzip")
            lines += names
    (root / "train_slices.list").write_text("\n".join(lines) + "\n")
    (root / "train.list").write_text("".join(f"patient{p:03d}_frame{f:02d}\n" for p in train for f in (1, 2)))
    for list_name, ids in (("val.list", val), ("test.list", test)):
        frames = [f"patient{p:03d}_frame{f:02d}" for p in ids for f in (1, 2)]
        (root / list_name).write_text("\n".join(frames) + "\n")
        for fr_name in frames:
            pid, fr = int(fr_name[7:10]), int(fr_name[-2:])
            vol = np.stack([acdc_h5_slice(pid, fr, k)[0] for k in (1, 2, 3)])
            seg = np.stack([acdc_h5_slice(pid, fr, k)[1] for k in (1, 2, 3)])
            with h5py.File(root / "data" / f"{fr_name}.h5", "w") as f:
                f.create_dataset("image", data=vol)
                f.create_dataset("label", data=seg)
    return root


# ------------------------------------------------------------------------------------------------------------
# LA UA-MT h5 layout
# ------------------------------------------------------------------------------------------------------------

LA_XYZ = (9, 7, 5)
LA_MARK_XYZ = (7, 2, 1)


def make_la_h5(root: Path, n_train: int = 10, n_test: int = 3, present_train: int = 6) -> Path:
    """Cases ``TRAIN00..``, ``TEST00..``; only the first ``present_train`` training files exist.

    image[x, y, z] = x + 10 y + 100 z + case_number / 1000 (position is recoverable), label 1 at the marker only.
    """
    train = [f"TRAIN{i:02d}" for i in range(n_train)]
    test = [f"TEST{i:02d}" for i in range(n_test)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.list").write_text("\n".join(train) + "\n")
    (root / "test.list").write_text("\n".join(test) + "\n")
    x, y, z = np.meshgrid(*[np.arange(s) for s in LA_XYZ], indexing="ij")
    for i, case in enumerate(train[:present_train] + test):
        d = root / "2018LA_Seg_Training Set" / case
        d.mkdir(parents=True)
        label = np.zeros(LA_XYZ, np.uint8)
        label[LA_MARK_XYZ] = 1
        with h5py.File(d / "mri_norm2.h5", "w") as f:
            f.create_dataset("image", data=(x + 10 * y + 100 * z + i / 1000).astype(np.float32))
            f.create_dataset("label", data=label)
    return root


# ------------------------------------------------------------------------------------------------------------
# MSD task folder and nnU-Net raw dataset
# ------------------------------------------------------------------------------------------------------------

MSD_ZYX = (3, 6, 5)
MSD_SPACING_XYZ = (0.8, 0.9, 2.5)


def _img(a: np.ndarray, spacing=MSD_SPACING_XYZ) -> "sitk.Image":
    im = sitk.GetImageFromArray(a)
    im.SetSpacing(spacing)
    return im


def make_msd_task(root: Path, n_train: int = 6, n_test: int = 2, modalities: int = 2) -> Path:
    """``Task09_Toy`` with 4D images (c, z, y, x): channel c of case i is filled with 10 i + c."""
    task = root / "Task09_Toy"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    for i in range(n_train + n_test):
        split = "Tr" if i < n_train else "Ts"
        case = f"toy_{i:03d}"
        a = np.stack([np.full(MSD_ZYX, 10 * i + c, np.float32) for c in range(modalities)])
        four_d = sitk.GetImageFromArray(a, isVector=False) if modalities > 1 else _img(a[0])
        if modalities > 1:
            four_d.SetSpacing(MSD_SPACING_XYZ + (1.0,))
        sitk.WriteImage(four_d, str(task / f"images{split}" / f"{case}.nii.gz"))
        if split == "Tr":
            seg = np.zeros(MSD_ZYX, np.uint8)
            seg[1, 2, 3] = 1
            seg[0, 0, 0] = 2
            sitk.WriteImage(_img(seg), str(task / "labelsTr" / f"{case}.nii.gz"))
    (task / "imagesTr" / "._toy_000.nii.gz").write_bytes(b"mac resource fork")
    js = {"name": "Toy", "description": "toy task", "reference": "none", "licence": "CC-BY-SA 4.0",
          "release": "1.0", "tensorImageSize": "4D",
          "modality": {str(c): f"MR{c}" for c in range(modalities)},
          "labels": {"0": "background", "1": "core", "2": "edge"},
          "numTraining": n_train, "numTest": n_test,
          "training": [{"image": f"./imagesTr/toy_{i:03d}.nii.gz", "label": f"./labelsTr/toy_{i:03d}.nii.gz"}
                       for i in range(n_train)],
          "test": [f"./imagesTs/toy_{i:03d}.nii.gz" for i in range(n_train, n_train + n_test)]}
    (task / "dataset.json").write_text(json.dumps(js))
    return task


def make_nnunet_raw(root: Path, name: str = "Dataset042_Raw", n_train: int = 8, n_test: int = 2,
                    channels: int = 2, labels_ts: bool = True, ending: str = ".nii.gz") -> Path:
    """nnU-Net v2 raw dataset with 3D channel files; channel c of case i filled with 10 i + c; label 1 at (1, 2, 3)."""
    ds = root / name
    for sub in ("imagesTr", "labelsTr", "imagesTs") + (("labelsTs",) if labels_ts else ()):
        (ds / sub).mkdir(parents=True)
    for i in range(n_train + n_test):
        split = "Tr" if i < n_train else "Ts"
        case = f"case{i:02d}"
        for c in range(channels):
            sitk.WriteImage(_img(np.full(MSD_ZYX, 10 * i + c, np.float32)),
                            str(ds / f"images{split}" / f"{case}_{c:04d}{ending}"))
        if split == "Tr" or labels_ts:
            seg = np.zeros(MSD_ZYX, np.uint8)
            seg[1, 2, 3] = 1
            sitk.WriteImage(_img(seg), str(ds / f"labels{split}" / f"{case}{ending}"))
    js = {"channel_names": {str(c): f"MR{c}" for c in range(channels)}, "labels": {"background": 0, "core": 1},
          "numTraining": n_train, "file_ending": ending, "name": "Raw"}
    (ds / "dataset.json").write_text(json.dumps(js))
    return ds


def leftovers(root: Path):
    """Hidden temporary folders a conversion may have left in ``root``."""
    return sorted(p.name for p in Path(root).iterdir() if p.name.startswith("."))


class _InlinePool:
    """Stands in for nnU-Net's spawn pool: spawning workers costs seconds, these checks take milliseconds."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def starmap(self, fn, iterable):
        return [fn(*args) for args in iterable]


@pytest.fixture
def verify_nnunet(monkeypatch):
    """``verify_nnunet(folder)`` runs nnU-Net's own ``verify_dataset_integrity`` in-process (raises on problems)."""
    from types import SimpleNamespace

    from nnunetv2.experiment_planning import verify_dataset_integrity as vdi

    monkeypatch.setattr(vdi, "multiprocessing",
                        SimpleNamespace(get_context=lambda *a: SimpleNamespace(Pool=_InlinePool)))
    return lambda folder: vdi.verify_dataset_integrity(str(folder), num_processes=1)
