"""Adding a folder of unlabeled images to an existing dataset: naming, format conversion, checks, atomicity."""
import json

import numpy as np
import pytest

from nnunet_ssl.dataset_conversion import add_unlabeled as M


def _write(synth, path, shape, value=0.0, spacing=None):
    img = synth.sitk.GetImageFromArray(np.full(shape, value, np.float32))
    if spacing:
        img.SetSpacing(spacing)
    synth.sitk.WriteImage(img, str(path))


@pytest.fixture
def raw(tmp_path, synth):
    """An nnU-Net raw dataset with 2 channels, made the way a user would (no ssl_split.json)."""
    return synth.make_nnunet_raw(tmp_path / "raw", name="Dataset042_Raw")


def _unlabeled(ds):
    return sorted(p.name for p in (ds / "imagesUnlabeled").iterdir())


def test_add_nnunet_named_multichannel_by_id(raw, tmp_path, synth):
    src = tmp_path / "new"
    src.mkdir()
    for i in range(2):
        for c in range(2):
            _write(synth, src / f"u{i}_{c:04d}.nii.gz", synth.MSD_ZYX, 10 * i + c)
    assert M.main(["42", str(src), "-o", str(tmp_path / "raw")]) == 0
    assert _unlabeled(raw) == ["u0_0000.nii.gz", "u0_0001.nii.gz", "u1_0000.nii.gz", "u1_0001.nii.gz"]
    assert np.all(synth.arr(raw / "imagesUnlabeled" / "u1_0001.nii.gz") == 11)
    dj = json.loads((raw / "dataset.json").read_text())
    assert dj["numUnlabeled"] == 2 and dj["numTraining"] == 8  # other keys untouched
    rec = json.loads((raw / "ssl_split.json").read_text())
    assert rec["unlabeled"] == ["u0", "u1"] and len(rec["labeled"]) == 8 and len(rec["test"]) == 2
    assert rec["additions"][0]["naming"] == "nnunet" and rec["additions"][0]["cases"] == ["u0", "u1"]


def test_single_channel_other_format_is_converted_with_geometry(tmp_path, synth):
    la = synth.make_la_h5(tmp_path / "LA")
    from nnunet_ssl.dataset_conversion import Dataset803_LA_H5

    assert Dataset803_LA_H5.main([str(la), "-o", str(tmp_path / "raw"), "-n", "4"]) == 0
    ds = tmp_path / "raw" / "Dataset803_LA_H5"
    src = tmp_path / "nrrd"
    src.mkdir()
    for name in ("scanA", "scanB"):
        _write(synth, src / f"{name}.nrrd", (5, 7, 9), 3.0, spacing=(0.7, 0.8, 0.9))
    assert M.main([str(ds), str(src), "--prefix", "ext_"]) == 0
    assert _unlabeled(ds) == ["TRAIN04_0000.nii.gz", "TRAIN05_0000.nii.gz", "ext_scanA_0000.nii.gz",
                              "ext_scanB_0000.nii.gz"]
    img = synth.read(ds / "imagesUnlabeled" / "ext_scanA_0000.nii.gz")
    assert img.GetSpacing() == pytest.approx((0.7, 0.8, 0.9)) and img.GetSize() == (9, 7, 5)
    rec = json.loads((ds / "ssl_split.json").read_text())
    assert rec["converter"] == "la-h5" and rec["unlabeled"][-2:] == ["ext_scanA", "ext_scanB"]
    assert rec["additions"][0]["input_ending"] == ".nrrd"
    assert json.loads((ds / "dataset.json").read_text())["numUnlabeled"] == 4


def test_wrong_channels_are_never_split_into_cases(raw, tmp_path, synth, capsys):
    src = tmp_path / "one_channel"
    src.mkdir()
    _write(synth, src / "u0_0000.nii.gz", synth.MSD_ZYX)
    assert M.main([str(raw), str(src)]) == 2
    assert "case 'u0' has channels [0]" in capsys.readouterr().err
    assert not (raw / "imagesUnlabeled").exists()


def test_clashes_and_overwrite(raw, tmp_path, synth, capsys):
    src = tmp_path / "new"
    src.mkdir()
    for c in range(2):
        _write(synth, src / f"case01_{c:04d}.nii.gz", synth.MSD_ZYX)
    assert M.main([str(raw), str(src)]) == 2
    assert "already exist in imagesTr/ or imagesTs/" in capsys.readouterr().err
    assert M.main([str(raw), str(src), "--prefix", "u_"]) == 0
    assert M.main([str(raw), str(src), "--prefix", "u_"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert M.main([str(raw), str(src), "--prefix", "u_", "--overwrite"]) == 0
    assert _unlabeled(raw) == ["u_case01_0000.nii.gz", "u_case01_0001.nii.gz"]
    rec = json.loads((raw / "ssl_split.json").read_text())
    assert len(rec["additions"]) == 2 and rec["additions"][1]["replaced"] == ["u_case01"]


def test_bad_case_leaves_existing_unlabeled_untouched(raw, tmp_path, synth, capsys):
    good = tmp_path / "good"
    good.mkdir()
    for c in range(2):
        _write(synth, good / f"g_{c:04d}.nii.gz", synth.MSD_ZYX)
    assert M.main([str(raw), str(good)]) == 0
    before = _unlabeled(raw)
    bad = tmp_path / "bad"
    bad.mkdir()
    for c in range(2):
        _write(synth, bad / f"a_{c:04d}.nii.gz", synth.MSD_ZYX)
    _write(synth, bad / "b_0000.nii.gz", synth.MSD_ZYX)
    _write(synth, bad / "b_0001.nii.gz", (3, 6, 4))  # channels differ in shape
    assert M.main([str(raw), str(bad)]) == 2
    assert "b_0000.nii.gz" in capsys.readouterr().err
    assert _unlabeled(raw) == before
    assert not [p for p in raw.iterdir() if p.name.startswith(".")]
    assert json.loads((raw / "dataset.json").read_text())["numUnlabeled"] == 1


def test_2d_image_in_3d_dataset_and_format_errors(raw, tmp_path, synth, capsys):
    src = tmp_path / "flat"
    src.mkdir()
    for c in range(2):
        synth.sitk.WriteImage(synth.sitk.GetImageFromArray(np.zeros((6, 5), np.float32)),
                              str(src / f"f_{c:04d}.nii.gz"))
    assert M.main([str(raw), str(src)]) == 2
    assert "is 2D but the dataset's images are 3D" in capsys.readouterr().err
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a_0000.nii.gz").write_bytes(b"")
    (mixed / "a_0001.nrrd").write_bytes(b"")
    assert M.main([str(raw), str(mixed)]) == 2
    assert "mixes file endings" in capsys.readouterr().err
    png = tmp_path / "png"
    png.mkdir()
    (png / "a_0000.png").write_bytes(b"")
    (png / "a_0001.png").write_bytes(b"")
    assert M.main([str(raw), str(png)]) == 2
    assert "convert them to .nii.gz first" in capsys.readouterr().err
    assert M.main(["77", str(png), "-o", str(tmp_path / "raw")]) == 2
    assert "dataset id 77" in capsys.readouterr().err
