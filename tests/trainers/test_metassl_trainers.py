"""MetaSSL on Mean Teacher, FixMatch and CPS: wiring, region diagnostics, thresholds in checkpoints, CLI."""
import json
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_ssl.algorithms.augment import StrongView
from nnunet_ssl.algorithms.mixing import CutMix
from nnunet_ssl.trainers.nnUNetTrainerMetaSSL import DIAGNOSTICS_FILE, nnUNetTrainerMetaSSL, \
    nnUNetTrainerMetaSSL_noSplitUC, nnUNetTrainerMetaSSL_noise, nnUNetTrainerMetaSSL_paper, \
    nnUNetTrainerMetaSSL_released, nnUNetTrainerMetaSSL_released3d, nnUNetTrainerMetaSSL_sslTiny, \
    nnUNetTrainerMetaSSL_voxelMean
from nnunet_ssl.trainers.nnUNetTrainerMetaSSLCPS import nnUNetTrainerMetaSSLCPS_released, \
    nnUNetTrainerMetaSSLCPS_sslTiny, nnUNetTrainerMetaSSLCPS_voxelMean
from nnunet_ssl.trainers.nnUNetTrainerMetaSSLFixMatch import nnUNetTrainerMetaSSLFixMatch_noLabeledLoss, \
    nnUNetTrainerMetaSSLFixMatch_released2dUC, nnUNetTrainerMetaSSLFixMatch_sslTiny, \
    nnUNetTrainerMetaSSLFixMatch_regionMean, nnUNetTrainerMetaSSLFixMatch_voxelMean
from nnunet_ssl.trainers.nnUNetTrainerSSL import SSLConfigurationError

from ..conftest import make_trainer, run_cli
from .helpers import assert_state_equal, max_abs_diff, one_epoch, start, state_copy, steps

REGIONS = ("UCfg", "UCbg", "US", "DC", "DS")


def _last(trainer) -> dict:
    return {k: s[-1] for k, s in trainer.ssl_log.values.items()}


def _check_region_diagnostics(v: dict, suffix: str = "") -> None:
    assert sum(v[f"u_frac_{r}{suffix}"] for r in REGIONS) == pytest.approx(1.0)
    assert sum(v[f"l_frac_{r}{suffix}"] for r in REGIONS) == pytest.approx(1.0)
    for r in REGIONS:
        acc = v[f"shadow_acc_{r}{suffix}"]
        assert math.isnan(acc) or 0.0 <= acc <= 1.0
        assert v[f"u_wterm_{r}{suffix}"] >= 0
        for kind in ("u", "l"):
            share = v[f"{kind}_fgfrac_{r}{suffix}"]
            assert math.isnan(share) or 0.0 <= share <= 1.0  # NaN: the region was empty all epoch
    # labeled targets always hold foreground (nnU-Net oversamples it); a tiny net may predict none on unlabeled data
    assert 0 < v[f"l_fg_weight{suffix}"] < math.inf
    assert math.isnan(v[f"u_fg_weight{suffix}"]) or v[f"u_fg_weight{suffix}"] > 0
    assert sum(v[f"shadow_frac_{r}{suffix}"] for r in REGIONS) == pytest.approx(1.0)
    assert v[f"metassl_L_u{suffix}"] > 0 and v[f"metassl_L_l{suffix}"] > 0


def _taus(trainer) -> dict:
    return {name: s.tau.clone() for name, s in trainer.metassl.sets.items()}


def _pending_totals(trainer) -> dict:
    out = {}
    for key, stats in trainer._metassl_pending:
        out[key] = {k: float(v) for k, v in stats.items()}
    return out


def test_mean_teacher_epoch_logs_diagnostics_and_jsonl(dataset3d):
    tr = start(make_trainer(nnUNetTrainerMetaSSL_sslTiny, dataset3d, "3d_fullres", fold=0))
    assert tr.lambda_max == 0.1 and tr.rampup_fraction == 0.6 and tr.ema_decay == 0.99
    assert tr.metassl.labeled_regions == "released" and set(tr.metassl.sets) == {"ref_u", "sup_l"}
    before = state_copy(tr.student)
    one_epoch(tr)
    assert max_abs_diff(before, state_copy(tr.student)) > 0
    v = _last(tr)
    _check_region_diagnostics(v)
    for c in range(3):
        assert 0 < v[f"tau_ref_u_{c}"] < 1 and 0 < v[f"tau_sup_l_{c}"] < 1
    assert any(v[f"tau_ref_u_{c}"] != pytest.approx(0.9) for c in range(3))  # updated from the teacher
    assert tr.metassl.sets["ref_u"].num_updates.item() == 3  # once per iteration
    # lambda(t) is the spec's ramp on the nnU-Net budget (mean over the epoch's 3 iterations of 6)
    expected = np.mean([0.1 * math.exp(-5 * (1 - min(t / 3.6, 1)) ** 2) for t in range(3)])
    assert v["lambda"] == pytest.approx(expected)
    rows = [json.loads(x) for x in open(os.path.join(tr.output_folder, DIAGNOSTICS_FILE))]
    assert len(rows) == 1 and rows[0]["epoch"] == 0
    for key in ("u_frac_UCfg", "u_fgfrac_DC", "u_fg_weight", "l_fg_weight", "shadow_acc_DC", "tau_ref_u_1",
                "lambda", "metassl_L_u", "metassl_L_l"):
        assert key in rows[0]
    assert rows[0]["u_frac_US"] == pytest.approx(v["u_frac_US"])
    assert os.path.getsize(os.path.join(tr.output_folder, "progress_ssl.png")) > 1000
    assert "MetaSSL: lambda" in open(tr.log_file).read() and "u_fg_weight" in open(tr.log_file).read()


def test_mean_teacher_reference_is_the_teacher_on_the_same_input(dataset3d):
    tr = start(make_trainer(nnUNetTrainerMetaSSL_sslTiny, dataset3d, "3d_fullres", fold=1))
    steps(tr, 1)  # warm-up decay at step 0 is 0: teacher == student afterwards
    assert_state_equal(state_copy(tr.teacher), state_copy(tr.student))
    taus = _taus(tr)
    batch = next(tr.dataloader_train)
    u = next(tr.dataloader_unlabeled)["data"]
    tr._metassl_pending = []
    _, unsup, m = tr.compute_losses(batch["data"], batch["target"], u)
    p = _pending_totals(tr)
    # same weights, same input: every voxel is unanimous, so only UC and US are populated
    for kind in ("u", "shadow"):
        assert p[kind]["n_DC"] == p[kind]["n_DS"] == 0
        assert sum(p[kind][f"n_{r}"] for r in REGIONS) == (u.numel() if kind == "u" else batch["data"].numel())
    assert unsup.item() == pytest.approx(m["metassl_L_u"] + m["metassl_L_l"], rel=1e-6)
    assert all(not torch.equal(taus[k], tr.metassl.sets[k].tau) for k in taus)  # both sets updated once
    # validation never touches the thresholds
    taus = _taus(tr)
    with torch.no_grad():
        tr.on_validation_epoch_start()
        tr.validation_step(next(tr.dataloader_val))
    assert all(torch.equal(taus[k], tr.metassl.sets[k].tau) for k in taus)


def test_mean_teacher_checkpoint_restores_thresholds(dataset3d, tmp_path, monkeypatch):
    tr = start(make_trainer(nnUNetTrainerMetaSSL_sslTiny, dataset3d, "3d_fullres", fold=2))
    steps(tr, 2)
    # a skipped (non-finite) step changes neither the thresholds' use count nor the epoch's region counts
    counts = tr._metassl_counters["u"].counts()
    assert counts["batches"] == 2
    real = tr.compute_losses
    monkeypatch.setattr(tr, "compute_losses", lambda *a: (lambda r: (r[0], r[1] * float("nan"), r[2]))(real(*a)))
    tr.train_step(next(tr.dataloader_train))
    assert tr._metassl_counters["u"].counts() == counts and tr.ssl_iteration == 3
    monkeypatch.undo()
    tr.ssl_iteration = 2
    ckpt = tmp_path / "m.pth"
    tr.save_checkpoint(str(ckpt))
    fresh = make_trainer(nnUNetTrainerMetaSSL_sslTiny, dataset3d, "3d_fullres", fold=2)
    fresh.load_checkpoint(str(ckpt))
    for name, s in tr.metassl.sets.items():
        assert fresh.metassl.sets[name].tau.dtype == torch.float32
        torch.testing.assert_close(fresh.metassl.sets[name].tau, s.tau, rtol=0, atol=0)
        assert fresh.metassl.sets[name].num_updates.item() == 3  # the skipped step had updated them
    assert_state_equal(state_copy(fresh.teacher), state_copy(tr.teacher))
    assert fresh.ssl_iteration == 2 and fresh.unsup_weight() == tr.unsup_weight()


def test_ignore_label_is_excluded_from_labeled_regions(dataset3d):
    plans = json.loads((dataset3d["pre"] / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dj = json.loads((dataset3d["pre"] / "dataset.json").read_text())
    dj["labels"] = {**dj["labels"], "ignore": 3}
    tr = nnUNetTrainerMetaSSL_sslTiny(plans, "3d_fullres", 3, dj, torch.device("cpu"))
    tr.initialize()
    assert tr.metassl_ignore_label == 3 and tr.label_manager.num_segmentation_heads == 3
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(2, 3, 4, 5, 6, generator=g) for _ in range(4)]
    target = torch.randint(0, 3, (2, 1, 4, 5, 6), generator=g).float()
    target[0, 0, :2] = 3
    tr._metassl_pending = []
    tr.metassl_losses(z[0], z[1], z[2], z[3], [target])
    p = _pending_totals(tr)
    valid = int((target != 3).sum())
    assert sum(p["l"][f"n_{r}"] for r in REGIONS) == valid
    assert sum(p["shadow"][f"n_{r}"] for r in REGIONS) == valid
    assert sum(p["u"][f"n_{r}"] for r in REGIONS) == z[0][:, 0].numel()


def test_region_based_configurations_are_refused(dataset3d):
    plans = json.loads((dataset3d["pre"] / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dj = json.loads((dataset3d["pre"] / "dataset.json").read_text())
    dj = dict(dj, labels={"background": 0, "whole": [1, 2], "lesion": 2}, regions_class_order=[1, 2])
    with pytest.raises(SSLConfigurationError, match="region-based"):
        nnUNetTrainerMetaSSL(plans, "3d_fullres", 0, dj, torch.device("cpu"))


def test_fixmatch_variant_diagnostics_and_alignment(dataset3d):
    tr = start(make_trainer(nnUNetTrainerMetaSSLFixMatch_sslTiny, dataset3d, "3d_fullres", fold=0))
    assert tr.lambda_max == 0.1 and tr.rampup_fraction == 0.6 and not tr.use_teacher and tr.teacher is None
    assert tr.metassl.labeled_regions == "figure" and set(tr.metassl.sets) == {"ref_u", "ref_l"}
    # without strong ops the strong view is the weak view: p == p~, only UC / US
    batch = next(tr.dataloader_train)
    u = next(tr.dataloader_unlabeled)["data"]
    tr.strong_aug, tr.mixer = None, None
    tr._metassl_pending = []
    with torch.no_grad():
        tr.compute_losses(batch["data"], batch["target"], u)
    p = _pending_totals(tr)
    for kind in ("u", "shadow"):
        assert p[kind]["n_DC"] == p[kind]["n_DS"] == 0
    # figure variant: regions from agreement of the reference with y*: some labeled voxels are discrepant
    assert p["l"]["n_DC"] + p["l"]["n_DS"] > 0
    tr.strong_aug, tr.mixer = StrongView(tr.strong_p), CutMix(tr.cutmix_area)
    before = state_copy(tr.student)
    one_epoch(tr)
    assert max_abs_diff(before, state_copy(tr.student)) > 0
    v = _last(tr)
    _check_region_diagnostics(v)
    assert sum(v[f"pl_frac_{c}"] for c in range(3)) == pytest.approx(1.0)
    assert {f"tau_ref_l_{c}" for c in range(3)} <= set(v)
    rows = [json.loads(x) for x in open(os.path.join(tr.output_folder, DIAGNOSTICS_FILE))]
    assert len(rows) == 1 and "tau_ref_u_2" in rows[0]


def test_cps_variant_both_directions_and_checkpoint(dataset3d, tmp_path):
    tr = start(make_trainer(nnUNetTrainerMetaSSLCPS_sslTiny, dataset3d, "3d_fullres", fold=0))
    assert set(tr.metassl.sets) == {"1_u", "2_u", "1_l", "2_l"}
    n1, n2 = state_copy(tr.student), state_copy(tr.net2)
    assert max_abs_diff(n1, n2) > 1e-3
    outs = steps(tr, 3)
    tr.on_train_epoch_end(outs)
    assert max_abs_diff(n1, state_copy(tr.student)) > 0 and max_abs_diff(n2, state_copy(tr.net2)) > 0
    v = _last(tr)
    for sfx in ("_1", "_2"):
        _check_region_diagnostics(v, sfx)
    for name in ("1_u", "2_u", "1_l", "2_l"):
        assert tr.metassl.sets[name].num_updates.item() == 3
        assert {f"tau_{name}_{c}" for c in range(3)} <= set(v)
    # the agreement-based region split is symmetric: both directions see the same unanimous fraction
    for sfx in ("_1", "_2"):
        assert v[f"u_frac_UCfg{sfx}"] + v[f"u_frac_UCbg{sfx}"] + v[f"u_frac_US{sfx}"] == pytest.approx(v["agreement"])
    ckpt = tmp_path / "mcps.pth"
    tr.save_checkpoint(str(ckpt))
    fresh = make_trainer(nnUNetTrainerMetaSSLCPS_sslTiny, dataset3d, "3d_fullres", fold=0)
    fresh.load_checkpoint(str(ckpt))
    assert_state_equal(state_copy(fresh.student), state_copy(tr.student))
    assert_state_equal(state_copy(fresh.net2), state_copy(tr.net2))
    for name, s in tr.metassl.sets.items():
        torch.testing.assert_close(fresh.metassl.sets[name].tau, s.tau, rtol=0, atol=0)


def test_2d_configuration_runs_metassl(dataset3d):
    tr = start(make_trainer(nnUNetTrainerMetaSSL_sslTiny, dataset3d, "2d", fold=4))
    before = state_copy(tr.student)
    outs = steps(tr, 2)
    tr.on_train_epoch_end(outs)
    assert max_abs_diff(before, state_copy(tr.student)) > 0
    _check_region_diagnostics(_last(tr))


def test_no_split_uc_variant_uses_one_confident_region(dataset3d):
    tr = start(make_trainer(nnUNetTrainerMetaSSL_noSplitUC, dataset3d, "2d", fold=4))
    assert tr.metassl.split_uc is False and tr.metassl.regions == ("UC", "US", "DC", "DS")
    outs = steps(tr, 2)
    tr.on_train_epoch_end(outs)
    v = _last(tr)
    assert "u_frac_UCfg" not in v
    assert sum(v[f"u_frac_{r}"] for r in ("UC", "US", "DC", "DS")) == pytest.approx(1.0)
    assert v["metassl_L_u"] > 0 and v["metassl_L_l"] > 0


@pytest.mark.parametrize("cls, noisy", [(nnUNetTrainerMetaSSL_sslTiny, False), (nnUNetTrainerMetaSSL_noise, True)])
def test_student_noise_only_in_noise_variant(dataset3d, cls, noisy):
    tr = start(make_trainer(cls, dataset3d, "2d", fold=4))
    seen = {}  # network -> unlabeled part of the batch it was given

    def record(net, *parts):
        seen["teacher" if net is tr.teacher else "student"] = parts[-1].detach().clone()
        return type(tr).forward_parts(tr, net, *parts)

    tr.forward_parts = record
    steps(tr, 1)
    diff = (seen["student"] - seen["teacher"]).abs()
    if noisy:
        assert 0 < diff.max() <= tr.noise_clip + 1e-6 and diff.mean() > 0.1 * tr.noise_std
    else:
        assert diff.max() == 0


@pytest.mark.slow
def test_cli_train_and_predict(dataset3d, tmp_path):
    run_cli(["nnUNetv2_train", str(dataset3d["id"]), "3d_fullres", "0", "-tr", "nnUNetTrainerMetaSSL_sslTiny",
             "-device", "cpu"], timeout=900)
    folder = dataset3d["results"] / "nnUNetTrainerMetaSSL_sslTiny__nnUNetPlans__3d_fullres" / "fold_0"
    rows = [json.loads(x) for x in open(folder / DIAGNOSTICS_FILE)]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(sum(r[f"u_frac_{k}"] for k in REGIONS) == pytest.approx(1.0) for r in rows)
    ckpt = torch.load(folder / "checkpoint_final.pth", weights_only=False)
    assert ckpt["ssl_state"]["ssl_iteration"] == 6
    assert (folder / "validation" / "summary.json").is_file()
    out = tmp_path / "pred"
    run_cli(["nnUNetv2_predict", "-i", str(dataset3d["raw"] / "imagesTs"), "-o", str(out), "-d",
             str(dataset3d["id"]), "-c", "3d_fullres", "-tr", "nnUNetTrainerMetaSSL_sslTiny", "-f", "0",
             "-device", "cpu", "--disable_tta"], timeout=900)
    cases = sorted({f.name.rsplit("_", 1)[0] for f in (dataset3d["raw"] / "imagesTs").iterdir()})
    preds = sorted(out.glob("*.nii.gz"))
    assert [p.name[:-len(".nii.gz")] for p in preds] == cases
    for p in preds:
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(p))))) <= {0, 1, 2}


def test_no_labeled_loss_variant_trains_on_the_unlabeled_term_only(dataset3d):
    tr = start(make_trainer(nnUNetTrainerMetaSSLFixMatch_noLabeledLoss, dataset3d, "2d", fold=4))
    assert tr.use_labeled_loss is False
    before = state_copy(tr.student)
    outs = steps(tr, 2)
    tr.on_train_epoch_end(outs)
    assert max_abs_diff(before, state_copy(tr.student)) > 0
    v = _last(tr)
    assert v["metassl_L_l"] == 0 and v["metassl_L_u"] > 0
    assert not any(k.startswith("l_") for k in v) and sum(v[f"u_frac_{r}"] for r in REGIONS) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- section 13 modes
@pytest.mark.parametrize("cls, config, expected", [
    (nnUNetTrainerMetaSSL_sslTiny, "2d", ("released_mt", "split", "voxel_mean", "released")),
    (nnUNetTrainerMetaSSL_sslTiny, "3d_fullres", ("released_3d", "split", "voxel_mean", "released")),
    (nnUNetTrainerMetaSSL_paper, "2d", ("paper", "split", "region_mean", "released")),
    (nnUNetTrainerMetaSSL_noSplitUC, "2d", ("paper", "joint", "region_mean", "released")),
    (nnUNetTrainerMetaSSL_released, "2d", ("released_mt", "released_2d", "region_mean", "released")),
    (nnUNetTrainerMetaSSL_released, "3d_fullres", ("released_3d", "split", "region_mean", "released")),
    (nnUNetTrainerMetaSSL_released3d, "2d", ("released_3d", "split", "region_mean", "released")),
    (nnUNetTrainerMetaSSL_voxelMean, "2d", ("released_mt", "split", "voxel_mean", "released")),
    (nnUNetTrainerMetaSSL_voxelMean, "3d_fullres", ("released_3d", "split", "voxel_mean", "released")),
    (nnUNetTrainerMetaSSLCPS_released, "2d", ("paper", "released_2d", "region_mean", "released")),
    (nnUNetTrainerMetaSSLCPS_voxelMean, "3d_fullres", ("released_3d", "split", "voxel_mean", "released")),
    (nnUNetTrainerMetaSSLFixMatch_released2dUC, "2d", ("paper", "released_2d", "region_mean", "figure")),
    (nnUNetTrainerMetaSSLFixMatch_voxelMean, "2d", ("paper", "split", "voxel_mean", "figure")),
    (nnUNetTrainerMetaSSLFixMatch_sslTiny, "3d_fullres", ("paper", "split", "voxel_mean", "figure")),
    (nnUNetTrainerMetaSSLFixMatch_regionMean, "2d", ("paper", "split", "region_mean", "figure")),
])
def test_variants_build_the_loss_of_their_mode(dataset3d, cls, config, expected):
    tr = make_trainer(cls, dataset3d, config, fold=0)
    tr.initialize()
    m = tr.metassl
    assert (m.weights_preset, m.uc_mode, m.normalization, m.labeled_regions) == expected
    if m.uc_mode == "released_2d":
        assert m.region_weights_unlabeled["UCfg"] == 0
        assert m.region_weights_unlabeled["UCbg"] == 2 * m.weights_unlabeled["UC"]


def test_a_preset_without_the_configurations_dimension_is_a_clear_error(dataset3d):
    class OnlyTwoD(nnUNetTrainerMetaSSL):
        metassl_preset = {2: "released_mt_2d"}

    tr = make_trainer(OnlyTwoD, dataset3d, "3d_fullres", fold=0)
    with pytest.raises(ValueError, match=r"metassl_preset has no entry for 3D configurations \(3d_fullres\)"):
        tr.initialize()


def test_released_2d_trainer_trains_and_logs_the_share_of_the_labeled_term(dataset3d):
    tr = start(make_trainer(nnUNetTrainerMetaSSL_released, dataset3d, "2d", fold=4))
    seen = []  # lambda_t * L_l(t) of every step, recomputed here
    real = tr.compute_losses

    def spy(*args):
        out = real(*args)
        seen.append(tr.unsup_weight() * out[2]["metassl_L_l"])
        return out

    tr.compute_losses = spy
    before = state_copy(tr.student)
    outs = steps(tr, 2)
    tr.on_train_epoch_end(outs)
    assert max_abs_diff(before, state_copy(tr.student)) > 0
    v = _last(tr)
    _check_region_diagnostics(v)
    assert v["metassl_lamL_l"] == pytest.approx(np.mean(seen), rel=1e-6) and v["metassl_lamL_l"] > 0
    # nnU-Net's loss is CE - soft Dice; + 1 makes the denominator non-negative
    assert v["metassl_lamLl_over_sup"] == pytest.approx(v["metassl_lamL_l"] / (v["sup_loss"] + 1), rel=1e-9)
    assert "lambda*L_l/(L_sup+1)" in open(tr.log_file).read()
