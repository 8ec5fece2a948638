"""Fixtures of the self-training tests: a tiny trained teacher on Dataset990 and its pseudo-labels.

The teacher is ``nnUNetTrainer_sslTiny`` (2 epochs x 3 iterations), trained in-process exactly as nnUNetv2_train
trains (``run_training``) minus the final validation, which the tests do not need. It is weak on purpose: its
probabilities are far from polarised, so confidence thresholds cut through every case.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

TEACHER = "nnUNetTrainer_sslTiny"
CONFIG = "3d_fullres"
STUDENT_ID_BUILD = 975   # student dataset built by test_student_dataset
STUDENT_ID_E2E = 976     # student dataset of the end-to-end run
NO_UNLABELED_ID = 979    # raw dataset without unlabeled images (error tests)


@pytest.fixture(scope="session")
def teacher(dataset3d) -> dict:
    from nnunet_ssl.trainers.budgets import nnUNetTrainer_sslTiny

    from ..conftest import make_trainer

    folder = dataset3d["results"] / f"{TEACHER}__nnUNetPlans__{CONFIG}"
    if not (folder / "fold_0" / "checkpoint_final.pth").is_file():
        make_trainer(nnUNetTrainer_sslTiny, dataset3d, CONFIG, fold=0).run_training()
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
    return {"dataset": dataset3d, "trainer": TEACHER, "configuration": CONFIG, "model_folder": folder}


@pytest.fixture(scope="session")
def pseudolabels(teacher, tmp_path_factory) -> Path:
    """Pseudo-labels of the 6 unlabeled cases, predicted in this process (no worker processes), no TTA."""
    from nnunet_ssl.selftrain import predict_pseudolabels

    out = tmp_path_factory.mktemp("pseudolabels") / "pl"
    predict_pseudolabels(teacher["dataset"]["id"], CONFIG, TEACHER, folds=[0], output_folder=str(out), use_tta=False,
                         device="cpu", num_processes_preprocessing=0, num_processes_export=0, verbose=False)
    return out


def load(path) -> dict:
    return json.loads(Path(path).read_text())
