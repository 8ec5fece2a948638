"""BCP trainer: copy-paste pre-training, the switch to the mean-teacher stage, region losses at every scale,
2D and 3D, a dataset with its own ignore label, diagnostics, checkpoints and resume in each stage, DDP."""
import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

from nnunet_ssl.algorithms.bcp import largest_component_per_class, random_box
from nnunet_ssl.trainers.nnUNetTrainerBCP import (nnUNetTrainerBCP, nnUNetTrainerBCP_noLCC,
                                                  nnUNetTrainerBCP_regionSplitPretrain, nnUNetTrainerBCP_sslTiny)

from ..conftest import make_trainer, run_cli
from .helpers import assert_state_equal, max_abs_diff, one_epoch, start, state_copy, steps


class _BCPTinyNoLCC(nnUNetTrainerBCP_sslTiny):
    pseudo_label_lcc = False


class _BCPTinyRegionSplit(nnUNetTrainerBCP_sslTiny):
    pretrain_region_split = True


def _next_box(tr, spatial):
    """The box the trainer's next step will draw (a copy of its generator)."""
    g = torch.Generator()
    g.set_state(tr.box_generator.get_state())
    return random_box(spatial, tr.box_fraction, g).mask()


def _record_inputs(tr):
    seen = {}
    tr.student.register_forward_hook(lambda m, i, o: seen.__setitem__("student", i[0].detach().clone()))
    tr.teacher.register_forward_hook(lambda m, i, o: seen.__setitem__("teacher", i[0].detach().clone()))
    return seen


def _ds_targets(tr, full: torch.Tensor):
    """nnU-Net's own deep-supervision labels of ``full`` ``(B, 1, *S)``."""
    ds = DownsampleSegForDSTransform(tr._get_deep_supervision_scales())
    return [torch.stack(s) for s in zip(*[ds(segmentation=full[b])["segmentation"] for b in range(full.shape[0])])]


def test_defaults_and_loss_objects(dataset3d):
    tr = make_trainer(nnUNetTrainerBCP, dataset3d, "3d_fullres", fold=0)
    tr.initialize()
    assert (tr.lambda_max, tr.rampup_fraction, tr.ema_decay, tr.ema_warmup) == (0.5, 0.0, 0.99, False)
    assert tr.pretrain_fraction == 0.25 and tr.pseudo_label_lcc and not tr.pretrain_region_split
    assert not tr.export_teacher and tr.unlabeled_batch_ratio == 1
    assert tr.pretrain_epochs == 250 and tr.num_epochs == 1000
    # no dataset ignore label: IGN = C, only in the region loss; nnU-Net's loss and label manager are untouched
    assert tr.label_manager.ignore_label is None and tr.region_ignore == 3
    assert tr.loss.loss.ignore_label is None
    assert tr.region_loss.loss.ignore_label == 3 and tr.region_loss.loss.ce.ignore_index == 3
    assert tr.region_loss.weight_factors == tr.loss.weight_factors
    assert tr.region_loss.loss.dc.batch_dice == tr.configuration_manager.batch_dice
    assert tr.region_loss.loss.dc.smooth == 1e-5 and not tr.region_loss.loss.dc.do_bg
    assert nnUNetTrainerBCP_noLCC.pseudo_label_lcc is False
    assert nnUNetTrainerBCP_regionSplitPretrain.pretrain_region_split is True


@pytest.mark.parametrize("cls", [nnUNetTrainerBCP_sslTiny, _BCPTinyRegionSplit])
def test_stage1_mixes_labeled_cases_and_uses_nnunets_loss(dataset3d, cls):
    tr = start(make_trainer(cls, dataset3d, "3d_fullres", fold=0))
    assert tr.pretrain_epochs == 1 and tr.stage == 1  # 2 epochs x 0.25 = 0.5, rounded up
    seen = _record_inputs(tr)
    batch = next(tr.dataloader_train)
    data, target = batch["data"], batch["target"]
    assert data.shape[0] == 2
    mask = _next_box(tr, data.shape[2:])
    with torch.no_grad():
        sup, unsup, m = tr.compute_losses(data, target, next(tr.dataloader_unlabeled)["data"])
        expected_x = torch.stack([torch.where(mask, data[1], data[0]), torch.where(mask, data[0], data[1])])
        assert torch.equal(seen["student"], expected_x) and "teacher" not in seen
        y = torch.stack([torch.where(mask, target[0][1], target[0][0]), torch.where(mask, target[0][0], target[0][1])])
        out = tr.network(expected_x)
        if tr.pretrain_region_split:
            ign = torch.tensor(3.0)
            inside, outside = torch.where(mask, y, ign), torch.where(mask, ign, y)
            ref = 0.5 * (tr.region_loss(out, _ds_targets(tr, inside)) + tr.region_loss(out, _ds_targets(tr, outside)))
        else:
            ref = tr.loss(out, _ds_targets(tr, y))
    assert sup.item() == pytest.approx(ref.item(), rel=1e-5) and unsup.item() == 0
    assert m["stage"] == 1 and m["box_frac"] == pytest.approx(mask.float().mean().item())
    assert tr.unsup_weight() == 0.0 and tr.unsup_weight(tr.num_iterations_per_epoch) == 0.5


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_stage2_bidirectional_region_losses_at_every_scale(dataset3d, configuration):
    tr = start(make_trainer(nnUNetTrainerBCP_sslTiny, dataset3d, configuration, fold=1))
    tr.current_epoch = 1
    assert tr.stage == 2
    tr.teacher.load_state_dict(tr.student.state_dict())
    seen = _record_inputs(tr)
    batch = next(tr.dataloader_train)
    data, target = batch["data"][:2], [t[:2] for t in batch["target"]]  # k = 2: one LU and one UL pair
    u = next(tr.dataloader_unlabeled)["data"]
    u = torch.cat([u, u])[:3]  # B_u = 3 > B_l: U_2 must stay unused
    mask = _next_box(tr, data.shape[2:])
    with torch.no_grad():
        sup, unsup, m = tr.compute_losses(data, target, u)
        assert torch.equal(seen["teacher"], u[:2])  # the clean unlabeled patches, never mixed ones
        pseudo, removed, _ = largest_component_per_class(tr.teacher(u[:2]).float().argmax(1))
        x_lu, x_ul = torch.where(mask, data[0], u[0]), torch.where(mask, u[1], data[1])
        assert torch.equal(seen["student"], torch.stack([x_lu, x_ul]))
        out = tr.network(torch.stack([x_lu, x_ul]))
        y_l, ign = target[0][:2, 0], torch.tensor(3.0)
        y_lu, y_ul = torch.where(mask, y_l[0], pseudo[0]), torch.where(mask, pseudo[1], y_l[1])
        r_lu, r_ul = mask, ~mask  # ground-truth regions
        lab = torch.stack([torch.where(r_lu, y_lu, ign), torch.where(r_ul, y_ul, ign)])[:, None]
        pse = torch.stack([torch.where(~r_lu, y_lu, ign), torch.where(~r_ul, y_ul, ign)])[:, None]
        per = [[o[i:i + 1] for o in out] for i in range(2)]
        lab_ds, pse_ds = _ds_targets(tr, lab), _ds_targets(tr, pse)
        ref_sup = 0.5 * sum(tr.region_loss(per[i], [t[i:i + 1] for t in lab_ds]) for i in range(2))
        ref_unsup = 0.5 * sum(tr.region_loss(per[i], [t[i:i + 1] for t in pse_ds]) for i in range(2))
    assert sup.item() == pytest.approx(ref_sup.item(), rel=1e-5)
    assert unsup.item() == pytest.approx(ref_unsup.item(), rel=1e-5)
    n = pseudo.numel()
    assert m["stage"] == 2 and m["bcp#n_vox"] == n and m["bcp#n_removed"] == removed
    assert sum(m[f"bcp#n_pl_{c}"] for c in range(3)) == n
    assert m["bcp#n_pl_0"] == int((pseudo == 0).sum())


def test_teacher_frozen_in_stage1_reset_at_switch_then_ema(dataset3d):
    tr = start(make_trainer(nnUNetTrainerBCP_sslTiny, dataset3d, "3d_fullres", fold=2))
    t0 = state_copy(tr.teacher)
    one_epoch(tr)  # epoch 0: stage 1
    assert max_abs_diff(t0, state_copy(tr.student)) > 0
    assert_state_equal(t0, state_copy(tr.teacher))  # no EMA step during pre-training
    tr.on_train_epoch_start()  # epoch 1 = E_pre
    s1 = state_copy(tr.student)
    assert_state_equal(s1, state_copy(tr.teacher))  # bitwise copy of the final stage-1 student
    assert "stage 2 (mean teacher) from epoch 1, teacher reset" in open(tr.log_file).read()
    pseudo, _ = tr.pseudo_labels(next(tr.dataloader_unlabeled)["data"])
    assert pseudo.dtype == torch.int64
    tr.train_step(next(tr.dataloader_train))
    s2, t2 = state_copy(tr.student), state_copy(tr.teacher)
    for k in t2:
        torch.testing.assert_close(t2[k], 0.99 * s1[k] + 0.01 * s2[k])
    assert all(p.grad is None for p in tr.teacher.parameters())


def test_epoch_diagnostics_in_jsonl(dataset3d):
    tr = start(make_trainer(nnUNetTrainerBCP_sslTiny, dataset3d, "3d_fullres", fold=3))
    one_epoch(tr)
    one_epoch(tr)
    rows = [json.loads(x) for x in open(os.path.join(tr.output_folder, "ssl_progress.jsonl"))]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[0]["stage"] == 1 and rows[0]["lambda"] == 0 and rows[0]["unsup_loss"] == 0
    assert rows[0]["pl_frac_1"] is None  # no pseudo-labels in stage 1
    assert rows[1]["stage"] == 2 and rows[1]["lambda"] == 0.5 and rows[1]["unsup_loss"] != 0  # CE - Dice: any sign
    patch = tr.configuration_manager.patch_size
    assert rows[1]["box_frac"] == pytest.approx(math.prod(2 * s // 3 for s in patch) / math.prod(patch))
    assert sum(rows[1][f"pl_frac_{c}"] for c in range(3)) == pytest.approx(1.0)
    # counts are turned into shares of all pseudo-labelled voxels of the epoch (3 steps x k = 2 patches)
    n_vox = 3 * 2 * math.prod(patch)
    assert rows[1]["pl_frac_0"] * n_vox == pytest.approx(round(rows[1]["pl_frac_0"] * n_vox), abs=1e-6)
    lcc = rows[1]["lcc_removed_frac"]
    assert lcc is None or 0 <= lcc <= 1  # None: the teacher predicted no foreground at all
    assert not any(k.startswith("bcp#") for k in rows[1])
    assert "stage 2" in open(tr.log_file).read()


def test_no_lcc_keeps_every_component(dataset3d, monkeypatch):
    tr = start(make_trainer(_BCPTinyNoLCC, dataset3d, "2d", fold=3))
    logits = torch.zeros(1, 3, *tr.configuration_manager.patch_size)
    logits[0, 1, 0, 0] = logits[0, 1, -1, -1] = 5.0  # two separate one-voxel components of class 1
    monkeypatch.setattr(tr, "teacher_logits", lambda x: logits)
    pseudo, counts = tr.pseudo_labels(torch.zeros(1, 1, *tr.configuration_manager.patch_size))
    assert int((pseudo == 1).sum()) == 2 and counts["bcp#n_removed"] == 0
    tr.pseudo_label_lcc = True
    pseudo, counts = tr.pseudo_labels(torch.zeros(1, 1, *tr.configuration_manager.patch_size))
    assert int((pseudo == 1).sum()) == 1 and counts["bcp#n_removed"] == 1


def test_checkpoint_and_resume_in_stage_2_keeps_the_teacher(dataset3d, tmp_path):
    tr = start(make_trainer(nnUNetTrainerBCP_sslTiny, dataset3d, "3d_fullres", fold=0))
    tr.current_epoch = 1
    steps(tr, 2)  # stage 2 (the teacher is reset at the epoch start, then lags behind the student)
    assert max_abs_diff(state_copy(tr.teacher), state_copy(tr.student)) > 0
    ckpt = tmp_path / "stage2.pth"
    tr.save_checkpoint(str(ckpt))
    saved = torch.load(ckpt, weights_only=False)
    assert_state_equal(saved["network_weights"], state_copy(tr.student))  # exports the student
    assert saved["current_epoch"] == 2
    fresh = make_trainer(nnUNetTrainerBCP_sslTiny, dataset3d, "3d_fullres", fold=0)
    fresh.num_epochs = 4  # room for an epoch after E_pre + 1 (E_pre stays round(0.25 * 4) = 1)
    fresh.load_checkpoint(str(ckpt))
    assert fresh.stage == 2 and fresh.ssl_iteration == 2 and fresh.unsup_weight() == 0.5
    t = state_copy(tr.teacher)
    assert_state_equal(state_copy(fresh.teacher), t)
    assert_state_equal(state_copy(fresh.student), state_copy(tr.student))
    fresh.on_train_start()
    fresh.on_train_epoch_start()
    assert_state_equal(state_copy(fresh.teacher), t)  # not re-copied from the student
    fresh.train_step(next(fresh.dataloader_train))
    s = state_copy(fresh.student)
    for k in t:
        torch.testing.assert_close(fresh.teacher.state_dict()[k], 0.99 * t[k] + 0.01 * s[k])


def test_resume_in_stage_1_then_switch(dataset3d, tmp_path):
    tr = start(make_trainer(nnUNetTrainerBCP_sslTiny, dataset3d, "3d_fullres", fold=1))
    tr.num_epochs, tr.save_every = 8, 1  # E_pre = 2; nnU-Net writes checkpoint_latest.pth after epoch 0
    t0 = state_copy(tr.teacher)
    one_epoch(tr)
    ckpt = os.path.join(tr.output_folder, "checkpoint_latest.pth")
    fresh = make_trainer(nnUNetTrainerBCP_sslTiny, dataset3d, "3d_fullres", fold=1)
    fresh.num_epochs = 8
    fresh.load_checkpoint(ckpt)
    assert fresh.current_epoch == 1 and fresh.stage == 1 and fresh.unsup_weight() == 0.0
    assert_state_equal(state_copy(fresh.teacher), t0)  # the initial copy, not fresh's own initialisation
    fresh.on_train_start()
    one_epoch(fresh)  # epoch 1: still stage 1
    assert_state_equal(state_copy(fresh.teacher), t0)
    assert fresh.current_epoch == 2 and fresh.stage == 2
    fresh.on_train_epoch_start()
    assert_state_equal(state_copy(fresh.teacher), state_copy(fresh.student))


def test_dataset_ignore_label_stays_ignored(dataset3d, monkeypatch):
    plans = json.loads((dataset3d["pre"] / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dj = json.loads((dataset3d["pre"] / "dataset.json").read_text())
    dj["labels"] = {**dj["labels"], "ignore": 3}
    tr = nnUNetTrainerBCP_sslTiny(plans, "3d_fullres", 2, dj, torch.device("cpu"))
    tr.initialize()  # the synthetic data were preprocessed without an ignore label: feed batches by hand
    assert tr.region_ignore == 3 and tr.loss.loss.ignore_label == 3 and tr.region_loss.loss.ignore_label == 3
    tr.current_epoch = 1
    g = torch.Generator().manual_seed(0)
    patch = tr.configuration_manager.patch_size
    data, u = torch.randn(2, 1, *patch, generator=g), torch.randn(2, 1, *patch, generator=g)
    y = torch.randint(0, 3, (2, 1, *patch), generator=g).float()
    y[:, :, : patch[0] // 2] = 3  # half of every labeled patch is unannotated
    y[1, :, -1] = 3
    seen = []
    real = tr.region_loss
    monkeypatch.setattr(tr, "region_loss", lambda out, tg: seen.append([x.clone() for x in tg]) or real(out, tg))
    mask = _next_box(tr, patch)
    sup, unsup, _ = tr.compute_losses(data, _ds_targets(tr, y), u)
    assert torch.isfinite(sup) and torch.isfinite(unsup)
    lab_lu, pse_lu, lab_ul, pse_ul = (s[0][0, 0] for s in seen)  # full resolution, one case per direction
    ann = y[:, 0] != 3  # k = 2: case 0 is the LU pair, case 1 the UL pair
    assert torch.equal(lab_lu != 3, mask & ann[0]) and torch.equal(lab_ul != 3, ~mask & ann[1])
    assert torch.equal(lab_lu[mask & ann[0]], y[0, 0][mask & ann[0]])
    assert torch.equal(pse_lu != 3, ~mask) and torch.equal(pse_ul != 3, mask)  # pseudo-labels cover their region
    assert all(len(s) == len(tr.loss.weight_factors) for s in seen)  # every deep-supervision scale


@pytest.mark.slow
def test_cli_train_runs_both_stages(dataset3d):
    run_cli(["nnUNetv2_train", str(dataset3d["id"]), "2d", "0", "-tr", "nnUNetTrainerBCP_sslTiny", "-device", "cpu"],
            timeout=900)
    folder = dataset3d["results"] / "nnUNetTrainerBCP_sslTiny__nnUNetPlans__2d" / "fold_0"
    rows = [json.loads(x) for x in open(folder / "ssl_progress.jsonl")]
    assert [r["stage"] for r in rows] == [1, 2] and [r["lambda"] for r in rows] == [0, 0.5]
    ckpt = torch.load(folder / "checkpoint_final.pth", weights_only=False)
    assert ckpt["ssl_state"]["ssl_iteration"] == 6 and ckpt["trainer_name"] == "nnUNetTrainerBCP_sslTiny"
    assert (folder / "validation" / "summary.json").is_file()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_stage2(rank, port, env, out):
    os.environ.update(env)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from pathlib import Path

        from tests.conftest import make_trainer as mk

        tr = mk(nnUNetTrainerBCP_sslTiny, {"pre": Path(env["nnUNet_preprocessed"]) / "Dataset990_SSLSynthetic"},
                "3d_fullres", fold=4)
        tr.pretrain_fraction = 0.0  # the mean-teacher stage from the first step
        tr.on_train_start()
        boxes = [_next_box(tr, tr.configuration_manager.patch_size)]
        tr.on_epoch_start()
        tr.on_train_epoch_start()
        outs = [tr.train_step(next(tr.dataloader_train)) for _ in range(2)]
        tr.on_train_epoch_end(outs)
        torch.save({"student": tr.student.state_dict(), "teacher": tr.teacher.state_dict(), "box": boxes[0],
                    "seed": tr.box_generator.initial_seed(),
                    "log": {k: v[-1] for k, v in tr.ssl_log.values.items()}}, os.path.join(out, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_stage2_ranks_agree_with_their_own_boxes(dataset3d, tmp_path):
    env = {k: v for k, v in os.environ.items() if k.startswith("nnUNet")}
    mp.spawn(_rank_stage2, args=(_free_port(), env, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in (0, 1))
    for part in ("student", "teacher"):
        for k in r0[part]:
            torch.testing.assert_close(r0[part][k], r1[part][k], rtol=0, atol=0, msg=f"{part}.{k} differs")
    assert r0["seed"] != r1["seed"] and not torch.equal(r0["box"], r1["box"])  # each rank draws its own box
    assert r0["log"] == r1["log"] and r0["log"]["stage"] == 2  # epoch metrics are all-reduced
    assert sum(r0["log"][f"pl_frac_{c}"] for c in range(3)) == pytest.approx(1.0)
