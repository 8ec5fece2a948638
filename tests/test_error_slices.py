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
    assert m == pytest.approx({"outside": 1 / 3, "fp_inside": 1 / 3, "recall": 2 / 3, "volume": 4 / 3})
    assert E.main([str(tmp_path / "pred"), str(tmp_path / "ref")]) == 0
    assert "| A | 1.33 | 0.333 | 0.333 | 0.667 |" in capsys.readouterr().out


def test_bad_input_names_the_file(tmp_path):
    (tmp_path / "ref").mkdir(); (tmp_path / "pred").mkdir()
    _write(tmp_path / "pred" / "c1.nii.gz", np.zeros((2, 2, 2)))
    with pytest.raises(SystemExit, match="c1.nii.gz has no reference"):
        E.error_slices(tmp_path / "pred", tmp_path / "ref", {"A": 1})
    with pytest.raises(SystemExit, match="--labels takes NAME=VALUE"):
        E.class_labels(tmp_path / "ref", ["LV"])
