"""Left Atrium UA-MT-h5 converter: synthetic files in the real layout, and the real files when present."""
import json

import numpy as np
import pytest

from nnunet_ssl.dataset_conversion import Dataset803_LA_H5 as M

DS = "Dataset803_LA_H5"


@pytest.fixture
def lasrc(tmp_path, synth):
    return synth.make_la_h5(tmp_path / "LA")  # 10 in train.list, first 6 present, 3 test


def test_split_counts_and_missing_unlabeled_recorded(lasrc, tmp_path):
    assert M.main([str(lasrc), "-o", str(tmp_path / "raw"), "-n", "4"]) == 0
    ds = tmp_path / "raw" / DS
    rec = json.loads((ds / "ssl_split.json").read_text())
    assert rec["labeled"] == ["TRAIN00", "TRAIN01", "TRAIN02", "TRAIN03"]
    assert rec["unlabeled"] == ["TRAIN04", "TRAIN05"]
    assert rec["unlabeled_missing"] == [f"TRAIN{i:02d}" for i in range(6, 10)]
    assert rec["test"] == ["TEST00", "TEST01", "TEST02"]
    dj = json.loads((ds / "dataset.json").read_text())
    assert (dj["numTraining"], dj["numUnlabeled"], dj["labels"]) == (4, 2, {"background": 0, "left_atrium": 1})
    assert len(list((ds / "imagesTs").iterdir())) == len(list((ds / "labelsTs").iterdir())) == 3


def test_axis_order_spacing_and_alignment(lasrc, tmp_path, synth):
    M.main([str(lasrc), "-o", str(tmp_path / "raw"), "-n", "4"])
    ds = tmp_path / "raw" / DS
    img = synth.read(ds / "imagesTr" / "TRAIN02_0000.nii.gz")
    assert img.GetSize() == synth.LA_XYZ  # SimpleITK (x, y, z) == h5 (x, y, z)
    assert img.GetSpacing() == (0.625, 0.625, 0.625) and img.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    for x, y, z in [(0, 0, 0), (8, 1, 4), (3, 6, 2)]:
        assert img[x, y, z] == pytest.approx(x + 10 * y + 100 * z + 2 / 1000, abs=1e-4)
    lbl = synth.read(ds / "labelsTr" / "TRAIN02.nii.gz")
    assert lbl[synth.LA_MARK_XYZ] == 1 and synth.sitk.GetArrayFromImage(lbl).sum() == 1
    assert synth.arr(ds / "labelsTs" / "TEST01.nii.gz")[synth.LA_MARK_XYZ[::-1]] == 1  # numpy (z, y, x)


def test_missing_labeled_case_and_wrong_n(lasrc, tmp_path, capsys):
    assert M.main([str(lasrc), "-o", str(tmp_path / "raw"), "-n", "8"]) == 2
    err = capsys.readouterr().err
    assert "TRAIN06/mri_norm2.h5" in err and "smaller -n" in err
    for n in ("0", "11"):
        assert M.main([str(lasrc), "-o", str(tmp_path / "raw"), "-n", n]) == 2
        assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "raw" / DS).exists()


def test_missing_test_case_and_refusal(lasrc, tmp_path, capsys):
    assert M.main([str(lasrc), "-o", str(tmp_path / "raw"), "-n", "4"]) == 0
    assert M.main([str(lasrc), "-o", str(tmp_path / "raw"), "-n", "4"]) == 2
    assert "already exists" in capsys.readouterr().err
    (lasrc / "2018LA_Seg_Training Set" / "TEST02" / "mri_norm2.h5").unlink()
    assert M.main([str(lasrc), "-o", str(tmp_path / "raw"), "-n", "4", "-d", "804"]) == 2
    assert "TEST02" in capsys.readouterr().err
    assert M.main([str(lasrc), "-o", str(tmp_path / "raw"), "-n", "4", "-d", "804", "--max-test", "2"]) == 0


def test_mismatched_shapes(lasrc, tmp_path, synth, capsys):
    with synth.h5py.File(lasrc / "2018LA_Seg_Training Set" / "TRAIN01" / "mri_norm2.h5", "r+") as f:
        del f["label"]
        f.create_dataset("label", data=np.zeros((9, 7, 4), np.uint8))
    assert M.main([str(lasrc), "-o", str(tmp_path / "raw"), "-n", "4"]) == 2
    assert "shape mismatch" in capsys.readouterr().err
    assert list((tmp_path / "raw").iterdir()) == []


def test_passes_nnunet_integrity_check(lasrc, tmp_path, verify_nnunet):
    M.main([str(lasrc), "-o", str(tmp_path / "raw"), "-n", "4"])
    verify_nnunet(tmp_path / "raw" / DS)


@pytest.mark.realdata
def test_real_la_subset(tmp_path, synth):
    src = synth.require_real("LA")
    assert M.main([str(src), "-o", str(tmp_path / "raw"), "-n", "4", "--max-unlabeled", "1", "--max-test", "1"]) == 0
    ds = tmp_path / "raw" / DS
    rec = json.loads((ds / "ssl_split.json").read_text())
    train = (src / "train.list").read_text().split()
    assert rec["labeled"] == train[:4] and rec["unlabeled"] == [train[4]]
    assert rec["selection"]["subset"]["unlabeled_available"] == len(
        [c for c in train[4:] if (src / "2018LA_Seg_Training Set" / c / "mri_norm2.h5").is_file()])
    assert rec["test"] == (src / "test.list").read_text().split()[:1]
    case = train[0]
    img = synth.read(ds / "imagesTr" / f"{case}_0000.nii.gz")
    lbl = synth.arr(ds / "labelsTr" / f"{case}.nii.gz")
    with synth.h5py.File(src / "2018LA_Seg_Training Set" / case / "mri_norm2.h5", "r") as f:
        h5_img, h5_lbl = f["image"][...], f["label"][...]
    assert img.GetSize() == h5_img.shape and img.GetSize()[2] == 88
    assert img.GetSpacing() == (0.625, 0.625, 0.625)
    np.testing.assert_array_equal(synth.sitk.GetArrayFromImage(img), h5_img.transpose(2, 1, 0))
    np.testing.assert_array_equal(lbl, h5_lbl.transpose(2, 1, 0))
    assert set(np.unique(lbl)) == {0, 1}
