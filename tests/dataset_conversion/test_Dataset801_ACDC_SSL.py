"""ACDC challenge layout converter on a synthetic mimic of the layout (no real challenge data is available here)."""
import json

import numpy as np
import pytest

from nnunet_ssl.dataset_conversion import Dataset801_ACDC_SSL as M


@pytest.fixture
def acdc(tmp_path, synth):
    return synth.make_acdc_challenge(tmp_path / "ACDC")


def _run(acdc, out, *args):
    return M.main([str(acdc), "-o", str(out), *args])


def test_literature_split_counts_and_files(acdc, tmp_path, synth):
    assert _run(acdc, tmp_path / "raw") == 0
    ds = tmp_path / "raw" / "Dataset801_ACDC_SSL"
    names = lambda sub: sorted(p.name for p in (ds / sub).iterdir())  # noqa: E731
    # N = 3 is a literature setting: patients 099, 038, 050, both frames (ES = 5 + id % 3)
    assert names("imagesTr") == ["patient038_frame01_0000.nii.gz", "patient038_frame07_0000.nii.gz",
                                 "patient050_frame01_0000.nii.gz", "patient050_frame07_0000.nii.gz",
                                 "patient099_frame01_0000.nii.gz", "patient099_frame05_0000.nii.gz"]
    assert names("labelsTr") == [n.replace("_0000", "") for n in names("imagesTr")]
    assert names("imagesUnlabeled") == ["patient001_frame01_0000.nii.gz", "patient001_frame06_0000.nii.gz",
                                        "patient100_frame01_0000.nii.gz", "patient100_frame06_0000.nii.gz"]
    assert len(names("imagesTs")) == len(names("labelsTs")) == 4
    assert not (ds / "labelsUnlabeledHidden").exists()
    dj = json.loads((ds / "dataset.json").read_text())
    assert (dj["numTraining"], dj["numUnlabeled"], dj["file_ending"]) == (6, 4, ".nii.gz")
    assert dj["labels"] == {"background": 0, "RV": 1, "Myo": 2, "LV": 3}
    rec = json.loads((ds / "ssl_split.json").read_text())
    assert rec["selection"]["labeled_patients"] == ["patient099", "patient038", "patient050"]
    assert rec["selection"]["train_slices_list_prefix_lines"] == 68
    assert rec["groups"]["patient038_frame07"] == "patient038" and rec["pathology"]["patient001"] == "NOR"
    assert rec["num_labeled"] == 6 and rec["num_unlabeled"] == 4 and rec["num_test"] == 4


def test_spacing_orientation_and_alignment_are_kept(acdc, tmp_path, synth):
    _run(acdc, tmp_path / "raw")
    ds = tmp_path / "raw" / "Dataset801_ACDC_SSL"
    for img_path, lbl_path in ((ds / "imagesTr" / "patient038_frame07_0000.nii.gz", ds / "labelsTr" /
                                "patient038_frame07.nii.gz"),
                               (ds / "imagesTs" / "patient101_frame07_0000.nii.gz", ds / "labelsTs" /
                                "patient101_frame07.nii.gz")):
        img, lbl = synth.read(img_path), synth.read(lbl_path)
        for im in (img, lbl):
            assert im.GetSpacing() == pytest.approx(synth.ACDC_SPACING_XYZ)
            assert im.GetDirection() == pytest.approx(synth.ACDC_DIRECTION)
            assert im.GetOrigin() == pytest.approx(synth.ACDC_ORIGIN)
        seg = synth.arr(lbl_path)
        assert seg[synth.ACDC_MARK_ZYX] == 3 and set(np.unique(seg)) == {0, 1, 2, 3}
    pid, frame = 38, 7
    assert np.all(synth.arr(ds / "imagesTr" / "patient038_frame07_0000.nii.gz") == pid * 100 + frame)


def test_random_selection_is_seeded_and_hidden_labels_kept(acdc, tmp_path):
    assert _run(acdc, tmp_path / "a", "-n", "2", "--seed", "7", "--keep-unlabeled-labels") == 0
    assert _run(acdc, tmp_path / "b", "-n", "2", "--seed", "7") == 0
    rec_a = json.loads((tmp_path / "a" / "Dataset801_ACDC_SSL" / "ssl_split.json").read_text())
    rec_b = json.loads((tmp_path / "b" / "Dataset801_ACDC_SSL" / "ssl_split.json").read_text())
    assert rec_a["selection"]["rule"].startswith("seeded random") and rec_a["selection"]["seed"] == 7
    assert rec_a["labeled"] == rec_b["labeled"] and len(rec_a["labeled"]) == 4
    hidden = sorted(p.name for p in (tmp_path / "a" / "Dataset801_ACDC_SSL" / "labelsUnlabeledHidden").iterdir())
    assert hidden == sorted(f"{c}.nii.gz" for c in rec_a["unlabeled"])


def test_refuses_to_overwrite(acdc, tmp_path, capsys):
    assert _run(acdc, tmp_path / "raw") == 0
    marker = tmp_path / "raw" / "Dataset801_ACDC_SSL" / "mine.txt"
    marker.write_text("keep")
    assert _run(acdc, tmp_path / "raw") == 2
    assert "already exists" in capsys.readouterr().err and marker.exists()
    assert _run(acdc, tmp_path / "raw", "--overwrite") == 0
    assert not marker.exists()


def test_test_set_without_gt_has_no_labelsTs(tmp_path, synth):
    src = synth.make_acdc_challenge(tmp_path / "ACDC", test_gt=False)
    assert _run(src, tmp_path / "raw") == 0
    ds = tmp_path / "raw" / "Dataset801_ACDC_SSL"
    assert not (ds / "labelsTs").exists() and len(list((ds / "imagesTs").iterdir())) == 4


@pytest.mark.parametrize("args,msg", [(["-n", "0"], "out of range"), (["-n", "6"], "out of range"),
                                      (["-n", "2", "--selection", "literature"], "no literature list")])
def test_wrong_n(acdc, tmp_path, capsys, args, msg):
    assert _run(acdc, tmp_path / "raw", *args) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "raw" / "Dataset801_ACDC_SSL").exists()


def test_literature_patients_missing(tmp_path, synth, capsys):
    src = synth.make_acdc_challenge(tmp_path / "ACDC", train=(1, 2, 3, 4))
    assert _run(src, tmp_path / "raw") == 2
    assert "--selection random" in capsys.readouterr().err


def test_bad_inputs(acdc, tmp_path, synth, capsys):
    train = acdc / "database" / "training"
    (train / "patient050" / "patient050_frame07_gt.nii.gz").unlink()
    assert _run(acdc, tmp_path / "raw") == 2
    assert "patient050_frame07_gt.nii.gz" in capsys.readouterr().err

    (train / "patient001" / "Info.cfg").unlink()
    assert _run(acdc, tmp_path / "raw", "-n", "1", "--selection", "random", "--seed", "0") == 2
    assert "patient001/Info.cfg" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists() or synth.leftovers(tmp_path / "raw") == []


def test_label_with_other_shape_is_refused(acdc, tmp_path, synth, capsys):
    gt = acdc / "database" / "training" / "patient099" / "patient099_frame05_gt.nii.gz"
    synth.sitk.WriteImage(synth.sitk.GetImageFromArray(np.zeros((4, 10, 11), np.uint8)), str(gt))
    assert _run(acdc, tmp_path / "raw") == 2
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "patient099_frame05_gt.nii.gz" in err
    assert list((tmp_path / "raw").iterdir()) == []  # nothing half-written


def test_passes_nnunet_integrity_check(acdc, tmp_path, verify_nnunet):
    _run(acdc, tmp_path / "raw")
    verify_nnunet(tmp_path / "raw" / "Dataset801_ACDC_SSL")
