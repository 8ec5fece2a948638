"""BCP with distribution alignment: the labeled prior from whole cases, aligned teacher pseudo-labels, diagnostics,
checkpoint round-trip."""
import json
import os

import numpy as np
import pytest
import torch

from nnunet_ssl.algorithms.bcp import largest_component_per_class
from nnunet_ssl.trainers.nnUNetTrainerBCP import nnUNetTrainerBCP_sslTiny
from nnunet_ssl.trainers.nnUNetTrainerBCP_distAlign import nnUNetTrainerBCP_distAlign

from ..conftest import make_trainer
from .helpers import assert_state_equal, one_epoch, start, state_copy, steps


class _Tiny(nnUNetTrainerBCP_distAlign, nnUNetTrainerBCP_sslTiny):
    pass


def _true_prior(tr) -> np.ndarray:
    """Class shares over the fold's labeled training cases, counted straight from nnU-Net's preprocessed segs."""
    dataset_tr, _ = tr.get_tr_and_val_datasets()
    counts = np.zeros(3)
    for k in dataset_tr.identifiers:
        seg = np.asarray(dataset_tr.load_case(k)[1][:]).ravel()
        counts += np.bincount(seg[seg >= 0], minlength=3)[:3]
    return counts / counts.sum()


def test_pseudo_labels_are_the_aligned_teacher_argmax(dataset3d):
    tr = start(make_trainer(_Tiny, dataset3d, "3d_fullres", fold=0))
    da = tr.ssl_modules["dist_align"]
    assert not da.has_prior and (da.momentum, da.max_ratio) == (0.99, 4.0)
    tr.current_epoch = 1
    tr.teacher.load_state_dict(tr.student.state_dict())
    u = next(tr.dataloader_unlabeled)["data"]
    with torch.no_grad():
        raw = tr.teacher(u).float()
    pseudo, counts = tr.pseudo_labels(u)
    np.testing.assert_allclose(da.prior.numpy(), _true_prior(tr), rtol=1e-12)
    assert int(da.num_updates) == 1
    torch.testing.assert_close(da.running.float(), torch.softmax(raw, 1).mean((0, 2, 3, 4)), rtol=1e-5, atol=1e-6)
    shift = (da.prior / da.running).clamp(0.25, 4).log().float().view(1, 3, 1, 1, 1)
    expected, removed, _ = largest_component_per_class((raw + shift).argmax(1))
    assert torch.equal(pseudo, expected) and counts["bcp#n_removed"] == removed
    assert "BCP distribution alignment: labeled class shares" in open(tr.log_file).read()


def test_epoch_diagnostics_and_checkpoint_round_trip(dataset3d, tmp_path):
    tr = start(make_trainer(_Tiny, dataset3d, "3d_fullres", fold=1))
    one_epoch(tr)  # stage 1: no alignment yet
    one_epoch(tr)  # stage 2
    rows = [json.loads(x) for x in open(os.path.join(tr.output_folder, "ssl_progress.jsonl"))]
    assert "da_teacher_over_prior_1" not in rows[0] or rows[0]["da_teacher_over_prior_1"] is None
    da = tr.ssl_modules["dist_align"]
    assert int(da.num_updates) == tr.num_iterations_per_epoch
    for c in range(3):
        assert rows[1][f"da_teacher_over_prior_{c}"] == pytest.approx(float(da.running[c] / da.prior[c]))
    ckpt = tmp_path / "da.pth"
    tr.save_checkpoint(str(ckpt))
    fresh = make_trainer(_Tiny, dataset3d, "3d_fullres", fold=1)
    fresh.num_epochs = 4  # room for a step after the two epochs (E_pre stays round(0.25 * 4) = 1)
    fresh.initialize()
    fresh.load_checkpoint(str(ckpt))
    assert_state_equal(state_copy(fresh.ssl_modules["dist_align"]), state_copy(da))
    fresh.on_train_start()
    steps(fresh, 1)  # the restored prior is used, not recomputed
    assert int(fresh.ssl_modules["dist_align"].num_updates) == tr.num_iterations_per_epoch + 1
    assert "labeled class shares" not in open(fresh.log_file).read()
