"""Unlabeled preprocessing: output files, equality with nnU-Net's own preprocessing, every bad input."""
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ssl.data.unlabeled import (MANIFEST, UnlabeledDataError, check_unlabeled_folder,
                                       find_unlabeled_cases, preprocess_unlabeled)

from ..conftest import run_cli


def _load_case(folder, case):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    data, seg, _, props = nnUNetDatasetBlosc2(str(folder), [case]).load_case(case)
    return np.asarray(data), np.asarray(seg), props


@pytest.mark.parametrize("config", ["2d", "3d_fullres"])
def test_outputs_exist_with_manifest(dataset3d, config):
    folder = dataset3d["pre"] / f"nnUNetPlans_{config}_unlabeled"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["num_cases"] == 6 and manifest["configuration"] == config
    for c in manifest["cases"]:
        for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
            assert (folder / f"{c}{suffix}").stat().st_size > 0
    data, seg, props = _load_case(folder, manifest["cases"][0])
    assert data.dtype == np.float32 and data.shape[0] == 1
    assert props["class_locations"] == {}
    assert set(np.unique(seg)) <= {-1, 0}  # no label: only the nonzero mask


def test_same_as_nnunet_for_a_labeled_case(dataset3d, tmp_path, monkeypatch):
    """A labeled image copied into imagesUnlabeled must preprocess to exactly what nnU-Net wrote for it."""
    raw = tmp_path / "raw"
    pre = tmp_path / "pre"
    name = dataset3d["name"]
    shutil.copytree(dataset3d["raw"], raw / name, ignore=shutil.ignore_patterns("imagesUnlabeled"))
    (raw / name / "imagesUnlabeled").mkdir()
    shutil.copy(raw / name / "imagesTr" / "train001_0000.nii.gz", raw / name / "imagesUnlabeled" / "copy_0000.nii.gz")
    shutil.copytree(dataset3d["pre"], pre / name, ignore=shutil.ignore_patterns("*_unlabeled"))
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    out = preprocess_unlabeled(dataset3d["id"], "3d_fullres", verbose=False)
    d_u, _, p_u = _load_case(out, "copy")
    d_l, _, p_l = _load_case(pre / name / "nnUNetPlans_3d_fullres", "train001")
    assert d_u.shape == d_l.shape
    np.testing.assert_allclose(d_u, d_l, atol=1e-6)
    np.testing.assert_allclose(p_u["spacing"], p_l["spacing"])
    assert p_u["shape_after_cropping_and_before_resampling"] == p_l["shape_after_cropping_and_before_resampling"]


def _broken_copy(dataset3d, tmp_path, monkeypatch, mutate):
    raw = tmp_path / "raw"
    name = dataset3d["name"]
    shutil.copytree(dataset3d["raw"], raw / name)
    pre = tmp_path / "pre"
    shutil.copytree(dataset3d["pre"], pre / name, ignore=shutil.ignore_patterns("*_unlabeled", "nnUNetPlans_*"))
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    mutate(raw / name / "imagesUnlabeled")
    return pre / name


def test_missing_unlabeled_folder(dataset3d, tmp_path, monkeypatch):
    pre = _broken_copy(dataset3d, tmp_path, monkeypatch, lambda d: shutil.rmtree(d))
    with pytest.raises(UnlabeledDataError, match="imagesUnlabeled does not exist"):
        preprocess_unlabeled(dataset3d["id"], "3d_fullres", verbose=False)
    assert not list(pre.glob("*_unlabeled*"))


def test_wrong_channel_count(dataset3d, tmp_path, monkeypatch):
    def extra_channel(d):
        shutil.copy(d / "unl002_0000.nii.gz", d / "unl002_0001.nii.gz")
    pre = _broken_copy(dataset3d, tmp_path, monkeypatch, extra_channel)
    with pytest.raises(UnlabeledDataError, match=r"'unl002'.*channels \[0, 1\].*1 channel"):
        preprocess_unlabeled(dataset3d["id"], "3d_fullres", verbose=False)
    assert not list(pre.glob("*_unlabeled*"))


def test_file_ending_mismatch(dataset3d, tmp_path, monkeypatch):
    def nrrd(d):
        sitk.WriteImage(sitk.ReadImage(str(d / "unl000_0000.nii.gz")), str(d / "extra_0000.nrrd"))
    _broken_copy(dataset3d, tmp_path, monkeypatch, nrrd)
    with pytest.raises(UnlabeledDataError, match=r"extra_0000\.nrrd: file ending does not match.*\.nii\.gz"):
        preprocess_unlabeled(dataset3d["id"], "3d_fullres", verbose=False)


def test_missing_channel_suffix(dataset3d, tmp_path, monkeypatch):
    _broken_copy(dataset3d, tmp_path, monkeypatch,
                 lambda d: os.rename(d / "unl000_0000.nii.gz", d / "unl000.nii.gz"))
    with pytest.raises(UnlabeledDataError, match="unl000.nii.gz: name lacks the 4-digit channel suffix"):
        preprocess_unlabeled(dataset3d["id"], "3d_fullres", verbose=False)


def test_unreadable_file_names_the_file_and_writes_nothing(dataset3d, tmp_path, monkeypatch):
    pre = _broken_copy(dataset3d, tmp_path, monkeypatch,
                       lambda d: (d / "unl003_0000.nii.gz").write_bytes(b"this is not a nifti file"))
    with pytest.raises(UnlabeledDataError, match=r"unlabeled case 'unl003'.*unl003_0000\.nii\.gz"):
        preprocess_unlabeled(dataset3d["id"], "3d_fullres", verbose=False)
    assert not list(pre.glob("*_unlabeled*"))  # the temporary folder is removed too


def test_shape_mismatch_between_channels(dataset3d, tmp_path, monkeypatch):
    """Two-channel dataset whose unlabeled case has channels of different shapes."""
    def two_channels(d):
        for f in d.parent.glob("images*/*_0000.nii.gz"):
            shutil.copy(f, str(f).replace("_0000", "_0001"))
        small = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.float32))
        sitk.WriteImage(small, str(d / "unl004_0001.nii.gz"))
        dj = json.loads((d.parent / "dataset.json").read_text())
        dj["channel_names"] = {"0": "MRI", "1": "MRI2"}
        (d.parent / "dataset.json").write_text(json.dumps(dj))
    pre = _broken_copy(dataset3d, tmp_path, monkeypatch, two_channels)
    dj = json.loads((pre / "dataset.json").read_text())
    dj["channel_names"] = {"0": "MRI", "1": "MRI2"}
    (pre / "dataset.json").write_text(json.dumps(dj))
    plans = json.loads((pre / "nnUNetPlans.json").read_text())  # plans as if planned with two channels
    fg = plans["foreground_intensity_properties_per_channel"]
    fg["1"] = fg["0"]
    for cfg in plans["configurations"].values():
        for k in ("normalization_schemes", "use_mask_for_norm"):
            if k in cfg:
                cfg[k] = cfg[k] * 2
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans))
    with pytest.raises(UnlabeledDataError, match=r"unlabeled case 'unl004'.*matching shape and spacing"):
        preprocess_unlabeled(dataset3d["id"], "3d_fullres", verbose=False)


def test_dataset_not_found(nnunet_root):
    with pytest.raises(UnlabeledDataError, match="Dataset '987' not found"):
        preprocess_unlabeled(987, "3d_fullres", verbose=False)


def test_cli_reports_one_clear_error(dataset3d):
    r = run_cli(["nnunet_ssl", "preprocess-unlabeled", "-d", "987", "-c", "3d_fullres"], check=False)
    assert r.returncode == 2
    assert "nnunet_ssl: error: Dataset '987' not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_configuration(dataset3d):
    with pytest.raises(UnlabeledDataError, match="Configuration '3d_huge' is not in"):
        preprocess_unlabeled(dataset3d["id"], "3d_huge", verbose=False)


def test_find_unlabeled_cases_groups_channels(tmp_path):
    d = tmp_path / "imagesUnlabeled"
    d.mkdir()
    for c in ("a", "b"):
        for ch in (1, 0):
            (d / f"{c}_{ch:04d}.nii.gz").touch()
    cases = find_unlabeled_cases(str(tmp_path), {"file_ending": ".nii.gz", "channel_names": {"0": "T1", "1": "T2"}})
    assert list(cases) == ["a", "b"]
    assert [os.path.basename(f) for f in cases["a"]] == ["a_0000.nii.gz", "a_0001.nii.gz"]


def test_check_folder_detects_other_plans_and_missing_cases(dataset3d, tmp_path):
    src = dataset3d["pre"] / "nnUNetPlans_3d_fullres_unlabeled"
    plans = json.loads((dataset3d["pre"] / "nnUNetPlans.json").read_text())
    assert check_unlabeled_folder(str(src), plans, "3d_fullres", "nnUNetPlans")["num_cases"] == 6
    # the 2d folder is not valid for 3d_fullres
    with pytest.raises(UnlabeledDataError, match="preprocessed with other plans.*configuration '2d'"):
        check_unlabeled_folder(str(dataset3d["pre"] / "nnUNetPlans_2d_unlabeled"), plans, "3d_fullres", "nnUNetPlans")
    # changed normalisation-relevant plans entry -> detected
    other = json.loads(json.dumps(plans))
    other["configurations"]["3d_fullres"]["spacing"] = [1.0, 1.0, 1.0]
    with pytest.raises(UnlabeledDataError, match="other plans"):
        check_unlabeled_folder(str(src), other, "3d_fullres", "nnUNetPlans")
    # a training-only edit (architecture) does not invalidate the data
    arch = json.loads(json.dumps(plans))
    arch["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"][0] = 4
    check_unlabeled_folder(str(src), arch, "3d_fullres", "nnUNetPlans")
    # a missing / corrupt case file
    broken = tmp_path / "u"
    shutil.copytree(src, broken)
    (broken / "unl001.b2nd").write_bytes(b"")
    with pytest.raises(UnlabeledDataError, match=r"unl001\.b2nd is missing or empty"):
        check_unlabeled_folder(str(broken), plans, "3d_fullres", "nnUNetPlans")
    shutil.copy(src / "unl001.b2nd", broken / "unl001.b2nd")
    (broken / "unl002_seg.b2nd").write_bytes(b"garbage, not blosc2")
    with pytest.raises(UnlabeledDataError, match=r"unl002_seg\.b2nd is corrupt"):
        check_unlabeled_folder(str(broken), plans, "3d_fullres", "nnUNetPlans")
    with pytest.raises(UnlabeledDataError, match="not preprocessed"):
        check_unlabeled_folder(str(tmp_path / "nope"), plans, "3d_fullres", "nnUNetPlans")
