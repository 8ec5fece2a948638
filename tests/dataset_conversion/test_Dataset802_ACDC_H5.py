"""ACDC SSL4MIS-h5 converter: synthetic files in the real layout, and the real files when present."""
import json

import numpy as np
import pytest

from nnunet_ssl.dataset_conversion import Dataset801_ACDC_SSL, Dataset802_ACDC_H5 as M

DS = "Dataset802_ACDC_H5"


@pytest.fixture
def h5src(tmp_path, synth):
    return synth.make_acdc_h5(tmp_path / "ACDC")


def test_split_counts_and_record(h5src, tmp_path):
    assert M.main([str(h5src), "-o", str(tmp_path / "raw")]) == 0
    ds = tmp_path / "raw" / DS
    cases = lambda sub: sorted(p.name[:18] for p in (ds / sub).iterdir())  # noqa: E731
    assert cases("imagesTr") == cases("labelsTr") == [f"patient{p:03d}_frame0{f}" for p in (38, 50, 99) for f in (1, 2)]
    assert cases("imagesUnlabeled") == [f"patient{p:03d}_frame0{f}" for p in (3, 4, 100) for f in (1, 2)]
    assert cases("imagesTs") == cases("labelsTs") == [f"patient{p:03d}_frame0{f}" for p in (11, 13) for f in (1, 2)]
    dj = json.loads((ds / "dataset.json").read_text())
    assert (dj["numTraining"], dj["numUnlabeled"]) == (6, 6)
    rec = json.loads((ds / "ssl_split.json").read_text())
    assert rec["selection"]["labeled_patients"] == ["patient099", "patient038", "patient050"]
    assert rec["selection"]["train_slices_list_prefix_lines"] == 11 * 2 + 3 * 2 + 3 * 2
    assert rec["spacing_zyx_mm"] == [10.0, 1.5, 1.5] and rec["num_test"] == 4


def test_volumes_stack_slices_in_numeric_order_with_spacing(h5src, tmp_path, synth):
    M.main([str(h5src), "-o", str(tmp_path / "raw")])
    ds = tmp_path / "raw" / DS
    img = synth.read(ds / "imagesTr" / "patient099_frame02_0000.nii.gz")
    assert img.GetSize() == (6, 8, 11)  # (x, y, z): 11 slices of (y, x) = (8, 6)
    assert img.GetSpacing() == (1.5, 1.5, 10.0)
    assert img.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    a = synth.sitk.GetArrayFromImage(img)
    # slice k (1-based) sits at z = k - 1 although the list reads slice_1, slice_10, slice_11, slice_2, ...
    np.testing.assert_allclose(a[:, 0, 0], [99 + 0.2 + k / 1000 for k in range(1, 12)], rtol=0, atol=1e-5)
    seg = synth.arr(ds / "labelsTr" / "patient099_frame02.nii.gz")
    assert seg.dtype == np.uint8 and set(np.unique(seg)) == {0, 1, 3}
    y, x = synth.ACDC_H5_MARK_YX
    assert np.all(seg[:, y, x] == 3) and seg.sum() == 11 * (6 + 3)
    test_seg = synth.arr(ds / "labelsTs" / "patient011_frame01.nii.gz")
    assert test_seg.shape == (3, 8, 6) and np.all(test_seg[:, y, x] == 3)


def test_options_slices_val_spacing_subset(h5src, tmp_path):
    out = tmp_path / "raw"
    assert M.main([str(h5src), "-o", str(out), "--num-labeled-slices", "28", "--val", "unlabeled",
                   "--spacing", "5", "1", "1", "--max-test", "1", "--keep-unlabeled-labels"]) == 0
    rec = json.loads((out / DS / "ssl_split.json").read_text())
    assert rec["selection"]["labeled_patients"] == ["patient099", "patient038"]
    assert "patient002_frame01" in rec["unlabeled"] and len(rec["unlabeled"]) == 8 + 2
    assert rec["test"] == ["patient011_frame01"] and rec["spacing_zyx_mm"] == [5.0, 1.0, 1.0]
    assert len(list((out / DS / "labelsUnlabeledHidden").iterdir())) == 10


@pytest.mark.parametrize("args,msg", [(["-n", "0"], "out of range"), (["-n", "7"], "out of range"),
                                      (["--num-labeled-slices", "30"], "patient boundary"),
                                      (["--spacing", "0", "1", "1"], "three positive")])
def test_wrong_n_and_options(h5src, tmp_path, capsys, args, msg):
    assert M.main([str(h5src), "-o", str(tmp_path / "raw"), *args]) == 2
    assert msg in capsys.readouterr().err


def test_missing_slice_and_refusal(h5src, tmp_path, capsys):
    assert M.main([str(h5src), "-o", str(tmp_path / "raw")]) == 0
    assert M.main([str(h5src), "-o", str(tmp_path / "raw")]) == 2
    assert "already exists" in capsys.readouterr().err
    (h5src / "data" / "slices" / "patient038_frame02_slice_2.h5").unlink()
    assert M.main([str(h5src), "-o", str(tmp_path / "raw2")]) == 2
    assert "patient038_frame02_slice_2.h5" in capsys.readouterr().err


def test_mismatched_image_label_shape(h5src, tmp_path, synth, capsys):
    with synth.h5py.File(h5src / "data" / "patient013_frame02.h5", "r+") as f:
        del f["label"]
        f.create_dataset("label", data=np.zeros((3, 8, 5), np.uint8))
    assert M.main([str(h5src), "-o", str(tmp_path / "raw")]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "patient013_frame02.h5" in err
    assert list((tmp_path / "raw").iterdir()) == []


def test_bad_label_value(h5src, tmp_path, synth, capsys):
    with synth.h5py.File(h5src / "data" / "slices" / "patient050_frame01_slice_1.h5", "r+") as f:
        f["label"][0, 0] = 7
    assert M.main([str(h5src), "-o", str(tmp_path / "raw")]) == 2
    assert "values [7]" in capsys.readouterr().err


def test_passes_nnunet_integrity_check(h5src, tmp_path, verify_nnunet):
    M.main([str(h5src), "-o", str(tmp_path / "raw"), "--max-unlabeled", "1"])
    verify_nnunet(tmp_path / "raw" / DS)


@pytest.mark.realdata
def test_real_acdc_h5_subset(tmp_path, synth):
    src = synth.require_real("ACDC")
    assert M.main([str(src), "-o", str(tmp_path / "raw"), "--max-unlabeled", "2", "--max-test", "2"]) == 0
    ds = tmp_path / "raw" / DS
    rec = json.loads((ds / "ssl_split.json").read_text())
    assert rec["selection"]["labeled_patients"] == ["patient099", "patient038", "patient050"]
    assert rec["selection"]["train_slices_list_prefix_lines"] == 68
    assert rec["selection"]["subset"]["unlabeled_available"] == 134
    assert rec["selection"]["subset"]["test_available"] == 40
    assert (rec["num_labeled"], rec["num_unlabeled"], rec["num_test"]) == (6, 2, 2)
    slices = (src / "train_slices.list").read_text().split()
    n_slices = sum(1 for s in slices[:68] if s.startswith("patient099_frame01_"))
    img = synth.read(ds / "imagesTr" / "patient099_frame01_0000.nii.gz")
    assert img.GetSize()[2] == n_slices and img.GetSpacing() == (1.5, 1.5, 10.0)
    # alignment: the rebuilt volume's slice k equals the h5 slice k, image and label
    with synth.h5py.File(src / "data" / "slices" / "patient099_frame01_slice_3.h5", "r") as f:
        np.testing.assert_array_equal(synth.sitk.GetArrayFromImage(img)[2], f["image"][...])
        np.testing.assert_array_equal(synth.arr(ds / "labelsTr" / "patient099_frame01.nii.gz")[2], f["label"][...])
    seg = synth.arr(ds / "labelsTs" / "patient011_frame01.nii.gz")
    assert set(np.unique(seg)) == {0, 1, 2, 3}
    with synth.h5py.File(src / "data" / "patient011_frame01.h5", "r") as f:
        np.testing.assert_array_equal(seg, f["label"][...])


@pytest.mark.realdata
def test_real_list_matches_embedded_literature_order(synth):
    src = synth.require_real("ACDC")
    slices = (src / "train_slices.list").read_text().split()
    patients, _, _ = M.parse_slice_list(slices)
    assert tuple(patients) == Dataset801_ACDC_SSL.SSL4MIS_PATIENT_ORDER
    prefix = M.slices_per_patient_prefix(slices)
    assert {n: prefix[n] for n in Dataset801_ACDC_SSL.LITERATURE_SETTINGS} == Dataset801_ACDC_SSL.LITERATURE_SETTINGS
    assert prefix[7] == 136 and patients[:7][3:] == ["patient100", "patient058", "patient021", "patient049"]


def test_interrupt_midway_leaves_nothing(h5src, tmp_path, monkeypatch, capsys):
    from nnunet_ssl.dataset_conversion import _common as C

    real, calls = C.write_image, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "write_image", flaky)
    assert M.main([str(h5src), "-o", str(tmp_path / "raw")]) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert list((tmp_path / "raw").iterdir()) == []
