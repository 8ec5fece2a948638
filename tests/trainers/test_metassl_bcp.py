"""MetaSSL on BCP: stage-2 references in the mixed frame, MetaSSL regions restricted to BCP's regions, stage 1
without MetaSSL, thresholds and teacher in checkpoints, diagnostics, 2D and 3D."""
import copy
import json
import math
import os
import shutil

import pytest
import torch

from nnunet_ssl.algorithms.bcp import largest_component_per_class
from nnunet_ssl.trainers.nnUNetTrainerBCP import nnUNetTrainerBCP
from nnunet_ssl.trainers.nnUNetTrainerMetaSSL import DIAGNOSTICS_FILE
from nnunet_ssl.trainers.nnUNetTrainerMetaSSLBCP import (nnUNetTrainerMetaSSLBCP, nnUNetTrainerMetaSSLBCP_noLCC,
                                                         nnUNetTrainerMetaSSLBCP_sslTiny)

from ..conftest import make_trainer
from .helpers import assert_state_equal, max_abs_diff, one_epoch, start, state_copy, steps
from .test_bcp_trainer import _ds_targets, _next_box

REGIONS = ("UCfg", "UCbg", "US", "DC", "DS")


def _perturb_teacher(tr, seed=0):
    """A teacher that differs from the student, so the reference is not the student's own prediction."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tr.teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _spy_metassl(tr, monkeypatch):
    calls = {}
    m = tr.metassl
    for name in ("unlabeled_loss", "labeled_loss"):
        real = getattr(m, name)

        def spy(*args, _real=real, _name=name, **kw):
            out = _real(*args, **kw)
            calls[_name] = (args, kw, out)
            return out
        monkeypatch.setattr(m, name, spy)
    return calls


def _taus(tr):
    return {name: (s.tau.clone(), int(s.num_updates)) for name, s in tr.metassl.sets.items()}


def test_defaults_and_mode_per_dimension(dataset3d):
    for config, expected in (("2d", "released_mt"), ("3d_fullres", "released_3d")):
        tr = make_trainer(nnUNetTrainerMetaSSLBCP, dataset3d, config, fold=0)
        tr.initialize()
        assert (tr.metassl.weights_preset, tr.metassl.uc_mode, tr.metassl.normalization) == \
            (expected, "split", "voxel_mean")
    assert (tr.lambda_max, tr.rampup_fraction, tr.ema_decay, tr.ema_warmup) == (0.1, 0.6, 0.99, False)
    assert tr.metassl.labeled_regions == "released" and set(tr.metassl.sets) == {"ref_u", "sup_l"}
    assert tr.metassl_ignore_label == tr.region_ignore == 3 and tr.pseudo_label_lcc
    assert nnUNetTrainerMetaSSLBCP_noLCC.pseudo_label_lcc is False
    # lambda: 0 in stage 1, MetaSSL's ramp on the global clock in stage 2 (E_pre = 250 of 1000 epochs)
    t_pre = 250 * tr.num_iterations_per_epoch
    assert tr.unsup_weight(t_pre - 1) == 0.0
    total = tr.num_epochs * tr.num_iterations_per_epoch
    assert tr.unsup_weight(t_pre) == pytest.approx(0.1 * math.exp(-5 * (1 - t_pre / (0.6 * total)) ** 2))
    assert tr.unsup_weight(total - 1) == pytest.approx(0.1)


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_stage2_references_targets_and_regions(dataset3d, configuration, monkeypatch):
    tr = start(make_trainer(nnUNetTrainerMetaSSLBCP_sslTiny, dataset3d, configuration, fold=1))
    tr.current_epoch = 1
    assert tr.stage == 2
    _perturb_teacher(tr)
    metassl_before = copy.deepcopy(tr.metassl)  # the thresholds the step starts from
    calls = _spy_metassl(tr, monkeypatch)
    seen = {}
    tr.teacher.register_forward_hook(lambda m, i, o: seen.__setitem__("teacher", i[0].detach().clone()))
    batch = next(tr.dataloader_train)
    data, target = batch["data"][:2], [t[:2] for t in batch["target"]]  # k = 2: one LU and one UL pair
    u = next(tr.dataloader_unlabeled)["data"]
    u = torch.cat([u, u])[:3]  # B_u = 3 > B_l: U_2 stays unused
    mask = _next_box(tr, data.shape[2:])
    g_state = tr.box_generator.get_state()
    sup, unsup, m = tr.compute_losses(data, target, u)
    with torch.no_grad():
        assert torch.equal(seen["teacher"], torch.cat([data, u[:2]]))  # one pass on the clean patches only
        t_l, t_u = tr.teacher(data).float(), tr.teacher(u[:2]).float()
        x = torch.stack([torch.where(mask, data[0], u[0]), torch.where(mask, u[1], data[1])])
        z = tr.network(x)[0]
    (sup_u, ref_u), kw_u, (l_u, s_u) = calls["unlabeled_loss"]
    (sup_l, ref_l, y_l, ign), _, (l_l, s_l) = calls["labeled_loss"]
    # reference: the teacher on the clean patches, pasted with the student's box
    inside = tuple(int(i) for i in torch.nonzero(mask)[0])
    outside = tuple(int(i) for i in torch.nonzero(~mask)[-1])
    for v, lu_src, ul_src in ((inside, t_l[0], t_u[1]), (outside, t_u[0], t_l[1])):
        torch.testing.assert_close(ref_u[(0, slice(None)) + v], lu_src[(slice(None),) + v], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref_u[(1, slice(None)) + v], ul_src[(slice(None),) + v], rtol=1e-5, atol=1e-5)
    expected_ref = torch.stack([torch.where(mask, t_l[0], t_u[0]), torch.where(mask, t_u[1], t_l[1])])
    torch.testing.assert_close(ref_u, expected_ref, rtol=1e-5, atol=1e-5)
    assert ref_l is ref_u and sup_l is sup_u
    torch.testing.assert_close(sup_u.detach(), z, rtol=1e-5, atol=1e-5)  # the student on the mixed images
    # unlabeled term: R_pse only (outside the box for LU, inside for UL), target = the LCC-filtered pseudo-label
    valid = torch.stack([~mask, mask])
    assert torch.equal(kw_u["valid"], valid)
    pseudo, _, _ = largest_component_per_class(t_u.argmax(1))
    y_pse = torch.stack([torch.where(mask, 0, pseudo[0]), torch.where(mask, pseudo[1], 0)])
    assert torch.equal(kw_u["target"][:, 0][valid].long(), y_pse[valid])
    assert sum(int(s_u[f"n_{r}"]) for r in REGIONS) == int((~mask).sum() + mask.sum())
    # labeled term: the ground truth on R_lab only (inside the box for LU, outside for UL)
    assert ign == 3
    y = target[0][:, 0]
    r_lab = torch.stack([mask, ~mask])
    assert torch.equal(y_l[:, 0] != 3, r_lab) and torch.equal(y_l[:, 0][r_lab], y[r_lab])
    assert sum(int(s_l[f"n_{r}"]) for r in REGIONS) == int(r_lab.sum())
    # L_u rebuilt from the expected tensors with the thresholds the step started from
    l_u_ref, _ = metassl_before.unlabeled_loss(z, expected_ref, valid=valid, target=y_pse)
    assert l_u.item() == pytest.approx(l_u_ref.item(), rel=1e-4)
    assert unsup.item() == pytest.approx(m["metassl_L_u"] + m["metassl_L_l"], rel=1e-6)
    assert m["stage"] == 2 and m["bcp#n_vox"] == pseudo.numel()
    # the supervised loss is BCP's ground-truth-region loss (same box, same teacher, same student)
    tr.box_generator.set_state(g_state)
    sup_b, _, _ = nnUNetTrainerBCP.compute_losses(tr, data, target, u)
    assert sup.item() == pytest.approx(sup_b.item(), rel=1e-6)
    # a training step updates the student and each tau set exactly once
    before, taus = state_copy(tr.student), _taus(tr)
    steps(tr, 1)
    assert max_abs_diff(before, state_copy(tr.student)) > 0
    assert all(tr.metassl.sets[k].num_updates.item() == n + 1 for k, (_, n) in taus.items())


def test_dataset_ignore_label_stays_out_of_the_labeled_term(dataset3d, tmp_path, monkeypatch):
    dj = json.loads((dataset3d["pre"] / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps({**dj, "labels": {**dj["labels"], "ignore": 3}}))
    shutil.copy(dataset3d["pre"] / "nnUNetPlans.json", tmp_path)
    tr = make_trainer(nnUNetTrainerMetaSSLBCP_sslTiny, {"pre": tmp_path}, "3d_fullres", fold=2)
    tr.initialize()  # the synthetic data have no ignore label: batches are fed by hand
    assert tr.region_ignore == tr.metassl_ignore_label == 3
    tr.current_epoch = 1
    calls = _spy_metassl(tr, monkeypatch)
    g = torch.Generator().manual_seed(0)
    patch = tr.configuration_manager.patch_size
    data, u = torch.randn(2, 1, *patch, generator=g), torch.randn(2, 1, *patch, generator=g)
    y = torch.randint(0, 3, (2, 1, *patch), generator=g).float()
    y[:, :, : patch[0] // 2] = 3
    mask = _next_box(tr, patch)
    sup, unsup, _ = tr.compute_losses(data, _ds_targets(tr, y), u)
    assert torch.isfinite(sup) and torch.isfinite(unsup)
    ann = y[:, 0] != 3
    r_lab = torch.stack([mask & ann[0], ~mask & ann[1]])
    s_l = calls["labeled_loss"][2][1]
    assert sum(int(s_l[f"n_{r}"]) for r in REGIONS) == int(r_lab.sum())
    s_u = calls["unlabeled_loss"][2][1]  # pseudo-labeled voxels have no dataset-ignore value: the whole R_pse
    assert sum(int(s_u[f"n_{r}"]) for r in REGIONS) == int((~mask).sum() + mask.sum())


def test_stage1_leaves_thresholds_alone_then_stage2_logs_diagnostics(dataset3d):
    tr = start(make_trainer(nnUNetTrainerMetaSSLBCP_sslTiny, dataset3d, "2d", fold=3))
    taus, before = _taus(tr), state_copy(tr.student)
    one_epoch(tr)  # epoch 0: BCP's labeled copy-paste only
    assert max_abs_diff(before, state_copy(tr.student)) > 0
    for name, (tau, n) in _taus(tr).items():
        assert n == 0 and torch.equal(tau, taus[name][0]) and torch.all(tau == 0.9)
    one_epoch(tr)  # epoch 1: stage 2
    rows = [json.loads(x) for x in open(os.path.join(tr.output_folder, DIAGNOSTICS_FILE))]
    assert [r["lambda"] for r in rows][0] == 0 and rows[0]["u_frac_US"] is None
    v = rows[1]
    total = tr.num_epochs * tr.num_iterations_per_epoch
    lam = [0.1 * math.exp(-5 * (1 - min(t / (0.6 * total), 1)) ** 2) for t in (3, 4, 5)]  # t = 3..5 of 6
    assert v["lambda"] == pytest.approx(sum(lam) / 3)
    assert sum(v[f"u_frac_{r}"] for r in REGIONS) == pytest.approx(1.0)
    assert sum(v[f"l_frac_{r}"] for r in REGIONS) == pytest.approx(1.0)
    assert sum(v[f"shadow_frac_{r}"] for r in REGIONS) == pytest.approx(1.0)
    assert v["u_fg_weight"] is None or v["u_fg_weight"] > 0
    assert v["metassl_L_u"] > 0 and v["metassl_L_l"] > 0
    assert all(tr.metassl.sets[k].num_updates.item() == 3 for k in ("ref_u", "sup_l"))
    assert "MetaSSL: lambda" in open(tr.log_file).read()


@pytest.mark.parametrize("stage", [1, 2])
def test_checkpoint_round_trip_restores_thresholds_and_teacher(dataset3d, tmp_path, stage):
    tr = start(make_trainer(nnUNetTrainerMetaSSLBCP_sslTiny, dataset3d, "3d_fullres", fold=0))
    tr.current_epoch = stage - 1
    steps(tr, 2)
    if stage == 2:
        assert max_abs_diff(state_copy(tr.teacher), state_copy(tr.student)) > 0
        assert any(not torch.all(s.tau == 0.9) for s in tr.metassl.sets.values())
    ckpt = tmp_path / f"s{stage}.pth"
    tr.save_checkpoint(str(ckpt))
    fresh = make_trainer(nnUNetTrainerMetaSSLBCP_sslTiny, dataset3d, "3d_fullres", fold=0)
    fresh.num_epochs = 4 if stage == 2 else 8  # E_pre = 1 or 2: the resumed epoch stays in the checkpoint's stage
    fresh.load_checkpoint(str(ckpt))
    assert fresh.current_epoch == stage and fresh.stage == stage and fresh.ssl_iteration == 2
    for name, s in tr.metassl.sets.items():
        torch.testing.assert_close(fresh.metassl.sets[name].tau, s.tau, rtol=0, atol=0)
        assert fresh.metassl.sets[name].num_updates.item() == (2 if stage == 2 else 0)
    assert_state_equal(state_copy(fresh.teacher), state_copy(tr.teacher))
    assert_state_equal(state_copy(fresh.student), state_copy(tr.student))
