"""ACTION / ACTION++ trainers (specs/action.md section 9, items 13-16, plus stage-wise training and the CLI)."""
import json
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_ssl.algorithms.contrastive.point_gather import FeatureCapture
from nnunet_ssl.algorithms.contrastive.distillation import similarity_kl
from nnunet_ssl.trainers.nnUNetTrainerACTION import (checkpointed_row_mean, feature_channels, feature_modules,
                                                     nnUNetTrainerACTION, nnUNetTrainerACTION_sslTiny,
                                                     nnUNetTrainerACTIONPlusPlus_sslTiny)
from nnunet_ssl.trainers.nnUNetTrainerSSL import SSLConfigurationError

from ..conftest import make_trainer, run_cli
from .helpers import assert_state_equal, max_abs_diff, start, state_copy

HEADS = ("g", "q", "h_l", "r_l", "rho")


class _ActionDense2d(nnUNetTrainerACTION_sslTiny):
    anco_head_mode = "dense"


class _ActionOtherStages(nnUNetTrainerACTION_sslTiny):
    stage_fractions = (0.5, 0.25, 0.25)


def _budget(tr, epochs: int, iters: int = 1):
    tr.num_epochs, tr.num_iterations_per_epoch = epochs, iters
    return tr


def _run_epoch(tr, n_steps: int) -> None:
    """One training epoch without validation (what run_training does before validating)."""
    tr.on_train_epoch_start()
    outs = [tr.train_step(next(tr.dataloader_train)) for _ in range(n_steps)]
    tr.on_train_epoch_end(outs)
    tr.current_epoch += 1


def _logged(tr) -> dict:
    return {k: v[-1] for k, v in tr.ssl_log.values.items()}


def _net_params(net, part: str) -> dict:
    """Parameters of the encoder or of the decoder proper (``decoder.encoder`` is a reference to the encoder)."""
    return {k: p for k, p in net.named_parameters() if k.startswith("encoder.") == (part == "encoder")}


def _groups(tr) -> dict:
    out = {part: {k: p.detach().clone() for k, p in _net_params(tr.student, part).items()}
           for part in ("encoder", "decoder")}
    out.update({h: state_copy(tr.ssl_modules[h]) for h in HEADS})
    return out


def test_checkpointed_chunks_equal_the_unchunked_kl_and_gradient():
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.functional.normalize
    s = norm(torch.randn(37, 8, generator=g), dim=1).requires_grad_(True)
    t = norm(torch.randn(37, 8, generator=g), dim=1)
    bank = norm(torch.randn(50, 8, generator=g), dim=1)
    valid = torch.arange(50) < 41  # a partly filled queue

    def fn(a, b):
        return similarity_kl(a, b, bank, valid, 0.1, 0.01, return_stats=True)

    ref, ref_st = fn(s, t)
    (ref_grad,) = torch.autograd.grad(ref, s)
    loss, st = checkpointed_row_mean(fn, (s, t), chunk=8)  # 5 chunks, the last one of 5 rows
    (grad,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    torch.testing.assert_close(st["entropy_s"], ref_st["entropy_s"])


# ------------------------------------------------------------------------------------------------ 13: stages
def test_stage_map_per_stage_poly_lr_and_idempotent_boundaries(dataset3d):
    tr = _budget(make_trainer(nnUNetTrainerACTION_sslTiny, dataset3d, "3d_fullres", fold=0), 8)
    tr.initialize()
    assert tr.stage_bounds() == (2, 4)
    assert [tr.stage_of_epoch(e) for e in range(8)] == [1, 1, 2, 2, 3, 3, 3, 3]
    assert len(tr.optimizer.param_groups) == 6  # [network, g, q, h_l, r_l, rho] in every stage
    lrs = []
    for e in range(8):
        tr.lr_scheduler.step(e)
        assert len({g["lr"] for g in tr.optimizer.param_groups}) == 1  # heads follow the network's lr
        lrs.append(tr.optimizer.param_groups[0]["lr"])
    expect = [1e-2 * (1 - k / n) ** 0.9 for n in (2, 2, 4) for k in range(n)]
    np.testing.assert_allclose(lrs, expect, rtol=1e-12)
    assert lrs[0] == lrs[2] == lrs[4] == 1e-2  # lr0 at E_1 and E_2
    # the sslTiny budget (2 epochs): halves round up, stage i then stage iii
    assert _budget(make_trainer(nnUNetTrainerACTION_sslTiny, dataset3d, "3d_fullres", 0), 2).stage_bounds() == (1, 1)

    # requires_grad per stage
    for stage_epoch, (enc, dec, heads) in {0: (True, False, {"g", "q"}), 2: (True, True, {"g", "q", "h_l", "r_l"}),
                                           4: (True, True, {"rho"})}.items():
        tr.apply_stage(stage_epoch)
        assert all(p.requires_grad == enc for p in _net_params(tr.student, "encoder").values())
        assert all(p.requires_grad == dec for p in _net_params(tr.student, "decoder").values())
        for h in HEADS:
            assert all(p.requires_grad == (h in heads) for p in tr.ssl_modules[h].parameters()), h

    def disturb():
        p0 = next(tr.student.parameters())
        tr.optimizer.state[p0]["momentum_buffer"] = torch.ones_like(p0)
        with torch.no_grad():
            next(tr.teacher.parameters()).add_(1.0)
            next(tr.ssl_modules["g_teacher"].parameters()).add_(1.0)
        tr._best_ema = 0.5

    disturb()
    tr.apply_stage(2)  # E_1: optimizer state cleared, teacher and best EMA kept
    assert len(tr.optimizer.state) == 0 and tr._best_ema == 0.5
    assert max_abs_diff(state_copy(tr.teacher), state_copy(tr.student)) > 0.5
    tr.apply_stage(3)  # inside stage ii: nothing happens
    assert tr._best_ema == 0.5
    disturb()
    tr.apply_stage(4)  # E_2: teacher (network + heads) := student, best EMA reset
    once = (state_copy(tr.teacher), state_copy(tr.ssl_modules), dict(tr.optimizer.state), tr._best_ema)
    assert_state_equal(once[0], state_copy(tr.student))
    assert_state_equal(state_copy(tr.ssl_modules["g_teacher"]), state_copy(tr.ssl_modules["g"]))
    assert once[2] == {} and once[3] is None
    tr.apply_stage(4)  # idempotent
    assert_state_equal(state_copy(tr.teacher), once[0])
    assert_state_equal(state_copy(tr.ssl_modules), once[1])
    assert dict(tr.optimizer.state) == {} and tr._best_ema is None


def test_ats_temperatures_follow_the_iteration_clock_of_each_stage(dataset3d):
    pp = _budget(make_trainer(nnUNetTrainerACTIONPlusPlus_sslTiny, dataset3d, "3d_fullres", fold=0), 8, 4)
    fixed = _budget(make_trainer(nnUNetTrainerACTION_sslTiny, dataset3d, "3d_fullres", fold=0), 8, 4)

    def at(tr, epoch, step, name):
        tr.current_epoch, tr._step_in_epoch = epoch, step
        return tr.temperature(name)

    # stage iii spans epochs 4-7, T_s = 16 iterations: tau(0) = tau+, tau(T/2) = tau-, tau(T/4) = mean
    assert at(pp, 4, 0, "tau_an") == pytest.approx(1.0) and at(pp, 6, 0, "tau_an") == pytest.approx(0.1)
    assert at(pp, 5, 0, "tau_sa") == pytest.approx(0.55) and at(pp, 7, 3, "tau_sa") < 1.0
    # stage ii (epochs 2-3, T_s = 8): its own clock, tau_t in [0.01, 1]
    assert at(pp, 2, 0, "tau_t") == pytest.approx(1.0) and at(pp, 3, 0, "tau_t") == pytest.approx(0.01)
    assert at(pp, 0, 2, "tau_s") == pytest.approx(0.55)  # stage i: T_s = 8, t = 2 = T/4
    # ACTION: fixed temperatures
    assert [at(fixed, 6, 0, n) for n in ("tau_s", "tau_t", "tau_an")] == [0.1, 0.01, 0.5]


# ------------------------------------------------------------------------------------------------ 15: hooks
@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_hooks_capture_decoder_stages_only_in_the_student(dataset3d, configuration):
    tr = make_trainer(nnUNetTrainerACTIONPlusPlus_sslTiny, dataset3d, configuration, fold=0)
    tr.initialize()
    net = tr.student
    x = torch.randn(2, tr.num_input_channels, *tr.configuration_manager.patch_size)
    with torch.no_grad():
        skips = net.encoder(x)
        expected = [tuple(skips[-1].shape)] + [tuple(skips[-(k + 2)].shape) for k in range(len(net.decoder.stages))]
        tr.capture.active = True
        net(x)
    feats = tr.capture.features()
    assert [tuple(f.shape) for f in feats] == expected
    assert [f.shape[1] for f in feats] == feature_channels(net)
    assert tuple(feats[-1].shape[2:]) == tuple(tr.configuration_manager.patch_size)  # last stage: full resolution
    tr.capture.clear()
    assert len(tr.capture) == 0
    # one hook per watched module on the student; the teacher carries only its own (ACTION++ SAACL) capture
    assert [len(m._forward_hooks) for m in feature_modules(net)] == [1] * len(expected)
    assert [len(m._forward_hooks) for m in feature_modules(tr.teacher)] == [1] * len(expected)
    assert sum(len(m._forward_hooks) for m in tr.teacher.modules()) == len(expected)
    with torch.no_grad():
        tr.teacher(x)
        tr.capture.active = False
        net(x)  # validation / inference forwards record nothing
    assert len(tr.capture) == 0 and len(tr.teacher_capture) == 0
    plain = make_trainer(nnUNetTrainerACTION_sslTiny, dataset3d, configuration, fold=0)
    plain.initialize()
    assert sum(len(m._forward_hooks) for m in plain.teacher.modules()) == 0  # ACTION: teacher not hooked


def test_hooks_on_residual_encoder_unet_3d():
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    net = ResidualEncoderUNet(1, 4, (8, 16, 32, 32), torch.nn.Conv3d, 3, ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
                              (1, 1, 2, 2), 3, (1, 1, 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                              nonlin=torch.nn.LeakyReLU, deep_supervision=True)
    x = torch.randn(1, 1, 8, 16, 16)
    with FeatureCapture(feature_modules(net)) as cap, torch.no_grad():
        net(x)
        shapes = [tuple(f.shape) for f in cap.features()]
    assert shapes == [(1, 32, 2, 2, 2), (1, 32, 4, 4, 4), (1, 16, 8, 8, 8), (1, 8, 8, 16, 16)]
    assert feature_channels(net) == [32, 32, 16, 8]


# ------------------------------------------------------------------------------------------------ 14: EMA
def test_one_ema_update_per_step_and_no_teacher_gradient(dataset3d):
    tr = start(_budget(make_trainer(nnUNetTrainerACTION_sslTiny, dataset3d, "3d_fullres", fold=1), 4))
    tr.current_epoch = 1  # stage ii: network and heads g, h_l all train
    tr.on_train_epoch_start()
    assert tr.stage == 2 and tr.ema.decay_at(0) == tr.ema.decay_at(10 ** 6) == 0.99  # constant, no warm-up
    # At the first step of a stage the queues are empty, so both distillation losses are 0 and the heads move by
    # weight decay alone (~1e-9 in the teacher): whether float32 even registers that depends on the random init,
    # which made this test fail in the full suite only. One step fills the queues; the next one is measured.
    tr.train_step(next(tr.dataloader_train))
    assert tr.ssl_modules["queue_loc"].fill_fraction > 0 and tr.ssl_modules["queue_glob"].fill_fraction > 0
    t0 = {"net": state_copy(tr.teacher), "g": state_copy(tr.ssl_modules["g_teacher"]),
          "h_l": state_copy(tr.ssl_modules["h_l_teacher"])}
    tr.train_step(next(tr.dataloader_train))
    assert tr.ssl_iteration == 2
    s1 = {"net": state_copy(tr.student), "g": state_copy(tr.ssl_modules["g"]), "h_l": state_copy(tr.ssl_modules["h_l"])}
    t1 = {"net": state_copy(tr.teacher), "g": state_copy(tr.ssl_modules["g_teacher"]),
          "h_l": state_copy(tr.ssl_modules["h_l_teacher"])}
    for part in t1:
        assert max_abs_diff(t0[part], t1[part]) > 0
        for k in t1[part]:
            torch.testing.assert_close(t1[part][k], 0.99 * t0[part][k] + 0.01 * s1[part][k], rtol=1e-6, atol=1e-7)
    for mod in (tr.teacher, tr.ssl_modules["g_teacher"], tr.ssl_modules["h_l_teacher"]):
        assert all(not p.requires_grad and p.grad is None for p in mod.parameters())
    assert len(tr.capture) == 0 and not tr.capture.active  # store cleared after the step


# ------------------------------------------------------------------------------------------------ each stage
@pytest.mark.parametrize("cls,configuration", [(nnUNetTrainerACTION_sslTiny, "3d_fullres"),
                                               (nnUNetTrainerACTIONPlusPlus_sslTiny, "3d_fullres"),
                                               (_ActionDense2d, "2d")])
def test_each_stage_trains_exactly_its_parameters(dataset3d, cls, configuration):
    tr = start(_budget(make_trainer(cls, dataset3d, configuration, fold=2), 3, 2))
    assert [tr.stage_of_epoch(e) for e in range(3)] == [1, 2, 3]
    b = tr.batch_size + tr.unlabeled_batch_size
    trained = {1: {"encoder", "g", "q"}, 2: {"encoder", "decoder", "g", "q", "h_l", "r_l"},
               3: {"encoder", "decoder", "rho"}}
    for epoch in range(3):
        before = _groups(tr)
        _run_epoch(tr, 2)
        after = _groups(tr)
        changed = {k for k in before if max_abs_diff(before[k], after[k]) > 0}
        assert changed == trained[epoch + 1], (epoch, changed)
        v = _logged(tr)
        assert v["action_stage"] == epoch + 1 and np.isfinite(v["loss_total"])
        if epoch == 0:
            assert v["queue_fill_glob"] == pytest.approx((b + 2 * b) / 2 / 36)  # mean over 2 steps of b, 2b rows
            assert v["loss_glob"] >= 0 and np.isnan(v["loss_loc"]) and np.isnan(v["loss_anco"])
            assert v["glob_entropy_t"] >= 0  # only the second step had anchors
        if epoch == 1:
            assert v["loss_loc"] >= 0 and v["loss_glob"] >= 0 and v["loss_sup"] > 0 and np.isnan(v["loss_unsup"])
            assert tr.ssl_modules["queue_loc"].fill == 2 * b * 7 ** tr.ndim
        if epoch == 2:
            assert np.isnan(v["loss_glob"]) and v["loss_unsup"] >= 0 and v["w_anco"] == 0.01
            assert 0 <= v["pl_weight"] <= 1 and 0 <= v["pl_conf_frac"] <= 1 and v["mix_skipped"] == 0
            assert sum(v[f"pl_class_frac_c{c}"] for c in range(3)) == pytest.approx(1.0)
            assert 2 <= v["anco_num_classes"] <= 3 and v["anco_present_c0"] == 1.0
            assert v["loss_anco"] > 0 and -1 <= v["anco_cos_pos_c0"] <= 1
    # the teacher was set to the student at E_2 and then moved by EMA only
    assert tr._best_ema is None
    if tr.use_saacl:
        v = _logged(tr)
        assert v["loss_saacl"] > 0 and 0.1 <= v["tau_an"] <= 1.0 and v["tau_sa"] == v["tau_an"]
        q = tr.ssl_modules["queue_saacl"]
        assert int(q.fill) == int((q.labels >= 0).sum()) > 0  # one step's rows per present class, no padding
        assert sorted(tr.ssl_modules["centres"].perm.tolist()) == [0, 1, 2]
        assert np.isfinite(v["saacl_alignment"])


# ------------------------------------------------------------------------------------------------ 16: checkpoint
def test_checkpoint_keys_and_resume_in_the_middle_of_stage_ii(dataset3d, tmp_path):
    tr = start(_budget(make_trainer(nnUNetTrainerACTION_sslTiny, dataset3d, "3d_fullres", fold=3), 8))
    for _ in range(3):  # epochs 0, 1 (stage i) and 2 (first epoch of stage ii)
        _run_epoch(tr, 1)
    tr.current_epoch -= 1  # as nnU-Net's on_epoch_end: save, then count the epoch
    ckpt = tmp_path / "latest.pth"
    tr.save_checkpoint(str(ckpt))
    tr.current_epoch += 1
    saved = torch.load(ckpt, weights_only=False)

    stock = tr.build_network_architecture(tr.plans_manager, tr.configuration_manager, tr.num_input_channels,
                                          tr.label_manager.num_segmentation_heads, True)
    assert list(saved["network_weights"].keys()) == list(stock.state_dict().keys())  # no heads, no hooks
    ssl = saved["ssl_state"]
    assert ssl["teacher_weights"].keys() == stock.state_dict().keys()
    prefixes = {k.split(".")[0] for k in ssl["ssl_modules"]}
    assert prefixes == {"g", "q", "h_l", "r_l", "rho", "g_teacher", "h_l_teacher", "queue_glob", "queue_loc"}
    assert ssl["method_state"]["action_config"]["stage_fractions"] == [0.25, 0.25, 0.5]
    assert len(saved["optimizer_state"]["param_groups"]) == 6

    fresh = _budget(make_trainer(nnUNetTrainerACTION_sslTiny, dataset3d, "3d_fullres", fold=3), 8)
    fresh.load_checkpoint(str(ckpt))
    assert fresh.current_epoch == 3 and fresh.stage == 2 and fresh.ssl_iteration == 3
    assert_state_equal(state_copy(fresh.student), state_copy(tr.student))
    assert_state_equal(state_copy(fresh.teacher), state_copy(tr.teacher))
    assert_state_equal(state_copy(fresh.ssl_modules), state_copy(tr.ssl_modules))  # heads, queues, pointers
    assert int(fresh.ssl_modules["queue_glob"].fill) == int(tr.ssl_modules["queue_glob"].fill) > 0
    o1, o2 = tr.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert o1["state"].keys() == o2["state"].keys() and len(o1["state"]) > 0
    for pid in o1["state"]:
        torch.testing.assert_close(o1["state"][pid]["momentum_buffer"], o2["state"][pid]["momentum_buffer"],
                                   rtol=0, atol=0)
    fresh.on_train_epoch_start()  # epoch 3 is no boundary: momentum kept, lr continues stage ii's poly
    assert len(fresh.optimizer.state) == len(o1["state"])
    assert fresh.optimizer.param_groups[5]["lr"] == pytest.approx(1e-2 * 0.5 ** 0.9)

    other = _budget(make_trainer(_ActionOtherStages, dataset3d, "3d_fullres", fold=3), 8)
    with pytest.raises(SSLConfigurationError, match="stage_fractions"):
        other.load_checkpoint(str(ckpt))


# ------------------------------------------------------------------------------------------------ DDP (gloo)
def _ddp_sync_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    heads = torch.nn.ModuleDict({h: torch.nn.Linear(2, 2) for h in HEADS})
    student = torch.nn.Module()
    student.encoder = torch.nn.Linear(2, 2)
    for h in ("g", "q"):
        for p in heads[h].parameters():
            p.grad = torch.full_like(p, float(rank + 1))      # ranks 1 and 2 -> mean 1.5
    for p in heads["rho"].parameters():
        p.grad = torch.full_like(p, 4.0) if rank == 1 else None  # None on rank 0 counts as zeros -> 2
    heads["h_l"].weight.requires_grad_(False)                 # inactive: never synchronised
    heads["h_l"].weight.grad = torch.full_like(heads["h_l"].weight, 7.0 + rank)
    for p in student.encoder.parameters():
        p.grad = torch.full_like(p, 2.0 * rank)               # stage i: the unwrapped encoder -> mean 1
    nnUNetTrainerACTION.before_optimizer_step(SimpleNamespace(ssl_modules=heads, student=student, stage=1))
    torch.save({k: (v.grad.clone() if v.grad is not None else None) for k, v in
                [*heads.named_parameters(), *student.named_parameters()]}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_gradient_sync_of_heads_and_stage_i_encoder(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_sync_worker, args=(2, port, str(tmp_path)), nprocs=2)
    grads = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for k in grads[0]:
        if k != "h_l.weight" and (grads[0][k] is not None or grads[1][k] is not None):
            torch.testing.assert_close(grads[0][k], grads[1][k])  # identical updates on every rank
    g = grads[0]
    assert float(g["g.weight"].unique()) == float(g["q.bias"].unique()) == 1.5
    assert float(g["rho.weight"].unique()) == 2.0 and float(g["encoder.bias"].unique()) == 1.0
    assert g["r_l.weight"] is None and grads[1]["r_l.weight"] is None  # no rank had one: SGD keeps skipping it
    assert float(g["h_l.weight"].unique()) == 7.0 and float(grads[1]["h_l.weight"].unique()) == 8.0


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_cli_train_and_stock_predict(dataset3d, tmp_path):
    tr_name = "nnUNetTrainerACTION_sslTiny"
    run_cli(["nnUNetv2_train", str(dataset3d["id"]), "3d_fullres", "0", "-tr", tr_name, "-device", "cpu"],
            timeout=900)
    folder = dataset3d["results"] / f"{tr_name}__nnUNetPlans__3d_fullres" / "fold_0"
    rows = [json.loads(x) for x in open(folder / "ssl_progress.jsonl")]
    assert [r["action_stage"] for r in rows] == [1, 3]  # 2 epochs: stage i, then stage iii
    assert rows[0]["loss_glob"] is not None and rows[0]["loss_anco"] is None
    assert rows[1]["loss_anco"] is not None and rows[1]["loss_glob"] is None
    assert (folder / "progress_ssl.png").stat().st_size > 1000
    ckpt = torch.load(folder / "checkpoint_final.pth", weights_only=False)
    assert ckpt["ssl_state"]["ssl_iteration"] == 6 and ckpt["trainer_name"] == tr_name
    assert (folder / "validation" / "summary.json").is_file()
    out = tmp_path / "pred"
    run_cli(["nnUNetv2_predict", "-i", str(dataset3d["raw"] / "imagesTs"), "-o", str(out), "-d",
             str(dataset3d["id"]), "-c", "3d_fullres", "-tr", tr_name, "-f", "0", "-device", "cpu",
             "--disable_tta"], timeout=900)
    images = sorted((dataset3d["raw"] / "imagesTs").glob("*.nii.gz"))
    preds = sorted(out.glob("*.nii.gz"))
    assert [p.name for p in preds] == [i.name.replace("_0000", "") for i in images]
    for img, p in zip(images, preds):
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
        assert pred.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(img))).shape
        assert set(np.unique(pred)) <= {0, 1, 2}
