"""Generic converter: MSD task folders (4D images) and nnU-Net v2 raw datasets -> N labeled + unlabeled."""
import json

import numpy as np
import pytest

from nnunet_ssl.dataset_conversion import msd_to_ssl as M


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_msd_task_4d_split_into_channels(tmp_path, synth, verify_nnunet):
    task = synth.make_msd_task(tmp_path)
    assert M.main([str(task), "-o", str(tmp_path / "raw"), "-n", "2", "--seed", "3", "--keep-unlabeled-labels"]) == 0
    ds = tmp_path / "raw" / "Dataset900_Toy_SSL"
    rec = json.loads((ds / "ssl_split.json").read_text())
    assert len(rec["labeled"]) == 2 and len(rec["unlabeled"]) == 4 and len(rec["test"]) == 2
    assert rec["source_flavour"] == "msd" and rec["selection"]["seed"] == 3
    assert set(rec["labeled"]) | set(rec["unlabeled"]) == {f"toy_{i:03d}" for i in range(6)}  # ._ file ignored
    assert _names(ds / "imagesUnlabeled") == sorted(f"{c}_{k:04d}.nii.gz" for c in rec["unlabeled"] for k in (0, 1))
    assert _names(ds / "labelsUnlabeledHidden") == sorted(f"{c}.nii.gz" for c in rec["unlabeled"])
    assert not (ds / "labelsTs").exists()
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "MR0", "1": "MR1"}
    assert dj["labels"] == {"background": 0, "core": 1, "edge": 2} and dj["numUnlabeled"] == 4
    case = rec["labeled"][0]
    i = int(case[-3:])
    for c in (0, 1):  # channel c of case i holds 10 i + c, with the 3D part of the 4D geometry
        img = synth.read(ds / "imagesTr" / f"{case}_{c:04d}.nii.gz")
        assert img.GetSpacing() == pytest.approx(synth.MSD_SPACING_XYZ)
        assert np.all(synth.sitk.GetArrayFromImage(img) == 10 * i + c)
    assert synth.arr(ds / "labelsTr" / f"{case}.nii.gz")[1, 2, 3] == 1
    verify_nnunet(ds)


def test_nnunet_raw_fraction_labelsTs_and_reproducibility(tmp_path, synth):
    src = synth.make_nnunet_raw(tmp_path)
    for out in ("a", "b"):
        assert M.main([str(src), "-o", str(tmp_path / out), "--fraction", "0.25"]) == 0
    rec_a, rec_b = (json.loads((tmp_path / o / "Dataset900_Raw_SSL" / "ssl_split.json").read_text()) for o in "ab")
    assert rec_a["labeled"] == rec_b["labeled"] and len(rec_a["labeled"]) == 2 and len(rec_a["unlabeled"]) == 6
    ds = tmp_path / "a" / "Dataset900_Raw_SSL"
    assert _names(ds / "labelsTs") == ["case08.nii.gz", "case09.nii.gz"]
    assert rec_a["source_flavour"] == "nnunet" and rec_a["test_labels"]


def test_explicit_labeled_cases_and_existing_unlabeled_carried(tmp_path, synth):
    src = synth.make_nnunet_raw(tmp_path)
    (src / "imagesUnlabeled").mkdir()
    for c in range(2):
        synth.sitk.WriteImage(synth.sitk.GetImageFromArray(np.zeros(synth.MSD_ZYX, np.float32)),
                              str(src / "imagesUnlabeled" / f"extra_{c:04d}.nii.gz"))
    assert M.main([str(src), "-o", str(tmp_path / "raw"), "-d", "950", "--name", "Mine",
                   "--labeled-cases", "case01", "case05"]) == 0
    rec = json.loads((tmp_path / "raw" / "Dataset950_Mine" / "ssl_split.json").read_text())
    assert rec["labeled"] == ["case01", "case05"] and "extra" in rec["unlabeled"] and len(rec["unlabeled"]) == 7
    assert rec["carried_unlabeled"] == ["extra"]


@pytest.mark.parametrize("args,msg", [(["-n", "0"], "out of range"), (["-n", "9"], "out of range"),
                                      ([], "say how many"), (["--labeled-cases", "nope"], "not training cases"),
                                      (["--labeled-cases", "case01", "-n", "2"], "not both")])
def test_wrong_selection(tmp_path, synth, capsys, args, msg):
    src = synth.make_nnunet_raw(tmp_path)
    assert M.main([str(src), "-o", str(tmp_path / "raw"), *args]) == 2
    assert msg in capsys.readouterr().err


def test_bad_inputs(tmp_path, synth, capsys):
    src = synth.make_nnunet_raw(tmp_path)
    (src / "labelsTr" / "case03.nii.gz").unlink()
    assert M.main([str(src), "-o", str(tmp_path / "raw"), "-n", "2"]) == 2
    assert "labelsTr/case03.nii.gz" in capsys.readouterr().err
    (src / "imagesTr" / "case04_0001.nii.gz").unlink()
    assert M.main([str(src), "-o", str(tmp_path / "raw"), "-n", "2"]) == 2
    assert "case 'case04'" in capsys.readouterr().err
    (src / "dataset.json").unlink()
    assert M.main([str(src), "-o", str(tmp_path / "raw"), "-n", "2"]) == 2
    assert "dataset.json is missing" in capsys.readouterr().err


def test_label_shape_mismatch_in_labeled_case(tmp_path, synth, capsys):
    src = synth.make_nnunet_raw(tmp_path)
    synth.sitk.WriteImage(synth.sitk.GetImageFromArray(np.zeros((3, 6, 4), np.uint8)),
                          str(src / "labelsTr" / "case01.nii.gz"))
    assert M.main([str(src), "-o", str(tmp_path / "raw"), "--labeled-cases", "case01"]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "case01.nii.gz" in err
    assert list((tmp_path / "raw").iterdir()) == []


def test_undeclared_label_value(tmp_path, synth, capsys):
    src = synth.make_nnunet_raw(tmp_path)
    seg = np.zeros(synth.MSD_ZYX, np.uint8)
    seg[0, 0, 0] = 5
    img = synth.sitk.GetImageFromArray(seg)
    img.SetSpacing(synth.MSD_SPACING_XYZ)
    synth.sitk.WriteImage(img, str(src / "labelsTr" / "case02.nii.gz"))
    assert M.main([str(src), "-o", str(tmp_path / "raw"), "--labeled-cases", "case02"]) == 2
    assert "values [5]" in capsys.readouterr().err


def test_refuses_overwrite(tmp_path, synth, capsys):
    task = synth.make_msd_task(tmp_path)
    assert M.main([str(task), "-o", str(tmp_path / "raw"), "-n", "2"]) == 0
    assert M.main([str(task), "-o", str(tmp_path / "raw"), "-n", "3"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert M.main([str(task), "-o", str(tmp_path / "raw"), "-n", "3", "--overwrite"]) == 0
    assert json.loads((tmp_path / "raw" / "Dataset900_Toy_SSL" / "dataset.json").read_text())["numTraining"] == 3
