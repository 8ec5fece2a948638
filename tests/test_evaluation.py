"""Dice / HD95 / ASD on hand-made masks with known values, the medpy definitions, and folder evaluation."""
import json
import math

import numpy as np
import pytest
from scipy import ndimage

from nnunet_ssl import evaluation as E

SQRT5, SQRT8 = math.sqrt(5), math.sqrt(8)


def test_single_voxels_distance_follows_spacing_axis_order():
    ref = np.zeros((3, 4, 5), bool)
    ref[0, 0, 0] = True
    pred = np.zeros_like(ref)
    pred[0, 0, 3] = True  # 3 voxels along the last axis
    spacing = (2.0, 1.0, 0.5)
    assert E.hd95(pred, ref, spacing) == pytest.approx(1.5)
    assert E.asd(pred, ref, spacing) == pytest.approx(1.5)
    assert E.hd95(pred, ref) == pytest.approx(3.0)  # voxels
    pred2 = np.zeros_like(ref)
    pred2[2, 0, 0] = True  # 2 voxels along the first axis
    assert E.hd95(pred2, ref, spacing) == pytest.approx(4.0)
    assert E.dice(pred, ref) == 0.0


def test_hd95_pools_both_directions_and_asd_is_directed():
    ref = np.zeros((9, 9), bool)
    ref[2, 2] = True
    pred = ref.copy()
    pred[2, 6] = True  # d(pred->ref) = [0, 4], d(ref->pred) = [0]
    assert E.hd95(pred, ref) == pytest.approx(np.percentile([0, 4, 0], 95)) == pytest.approx(3.6)
    assert E.asd(pred, ref) == pytest.approx(2.0)
    assert E.asd(ref, pred) == pytest.approx(0.0)
    assert E.assd(pred, ref) == pytest.approx(4 / 3)
    assert E.dice(pred, ref) == pytest.approx(2 / 3)


def test_concentric_squares_with_mask_touching_the_array_border():
    ref = np.ones((7, 7), bool)  # erosion with border value 0: its surface is the 24-voxel outer ring
    pred = np.zeros((7, 7), bool)
    pred[2:5, 2:5] = True  # surface: 8 voxels, each 2 from the ring
    assert E.dice(pred, ref) == pytest.approx(18 / 58)
    assert E.asd(pred, ref) == pytest.approx(2.0)
    # ring -> inner surface: 4 corners at sqrt 8, 8 at sqrt 5, 12 at 2
    assert E.asd(ref, pred) == pytest.approx((4 * SQRT8 + 8 * SQRT5 + 12 * 2) / 24)
    # pooled: 20 x 2, 8 x sqrt5, 4 x sqrt8; the 95th percentile falls between entries 29 and 30, both sqrt 8
    assert E.hd95(pred, ref) == pytest.approx(SQRT8)
    assert E.hd95(pred, ref, spacing=(3.0, 3.0)) == pytest.approx(3 * SQRT8)


def test_surface_uses_face_connectivity():
    ref = np.zeros((5, 5), bool)
    ref[2, 1:4] = ref[1:4, 2] = True  # a plus: its centre has all 4 face neighbours, so it is not surface
    pred = np.zeros_like(ref)
    pred[2, 2] = True
    assert E.asd(pred, ref) == pytest.approx(1.0)  # would be 0 with a full-connectivity surface
    assert E.asd(pred, ref, connectivity=2) == pytest.approx(0.0)


def test_identical_masks():
    a = np.zeros((6, 7, 8), bool)
    a[1:4, 2:6, 3:7] = True
    assert (E.dice(a, a), E.hd95(a, a, (5, 1, 1)), E.asd(a, a)) == (1.0, 0.0, 0.0)


def _naive(a, b, spacing):
    fp = ndimage.generate_binary_structure(a.ndim, 1)
    sa = a ^ ndimage.binary_erosion(a, structure=fp)
    sb = b ^ ndimage.binary_erosion(b, structure=fp)
    return (ndimage.distance_transform_edt(~sb, sampling=spacing)[sa],
            ndimage.distance_transform_edt(~sa, sampling=spacing)[sb])


@pytest.mark.parametrize("seed", range(4))
def test_cropping_to_the_masks_changes_nothing(seed):
    rng = np.random.RandomState(seed)
    a = ndimage.gaussian_filter(rng.rand(10, 30, 25), 2) > 0.55
    b = ndimage.gaussian_filter(rng.rand(10, 30, 25), 2) > 0.55
    a[0, :5, :5] = True  # touch the array border
    spacing = (4.0, 0.7, 1.3)
    got, want = E.directed_surface_distances(a, b, spacing), _naive(a, b, spacing)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.sort(g), np.sort(w))


def test_matches_medpy_when_installed():
    binary = pytest.importorskip("medpy.metric.binary", reason="medpy not installed: cross-check skipped")
    rng = np.random.RandomState(0)
    for t in range(6):
        shape = (8, 20, 18) if t % 2 else (30, 25)
        a = ndimage.gaussian_filter(rng.rand(*shape), 2) > 0.5
        b = ndimage.gaussian_filter(rng.rand(*shape), 2) > 0.5
        sp = tuple(rng.uniform(0.3, 5, len(shape)))
        for s in (None, sp):
            assert E.hd95(a, b, s) == pytest.approx(binary.hd95(a, b, s), abs=1e-12)
            assert E.asd(a, b, s) == pytest.approx(binary.asd(a, b, s), abs=1e-12)


def test_case_metrics_empty_conventions():
    ref = np.zeros((4, 6, 6), np.uint8)
    pred = np.zeros_like(ref)
    ref[1:3, 1:3, 1:3] = 1   # class 1: predicted empty
    pred[1:3, 3:5, 3:5] = 2  # class 2: reference empty
    m = E.case_metrics(pred, ref, {"a": 1, "b": 2, "c": 3, "ab": (1, 2)}, spacing=(2, 1, 1))
    assert m["a"]["Dice"] == 0.0 and math.isnan(m["a"]["HD95_mm"]) and m["a"]["empty"] == "prediction"
    assert m["b"]["Dice"] == 0.0 and math.isnan(m["b"]["ASD_vox"]) and m["b"]["empty"] == "reference"
    assert math.isnan(m["c"]["Dice"]) and m["c"]["empty"] == "both"
    assert m["ab"]["empty"] == "none" and m["ab"]["n_ref"] == 8 and m["ab"]["n_pred"] == 8  # region = union
    assert m["ab"]["HD95_vox"] == pytest.approx(E.hd95(pred > 0, ref > 0))
    s = E.summarize([{"metrics": m}], {"a": 1, "b": 2, "c": 3})
    assert (s["per_class"]["a"]["n_empty_prediction"], s["per_class"]["b"]["n_empty_reference"],
            s["per_class"]["c"]["n_both_empty"]) == (1, 1, 1)
    assert s["per_class"]["a"]["n_valid_HD95_mm"] == 0 and s["mean_over_classes"]["Dice"] == 0.0


def test_pooled_volume_ratio_precision_recall():
    # case 1: reference 8 voxels, prediction 12 of which 4 overlap; case 2: reference 2, prediction 0 (missed)
    r1, p1 = np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8)
    r1[0:2, 0:2, 0:2] = 1
    p1[0:2, 0:3, 1:3] = 1
    r2, p2 = np.zeros_like(r1), np.zeros_like(r1)
    r2[3, 3, 2:4] = 1
    cases = [{"metrics": E.case_metrics(p, r, {"fg": 1})} for p, r in ((p1, r1), (p2, r2))]
    c1 = cases[0]["metrics"]["fg"]
    assert (c1["n_pred"], c1["n_ref"], c1["n_tp"]) == (12, 8, 4)
    m = E.summarize(cases, {"fg": 1})["per_class"]["fg"]
    assert (m["n_pred"], m["n_ref"], m["n_tp"]) == (12, 10, 4)
    assert m["volume_ratio"] == pytest.approx(1.2)  # pooled, not the mean of the per-case ratios (1.5 and 0)
    assert m["precision"] == pytest.approx(4 / 12) and m["recall"] == pytest.approx(4 / 10)
    empty = E.summarize([{"metrics": E.case_metrics(p2, p2, {"fg": 1})}], {"fg": 1})["per_class"]["fg"]
    assert math.isnan(empty["volume_ratio"]) and math.isnan(empty["precision"]) and math.isnan(empty["recall"])


@pytest.fixture
def folders(tmp_path):
    sitk = pytest.importorskip("SimpleITK")

    def write(arr, path, spacing=(0.5, 1.0, 4.0)):  # SimpleITK (x, y, z) order
        img = sitk.GetImageFromArray(arr.astype(np.uint8))
        img.SetSpacing(spacing)
        sitk.WriteImage(img, str(path))

    ds = tmp_path / "Dataset001_X"
    ref_dir, pred_dir = ds / "labelsTs", tmp_path / "pred"
    ref_dir.mkdir(parents=True)
    pred_dir.mkdir()
    (ds / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "RV": 1, "LV": 2},
                                                 "file_ending": ".nii.gz", "channel_names": {"0": "MR"}}))
    ref = np.zeros((3, 6, 8), np.uint8)  # numpy (z, y, x)
    ref[1, 1, 1] = 1
    ref[1, 4, 2:6] = 2
    write(ref, ref_dir / "a.nii.gz")
    write(ref, pred_dir / "a.nii.gz")  # perfect
    pred_b = np.zeros_like(ref)
    pred_b[1, 1, 5] = 1  # RV 4 voxels away along x (0.5 mm each); LV missed
    write(ref, ref_dir / "b.nii.gz")
    write(pred_b, pred_dir / "b.nii.gz")
    (pred_dir / "plans.json").write_text("{}")  # nnU-Net leaves these in prediction folders
    return pred_dir, ref_dir, write


def test_evaluate_folder_values_json_and_table(folders, capsys):
    pred_dir, ref_dir, _ = folders
    assert E.main([str(pred_dir), str(ref_dir), "--per-case"]) == 0
    out = capsys.readouterr().out
    assert "RV" in out and "LV" in out and "summary_ssl.json" in out
    s = json.loads((pred_dir / "summary_ssl.json").read_text())
    assert s["labels"] == {"RV": 1, "LV": 2} and s["dataset_json"].endswith("Dataset001_X/dataset.json")
    b = next(c for c in s["per_case"] if c["case"] == "b.nii.gz")
    assert b["spacing"] == [4.0, 1.0, 0.5] and b["shape"] == [3, 6, 8]
    assert b["metrics"]["RV"]["HD95_mm"] == pytest.approx(2.0) and b["metrics"]["RV"]["HD95_vox"] == 4.0
    assert b["metrics"]["LV"]["Dice"] == 0.0 and b["metrics"]["LV"]["HD95_mm"] is None  # NaN -> null
    rv, lv = s["mean"]["per_class"]["RV"], s["mean"]["per_class"]["LV"]
    assert rv["Dice"] == pytest.approx(0.5) and rv["ASD_mm"] == pytest.approx(1.0) and rv["n_cases"] == 2
    assert lv["HD95_mm"] == 0.0 and lv["n_valid_HD95_mm"] == 1 and lv["n_empty_prediction"] == 1
    # RV: 2 reference voxels, 2 predicted, 1 overlapping; LV: 8 reference voxels, 4 predicted (case b missed it)
    assert (rv["volume_ratio"], rv["precision"], rv["recall"]) == (1.0, 0.5, 0.5)
    assert (lv["volume_ratio"], lv["precision"], lv["recall"]) == (0.5, 1.0, 0.5)
    assert "recall" in out and "  0.50   1.00   0.50" in out


def test_evaluate_folder_labels_option_and_output_path(folders, tmp_path):
    pred_dir, ref_dir, _ = folders
    s = E.evaluate_folder(pred_dir, ref_dir, labels=[2, (1, 2)], output_file=tmp_path / "x" / "s.json")
    assert list(s["labels"]) == ["LV", "label_1_2"] and (tmp_path / "x" / "s.json").is_file()


def test_evaluate_folder_2d_images_use_in_plane_spacing(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    for d in ("p", "r"):
        (tmp_path / d).mkdir()
    ref, pred = np.zeros((5, 9), np.uint8), np.zeros((5, 9), np.uint8)
    ref[2, 1] = 1
    pred[2, 4] = 1
    for arr, d in ((ref, "r"), (pred, "p")):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((0.5, 2.0))  # x, y
        sitk.WriteImage(img, str(tmp_path / d / "c.nii.gz"))
    s = E.evaluate_folder(tmp_path / "p", tmp_path / "r")
    c = s["per_case"][0]
    assert c["shape"] == [5, 9] and c["spacing"] == [2.0, 0.5]
    assert c["metrics"]["label_1"]["HD95_mm"] == pytest.approx(1.5)


def test_evaluate_folder_errors(folders, tmp_path, capsys):
    pred_dir, ref_dir, write = folders
    (pred_dir / "b.nii.gz").unlink()
    assert E.main([str(pred_dir), str(ref_dir)]) == 2
    assert "have no prediction" in capsys.readouterr().err
    s = E.evaluate_folder(pred_dir, ref_dir, allow_missing=True)
    assert s["missing_predictions"] == ["b.nii.gz"] and len(s["per_case"]) == 1
    write(np.zeros((3, 6, 8)), pred_dir / "zzz.nii.gz")
    assert E.main([str(pred_dir), str(ref_dir), "--allow-missing"]) == 2
    assert "zzz.nii.gz" in capsys.readouterr().err
    (pred_dir / "zzz.nii.gz").unlink()
    write(np.zeros((3, 6, 7)), pred_dir / "b.nii.gz")
    assert E.main([str(pred_dir), str(ref_dir)]) == 2
    assert "shape mismatch" in capsys.readouterr().err
    assert E.main([str(tmp_path / "nope"), str(ref_dir)]) == 2
