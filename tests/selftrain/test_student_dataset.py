"""The student dataset of one round: filtered labels, dataset.json, record, teacher's plans, splits."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ssl.selftrain import ModelSpec, SelfTrainingError, build_student_dataset, prepare_student_dataset

from .conftest import CONFIG, STUDENT_ID_BUILD, TEACHER, load

LABELED = [f"train{i:03d}" for i in range(5)]
PSEUDO = [f"unl{i:03d}" for i in range(6)]


def _array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def threshold(pseudolabels) -> float:
    """The median confidence: about half of the voxels fall below it, in every case."""
    conf = np.concatenate([_array(pseudolabels / "confidence" / f"{c}.nii.gz").ravel() for c in PSEUDO])
    return float(np.round(np.median(conf), 4))


@pytest.fixture(scope="module")
def student(teacher, pseudolabels, threshold):
    spec = ModelSpec(teacher["dataset"]["name"], CONFIG, TEACHER, folds=(0,))
    return prepare_student_dataset(spec, str(pseudolabels), STUDENT_ID_BUILD, folds=(0,), threshold=threshold,
                                   case_cut=0.0, num_processes=1, verbose=False)


def test_dataset_json_declares_the_ignore_label(student):
    dj = load(f"{student.raw_folder}/dataset.json")
    assert dj["labels"] == {"background": 0, "organ": 1, "lesion": 2, "ignore": 3}
    assert max(dj["labels"].values()) == dj["labels"]["ignore"]  # nnU-Net: ignore must be the highest label
    assert dj["numTraining"] == 11 and dj["numUnlabeled"] == 6 and dj["file_ending"] == ".nii.gz"
    assert dj["name"] == f"Dataset{STUDENT_ID_BUILD}_SSLSynthetic_ST1" == student.name
    assert student.ignore_label == 3 and student.round == 1


def test_pseudo_labels_are_thresholded_exactly(student, pseudolabels, threshold, dataset3d):
    for case in PSEUDO:
        hard = _array(pseudolabels / "labels" / f"{case}.nii.gz")
        conf = _array(pseudolabels / "confidence" / f"{case}.nii.gz")
        img = sitk.ReadImage(f"{student.raw_folder}/labelsTr/{case}.nii.gz")
        got = sitk.GetArrayFromImage(img)
        low = conf < threshold
        assert 0 < low.mean() < 1
        assert np.array_equal(got, np.where(low, 3, hard)), case
        ref = sitk.ReadImage(str(dataset3d["raw"] / "imagesUnlabeled" / f"{case}_0000.nii.gz"))
        assert img.GetSize() == ref.GetSize() and np.allclose(img.GetSpacing(), ref.GetSpacing())
    for case in LABELED:  # truly labeled cases are untouched
        assert np.array_equal(_array(f"{student.raw_folder}/labelsTr/{case}.nii.gz"),
                              _array(dataset3d["raw"] / "labelsTr" / f"{case}.nii.gz"))


def test_record_says_which_cases_are_pseudo_labeled_from_which_model(student, teacher, pseudolabels, threshold):
    rec = load(f"{student.raw_folder}/ssl_split.json")
    assert rec["converter"] == "nnunet_ssl self-train"
    assert rec["labeled"] == LABELED and rec["pseudo_labeled"] == PSEUDO and rec["unlabeled"] == PSEUDO
    st = rec["self_training"]
    assert st["teacher"]["model_folder"] == str(teacher["model_folder"]) and st["teacher"]["folds"] == [0]
    assert st["teacher"]["trainer"] == TEACHER and st["teacher"]["use_tta"] is False
    assert st["threshold"] == threshold and st["case_cut"] == 0.0 and st["ignore_label"] == 3
    assert st["pseudolabel_folder"] == str(pseudolabels) and st["dropped"] == {}
    assert 0 < min(st["ignored_voxel_fraction"].values()) <= max(st["ignored_voxel_fraction"].values()) < 1
    assert load(f"{student.preprocessed_folder}/ssl_split.json") == rec


def test_splits_keep_pseudo_labeled_cases_out_of_validation(student, dataset3d):
    splits = load(f"{student.preprocessed_folder}/splits_final.json")
    teacher_splits = load(dataset3d["pre"] / "splits_final.json")
    assert len(splits) == len(teacher_splits) == 5
    for fold, (s, t) in enumerate(zip(splits, teacher_splits)):
        assert s["val"] == t["val"] and set(s["val"]) <= set(LABELED), fold
        assert not set(s["val"]) & set(PSEUDO)
        assert set(PSEUDO) <= set(s["train"]) and set(s["train"]) - set(PSEUDO) == set(t["train"])


def test_plans_are_the_teachers_and_every_case_is_preprocessed(student, dataset3d):
    teacher_plans = load(dataset3d["pre"] / "nnUNetPlans.json")
    plans = load(f"{student.preprocessed_folder}/nnUNetPlans.json")
    assert plans.pop("dataset_name") == student.name
    teacher_plans.pop("dataset_name")
    assert plans == teacher_plans
    data = Path(student.preprocessed_folder) / "nnUNetPlans_3d_fullres"
    assert {p.name[: -len(".pkl")] for p in data.glob("*.pkl")} == set(LABELED + PSEUDO)
    assert (Path(student.preprocessed_folder) / "gt_segmentations" / "unl000.nii.gz").is_file()


def test_noisy_student_fold_all_validates_on_labeled_cases_only(student):
    from nnunet_ssl.trainers.nnUNetTrainerNoisyStudent import nnUNetTrainerNoisyStudent

    from ..conftest import make_trainer

    tr = make_trainer(nnUNetTrainerNoisyStudent, {"pre": Path(student.preprocessed_folder)}, CONFIG, fold="all")
    tr.print_to_log_file = lambda *a, **k: None
    tr_keys, val_keys = tr.do_split()
    assert set(tr_keys) == set(LABELED + PSEUDO) and sorted(val_keys) == LABELED


def test_existing_student_dataset_is_reused_and_conflicts_are_refused(student, teacher, pseudolabels, threshold):
    spec = ModelSpec(teacher["dataset"]["name"], CONFIG, TEACHER, folds=(0,))
    dataset_json = os.path.join(student.raw_folder, "dataset.json")
    before = os.stat(dataset_json).st_mtime_ns
    again = prepare_student_dataset(spec, str(pseudolabels), STUDENT_ID_BUILD, folds=(0,), threshold=threshold,
                                    case_cut=0.0, verbose=False)
    assert again.reused and again.pseudo_labeled == PSEUDO and os.stat(dataset_json).st_mtime_ns == before
    with pytest.raises(SelfTrainingError, match="not built from this teacher with these settings.*threshold"):
        prepare_student_dataset(spec, str(pseudolabels), STUDENT_ID_BUILD, folds=(0,), threshold=0.5, case_cut=0.0,
                                verbose=False)
    with pytest.raises(SelfTrainingError, match="dataset id 990 is already used by Dataset990_SSLSynthetic"):
        prepare_student_dataset(spec, str(pseudolabels), 990, folds=(0,), verbose=False)


def test_every_case_dropped_is_a_clear_error(teacher, pseudolabels):
    spec = ModelSpec(teacher["dataset"]["name"], CONFIG, TEACHER, folds=(0,))
    with pytest.raises(SelfTrainingError, match="every one of the 6 pseudo-labeled case.* --case-cut 1.0"):
        build_student_dataset(spec, str(pseudolabels), 978, case_cut=1.0, verbose=False)


def test_incomplete_pseudo_labels_are_refused(teacher, pseudolabels, tmp_path):
    spec = ModelSpec(teacher["dataset"]["name"], CONFIG, TEACHER, folds=(0,))
    partial = tmp_path / "pl"
    shutil.copytree(pseudolabels, partial)
    (partial / "summaries" / "unl003.json").unlink()
    with pytest.raises(SelfTrainingError, match="incomplete: 1 case.*unl003"):
        build_student_dataset(spec, str(partial), 978, case_cut=0.0, verbose=False)
    assert not list(Path(os.environ["nnUNet_raw"]).glob("*Dataset978*"))  # nothing half-written


def test_next_round_starts_from_the_student(student):
    """Round 2: the student dataset is the teacher; its truly labeled cases and folds carry over, its old
    pseudo-labeled cases do not (the new round's pseudo-labels replace them)."""
    from nnunet_ssl.selftrain.selftrain import student_folder_name, student_splits, teacher_lineage

    lineage = teacher_lineage(student.name)
    assert lineage.labeled == LABELED and lineage.root_dataset == "Dataset990_SSLSynthetic"
    assert lineage.next_round == 2
    assert student_folder_name(977, lineage.root_dataset, 2) == "Dataset977_SSLSynthetic_ST2"
    spec = ModelSpec(student.name, CONFIG, "nnUNetTrainerNoisyStudent", folds=(0,))
    splits = student_splits(spec, lineage.labeled, ["unl002", "unl004"], folds=(0, 4))
    previous = load(f"{student.preprocessed_folder}/splits_final.json")
    for s, p in zip(splits, previous):
        assert s["val"] == p["val"] and set(s["train"]) == (set(p["train"]) - set(PSEUDO)) | {"unl002", "unl004"}
    with pytest.raises(SelfTrainingError, match="fold 5 is not in the teacher's splits"):
        student_splits(spec, lineage.labeled, [], folds=(5,))
