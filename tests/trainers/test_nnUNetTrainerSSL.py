"""The SSL base loop, exercised through its simplest method (Mean Teacher) on tiny synthetic data."""
import json
import math

import numpy as np
import pytest
import torch

from nnunet_ssl.data.unlabeled import UnlabeledDataError
from nnunet_ssl.trainers.nnUNetTrainerMeanTeacher import (nnUNetTrainerMeanTeacher_sslTiny,
                                                          nnUNetTrainerMeanTeacher)
from nnunet_ssl.trainers.budgets import budget_variant
from nnunet_ssl.trainers.nnUNetTrainerSSL import SSLConfigurationError

from ..conftest import make_trainer
from .helpers import assert_state_equal, max_abs_diff, one_epoch, start, state_copy, steps


class _ExportTeacherTiny(nnUNetTrainerMeanTeacher_sslTiny):
    export_teacher = True


@pytest.fixture
def trainer(dataset3d):
    return start(make_trainer(nnUNetTrainerMeanTeacher_sslTiny, dataset3d, "3d_fullres", fold=0))


def test_iterations_update_student_and_ema_teacher_exactly(trainer):
    s0 = state_copy(trainer.student)
    t0 = state_copy(trainer.teacher)
    assert_state_equal(s0, t0)  # teacher starts as a copy
    steps(trainer, 1)
    assert trainer.ssl_iteration == 1
    s1, t1 = state_copy(trainer.student), state_copy(trainer.teacher)
    assert max_abs_diff(s0, s1) > 0
    assert_state_equal(s1, t1)  # warm-up decay at step 0 is 0: teacher == student
    steps(trainer, 1)
    s2, t2 = state_copy(trainer.student), state_copy(trainer.teacher)
    for k in t2:  # decay at step 1 is min(1 - 1/2, 0.99) = 0.5
        torch.testing.assert_close(t2[k], 0.5 * t1[k] + 0.5 * s2[k])
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    assert all(p.grad is None for p in trainer.teacher.parameters())


def test_per_rank_unlabeled_batch_and_loss_terms(trainer):
    batch = next(trainer.dataloader_train)
    u = next(trainer.dataloader_unlabeled)["data"]
    assert u.shape == batch["data"].shape  # same patch size and batch size (ratio 1)
    sup, unsup, _ = trainer.compute_losses(batch["data"], batch["target"], u)
    assert sup.item() > 0 and unsup.item() > 0  # noisy student view != clean teacher view
    trainer.noise_std = 0.0
    trainer.teacher.load_state_dict(trainer.student.state_dict())
    _, unsup_same, _ = trainer.compute_losses(batch["data"], batch["target"], u)
    assert unsup_same.item() < 1e-10  # identical views and weights: no consistency signal


def test_lambda_schedule_is_a_fraction_of_the_budget(trainer):
    total = trainer.total_iterations
    assert total == 2 * 3
    assert trainer.unsup_weight(0) == pytest.approx(0.1 * math.exp(-5))
    assert trainer.unsup_weight(math.ceil(0.6 * total)) == pytest.approx(0.1)
    assert trainer.unsup_weight(total - 1) == pytest.approx(0.1)


def test_checkpoint_round_trip_restores_everything(trainer, dataset3d, tmp_path):
    steps(trainer, 3)
    trainer.current_epoch = 1
    trainer.ssl_log.log_epoch(0, {"sup_loss": 1.5})
    ckpt = tmp_path / "ckpt.pth"
    trainer.save_checkpoint(str(ckpt))
    assert not list(tmp_path.glob("*.tmp-*"))  # atomic write leaves no temporary file
    saved = torch.load(ckpt, weights_only=False)
    fresh = make_trainer(nnUNetTrainerMeanTeacher_sslTiny, dataset3d, "3d_fullres", fold=0)
    fresh.initialize()
    # network_weights is a plain nnU-Net network: exactly the stock keys
    assert saved["network_weights"].keys() == fresh.student.state_dict().keys()
    for k in ("optimizer_state", "grad_scaler_state", "logging", "_best_ema", "current_epoch", "init_args",
              "trainer_name", "inference_allowed_mirroring_axes"):
        assert k in saved
    fresh.load_checkpoint(str(ckpt))
    assert_state_equal(state_copy(fresh.student), state_copy(trainer.student))
    assert_state_equal(state_copy(fresh.teacher), state_copy(trainer.teacher))
    assert fresh.ssl_iteration == 3 and fresh.current_epoch == 2
    assert fresh.ssl_log.values == {"sup_loss": [1.5]}
    o1, o2 = trainer.optimizer.state_dict(), fresh.optimizer.state_dict()
    for pid in o1["state"]:
        torch.testing.assert_close(o1["state"][pid]["momentum_buffer"], o2["state"][pid]["momentum_buffer"],
                                   rtol=0, atol=0)


def test_export_teacher_writes_teacher_and_resumes_student(dataset3d, tmp_path):
    tr = start(make_trainer(_ExportTeacherTiny, dataset3d, "3d_fullres", fold=1))
    steps(tr, 2)
    steps(tr, 1)
    ckpt = tmp_path / "t.pth"
    tr.save_checkpoint(str(ckpt))
    saved = torch.load(ckpt, weights_only=False)
    assert_state_equal(saved["network_weights"], state_copy(tr.teacher))
    assert max_abs_diff(saved["network_weights"], state_copy(tr.student)) > 0
    fresh = make_trainer(_ExportTeacherTiny, dataset3d, "3d_fullres", fold=1)
    fresh.load_checkpoint(str(ckpt))
    assert_state_equal(state_copy(fresh.student), state_copy(tr.student))  # training resumes the student
    # `--val` scores the exported teacher, then puts the student back
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    scored = {}
    orig = nnUNetTrainer.perform_actual_validation
    nnUNetTrainer.perform_actual_validation = lambda self, save_probabilities=False: scored.update(
        state_copy(self.student))
    try:
        fresh.perform_actual_validation()
    finally:
        nnUNetTrainer.perform_actual_validation = orig
    assert_state_equal(scored, state_copy(tr.teacher))
    assert_state_equal(state_copy(fresh.student), state_copy(tr.student))


def test_resume_continues_from_saved_epoch(dataset3d):
    tr = start(make_trainer(nnUNetTrainerMeanTeacher_sslTiny, dataset3d, "3d_fullres", fold=2))
    tr.save_every = 1  # nnU-Net then writes checkpoint_latest.pth at the end of epoch 0
    one_epoch(tr)
    latest = tr.output_folder + "/checkpoint_latest.pth"
    assert tr.current_epoch == 1 and tr.ssl_iteration == 3
    log = [json.loads(line) for line in open(tr.output_folder + "/ssl_progress.jsonl")]
    assert len(log) == 1 and log[0]["sup_loss"] > 0 and log[0]["lambda"] > 0
    import os
    assert os.path.getsize(tr.output_folder + "/progress_ssl.png") > 1000

    resumed = make_trainer(nnUNetTrainerMeanTeacher_sslTiny, dataset3d, "3d_fullres", fold=2)
    resumed.load_checkpoint(latest)
    assert resumed.current_epoch == 1 and resumed.ssl_iteration == 3
    resumed.run_training()  # runs only epoch 1, then saves checkpoint_final
    assert resumed.current_epoch == 2 and resumed.ssl_iteration == 6
    assert len(resumed.ssl_log.values["sup_loss"]) == 2
    final = torch.load(resumed.output_folder + "/checkpoint_final.pth", weights_only=False)
    assert final["current_epoch"] == 2 and final["ssl_state"]["ssl_iteration"] == 6


def test_nonfinite_loss_skips_step_then_stops(trainer, monkeypatch):
    before = state_copy(trainer.student)
    real = trainer.compute_losses

    def nan_unsup(*a):
        sup, unsup, m = real(*a)
        return sup, unsup * float("nan"), m
    monkeypatch.setattr(trainer, "compute_losses", nan_unsup)
    trainer.max_nonfinite_streak = 3
    out = steps(trainer, 2)
    assert all(np.isnan(o["loss"]) for o in out)
    assert trainer.nonfinite_total == 2
    assert_state_equal(before, state_copy(trainer.student))  # skipped: no update
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite losses.*resume with --c"):
        steps(trainer, 1)


def test_missing_unlabeled_data_is_a_clear_error(dataset3d, tmp_path):
    tr = make_trainer(nnUNetTrainerMeanTeacher_sslTiny, dataset3d, "3d_fullres", fold=3)
    tr.initialize()
    tr.unlabeled_folder = str(tmp_path / "nnUNetPlans_3d_fullres_unlabeled")
    with pytest.raises(UnlabeledDataError, match=r"not preprocessed.*nnunet_ssl preprocess-unlabeled -d "
                                                  r"Dataset990_SSLSynthetic -c 3d_fullres -p nnUNetPlans"):
        tr.get_unlabeled_dataloader()


def test_cascade_and_regions_are_refused(dataset3d):
    plans = json.loads((dataset3d["pre"] / "nnUNetPlans.json").read_text())
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    plans["configurations"]["3d_lowres"] = {"inherits_from": "3d_fullres", "next_stage": "3d_cascade_fullres"}
    plans["continue_training"] = False
    dj = json.loads((dataset3d["pre"] / "dataset.json").read_text())
    with pytest.raises(SSLConfigurationError, match="does not support the cascade"):
        nnUNetTrainerMeanTeacher(plans, "3d_cascade_fullres", 0, dj, torch.device("cpu"))
    plans["continue_training"] = False
    dj_regions = dict(dj, labels={"background": 0, "whole": [1, 2], "lesion": 2}, regions_class_order=[1, 2])
    with pytest.raises(SSLConfigurationError, match="region-based label definitions"):
        nnUNetTrainerMeanTeacher(plans, "3d_fullres", 0, dj_regions, torch.device("cpu"))


def test_budget_variant_is_registered_by_name():
    cls = budget_variant(nnUNetTrainerMeanTeacher, "sslDemo")
    import nnunet_ssl.trainers.nnUNetTrainerMeanTeacher as m
    assert getattr(m, "nnUNetTrainerMeanTeacher_sslDemo") is cls
    assert issubclass(cls, nnUNetTrainerMeanTeacher)


def test_zero_labeled_cases_is_a_clear_error(dataset3d, tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    tr = make_trainer(nnUNetTrainerMeanTeacher_sslTiny, dataset3d, "3d_fullres", fold=3)
    tr.preprocessed_dataset_folder = str(tmp_path)
    tr.dataset_class = nnUNetDatasetBlosc2
    with pytest.raises(UnlabeledDataError, match="No labeled case in .*Add some to imagesTr/labelsTr"):
        tr.do_split()
