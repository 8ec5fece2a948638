"""Bad input to ``nnunet_ssl pseudolabel`` / ``self-train``: one ``nnunet_ssl: error:`` line and exit code 2."""
import os
import shutil
from pathlib import Path

import pytest

from nnunet_ssl.cli import main

from .conftest import CONFIG, NO_UNLABELED_ID, TEACHER


def _error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("nnunet_ssl: error: "), err
    return err[0]


@pytest.fixture
def no_unlabeled(nnunet_root):
    from nnunet_ssl.synthetic import make_synthetic_dataset

    folder = Path(make_synthetic_dataset(os.environ["nnUNet_raw"], NO_UNLABELED_ID, name="NoUnlabeled", dim=3,
                                         n_labeled=2, n_unlabeled=0, n_test=0, shape=(4, 8, 8)))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_no_trained_model(capsys, dataset3d):
    msg = _error(capsys, ["pseudolabel", "-d", str(dataset3d["id"]), "-c", CONFIG, "-tr", "nnUNetTrainerNeverTrained"])
    assert "no trained model" in msg and "nnUNetTrainerNeverTrained__nnUNetPlans__3d_fullres does not exist" in msg
    assert "nnUNetv2_train" in msg


def test_missing_fold_names_the_checkpoint(capsys, teacher):
    msg = _error(capsys, ["pseudolabel", "-d", str(teacher["dataset"]["id"]), "-c", CONFIG, "-tr", TEACHER,
                          "-f", "0", "3"])
    assert "fold(s) ['3']" in msg and "fold_3/checkpoint_final.pth is missing" in msg


def test_no_unlabeled_images(capsys, no_unlabeled):
    msg = _error(capsys, ["pseudolabel", "-d", str(NO_UNLABELED_ID), "-c", CONFIG])
    assert f"{no_unlabeled / 'imagesUnlabeled'} is empty" in msg
    (no_unlabeled / "imagesUnlabeled").rmdir()
    msg = _error(capsys, ["self-train", "-d", str(NO_UNLABELED_ID), "-c", CONFIG, "--student-id", "978"])
    assert f"{no_unlabeled / 'imagesUnlabeled'} does not exist" in msg


@pytest.mark.parametrize("argv,expected", [
    (["pseudolabel", "--threshold", "1.5"], "--threshold 1.5 is outside [0, 1]"),
    (["pseudolabel", "--threshold", "-0.2"], "--threshold -0.2 is outside [0, 1]"),
    (["self-train", "--threshold", "2"], "--threshold 2.0 is outside [0, 1]"),
    (["self-train", "--case-cut", "-0.1"], "--case-cut -0.1 is outside [0, 1]"),
    (["self-train", "--rounds", "0"], "--rounds 0 must be at least 1"),
    (["self-train", "--student-trainer", "nnUNetTrainerNoSuchStudent"],
     "unknown trainer 'nnUNetTrainerNoSuchStudent' (--student-trainer)"),
    (["self-train", "--student-id", "990"], "dataset id 990 (round 1) is already used by Dataset990_SSLSynthetic"),
    (["pseudolabel", "-num_parts", "2", "-part_id", "2"], "-part_id 2 is not in 0..1"),
    (["pseudolabel", "-num_parts", "0"], "-num_parts 0 must be at least 1"),
    (["pseudolabel", "-num_parts", "2", "--overwrite"], "--overwrite cannot be combined with -num_parts > 1"),
    (["self-train", "--pseudolabels", "/nonexistent/pl"], "pseudo-label folder /nonexistent/pl does not exist"),
])
def test_bad_values(capsys, teacher, argv, expected):
    base = ["-d", str(teacher["dataset"]["id"]), "-c", CONFIG, "-tr", TEACHER, "-f", "0", "--disable_tta",
            "-device", "cpu", "-npp", "0", "-nps", "0"]
    msg = _error(capsys, [argv[0], *base, *argv[1:]])
    assert expected in msg


def test_unknown_dataset(capsys, nnunet_root):
    msg = _error(capsys, ["pseudolabel", "-d", "987", "-c", CONFIG])
    assert "Dataset '987' not found" in msg
