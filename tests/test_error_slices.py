"""benchmarks/error_slices.py on a hand-made 3-slice case with hand-computed fractions."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import error_slices as E  # noqa: E402


def _write(path: Path, arr: np.ndarray) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(arr.astype(np.uint8)), str(path))


def test_fractions_of_the_true_volume(tmp_path, capsys):
    ref = np.zeros((3, 2, 2)); pred = np.zeros((3, 2, 2))
    ref[1, 0, 0] = ref[1, 0, 1] = ref[2, 1, 1] = 1      # class 1: 3 voxels; slice 0 holds no foreground
    pred[0, 0, 0] = 1                                   # in the empty slice
    pred[1, 0, 0] = pred[1, 1, 0] = 1                   # one true positive, one false positive beside it
    pred[2, 1, 1] = 1                                   # true positive
    (tmp_path / "ref").mkdir(); (tmp_path / "pred").mkdir()
    _write(tmp_path / "ref" / "c1.nii.gz", ref); _write(tmp_path / "pred" / "c1.nii.gz", pred)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "A": 1}}))
    m = E.error_slices(tmp_path / "pred", tmp_path / "ref", E.class_labels(tmp_path / "ref", []))["A"]
    assert m == pytest.approx({"outside": 1 / 3, "fp_inside": 1 / 3, "fp_background": 1 / 3, "fp_other_classes": 0,
                               "recall": 2 / 3, "volume": 4 / 3})
    assert E.main([str(tmp_path / "pred"), str(tmp_path / "ref")]) == 0
    assert "| A | 1.33 | 0.333 | 0.333 | 0.333 | 0.000 | 0.667 |" in capsys.readouterr().out


def test_false_positives_on_another_class(tmp_path):
    ref = np.array([[[1, 2], [2, 0]]]); pred = np.array([[[1, 1], [1, 1]]])   # class 1 predicted on 2, 2 and 0
    (tmp_path / "ref").mkdir(); (tmp_path / "pred").mkdir()
    _write(tmp_path / "ref" / "c.nii.gz", ref); _write(tmp_path / "pred" / "c.nii.gz", pred)
    m = E.error_slices(tmp_path / "pred", tmp_path / "ref", {"A": 1, "B": 2})
    assert m["A"] == pytest.approx({"outside": 0, "fp_inside": 3, "fp_background": 1, "fp_other_classes": 2,
                                    "recall": 1, "volume": 4})
    assert m["B"] == pytest.approx({"outside": 0, "fp_inside": 0, "fp_background": 0, "fp_other_classes": 0,
                                    "recall": 0, "volume": 0})


def test_bad_input_names_the_file(tmp_path):
    (tmp_path / "ref").mkdir(); (tmp_path / "pred").mkdir()
    _write(tmp_path / "pred" / "c1.nii.gz", np.zeros((2, 2, 2)))
    with pytest.raises(SystemExit, match="c1.nii.gz has no reference"):
        E.error_slices(tmp_path / "pred", tmp_path / "ref", {"A": 1})
    with pytest.raises(SystemExit, match="--labels takes NAME=VALUE"):
        E.class_labels(tmp_path / "ref", ["LV"])
