"""CPS trainer: two differently initialised networks, symmetric cross supervision, checkpoints, export."""
import pytest
import torch
import torch.nn.functional as F

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ssl.algorithms.losses.pseudo_label_ce import cross_pseudo_supervision
from nnunet_ssl.trainers.nnUNetTrainerCPS import nnUNetTrainerCPS_sslTiny

from ..conftest import make_trainer
from .helpers import assert_state_equal, max_abs_diff, one_epoch, start, state_copy, steps


class _CPSExportNet2Tiny(nnUNetTrainerCPS_sslTiny):
    export_network = 2


def _assert_optimizer_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys() and len(sa["state"]) > 0
    for pid in sa["state"]:
        torch.testing.assert_close(sa["state"][pid]["momentum_buffer"], sb["state"][pid]["momentum_buffer"],
                                   rtol=0, atol=0)
    assert [g["lr"] for g in sa["param_groups"]] == [g["lr"] for g in sb["param_groups"]]


def test_cross_pseudo_supervision_is_symmetric_with_one_way_gradients():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    z2 = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    l1, l2 = cross_pseudo_supervision(z1, z2)
    s2, s1 = cross_pseudo_supervision(z2, z1)
    assert l1.item() == s1.item() and l2.item() == s2.item()  # swapping the networks swaps the losses exactly
    assert l1.item() == pytest.approx(F.cross_entropy(z1, z2.argmax(1)).item())
    assert l2.item() == pytest.approx(F.cross_entropy(z2, z1.argmax(1)).item())
    l1.backward()
    assert z2.grad is None and z1.grad.abs().sum() > 0  # the target is detached
    # fp16 inputs: the loss is computed in float32 on the upcast values
    h1, h2 = cross_pseudo_supervision(z1.detach().half(), z2.detach().half())
    assert h1.dtype == torch.float32
    ref = F.cross_entropy(z1.detach().half().float(), z2.detach().half().float().argmax(1))
    assert h1.item() == pytest.approx(ref.item(), rel=1e-6)


def test_networks_start_different_and_both_train(dataset3d):
    tr = start(make_trainer(nnUNetTrainerCPS_sslTiny, dataset3d, "3d_fullres", fold=0))
    n1, n2 = state_copy(tr.student), state_copy(tr.net2)
    assert n1.keys() == n2.keys() and max_abs_diff(n1, n2) > 1e-3
    assert tr.net2 is not tr.student and tr.net2.decoder.deep_supervision
    (opt2, sched2, _), = tr.extra_optimizers
    assert isinstance(opt2, torch.optim.SGD) and opt2.defaults["nesterov"] and opt2.defaults["momentum"] == 0.99
    assert {id(p) for g in opt2.param_groups for p in g["params"]} == {id(p) for p in tr.net2.parameters()}
    one_epoch(tr)
    assert max_abs_diff(n1, state_copy(tr.student)) > 0 and max_abs_diff(n2, state_copy(tr.net2)) > 0
    assert opt2.param_groups[0]["lr"] == pytest.approx(tr.optimizer.param_groups[0]["lr"])  # same PolyLR
    v = {k: s[-1] for k, s in tr.ssl_log.values.items()}
    assert 0.0 <= v["agreement"] <= 1.0 and "cps_n_vox" not in v
    assert v["sup_loss"] == pytest.approx(v["sup_loss_1"] + v["sup_loss_2"])
    assert v["unsup_loss"] == pytest.approx(v["cps_loss_1"] + v["cps_loss_2"])


def test_identical_networks_give_equal_losses_and_full_agreement(dataset3d):
    tr = make_trainer(nnUNetTrainerCPS_sslTiny, dataset3d, "3d_fullres", fold=1)
    tr.initialize()
    tr.net2.load_state_dict(tr.student.state_dict())
    data = torch.randn(2, 1, *tr.configuration_manager.patch_size)
    u = torch.randn(2, 1, *tr.configuration_manager.patch_size)
    with torch.no_grad():
        out = tr.network(data)
        target = [o.argmax(1, keepdim=True).float() for o in out]  # any valid deep-supervision target
        q = F.softmax(tr.network(u)[0], 1).max(1).values
        sup, unsup, m = tr.compute_losses(data, target, u)
    assert m["sup_loss_1"] == pytest.approx(m["sup_loss_2"], rel=1e-5)
    assert m["cps_loss_1"] == pytest.approx(m["cps_loss_2"], rel=1e-5)
    assert m["cps_loss_1"] == pytest.approx(float(-q.log().mean()), rel=1e-4)
    assert m["cps_n_agree"] == m["cps_n_vox"] == u.numel()
    assert unsup.item() == pytest.approx(m["cps_loss_1"] + m["cps_loss_2"], rel=1e-6)


def test_checkpoint_round_trip_restores_both_networks_and_optimizers(dataset3d, tmp_path):
    tr = start(make_trainer(nnUNetTrainerCPS_sslTiny, dataset3d, "3d_fullres", fold=2))
    steps(tr, 2)
    ckpt = tmp_path / "cps.pth"
    tr.save_checkpoint(str(ckpt))
    saved = torch.load(ckpt, weights_only=False)
    assert_state_equal(saved["network_weights"], state_copy(tr.student))  # export_network = 1
    fresh = make_trainer(nnUNetTrainerCPS_sslTiny, dataset3d, "3d_fullres", fold=2)
    fresh.load_checkpoint(str(ckpt))
    assert_state_equal(state_copy(fresh.student), state_copy(tr.student))
    assert_state_equal(state_copy(fresh.net2), state_copy(tr.net2))
    _assert_optimizer_equal(fresh.optimizer, tr.optimizer)
    _assert_optimizer_equal(fresh.extra_optimizers[0][0], tr.extra_optimizers[0][0])
    assert fresh.ssl_iteration == 2


def test_export_network_2(dataset3d, tmp_path, monkeypatch):
    tr = start(make_trainer(_CPSExportNet2Tiny, dataset3d, "3d_fullres", fold=3))
    steps(tr, 1)
    ckpt = tmp_path / "net2.pth"
    tr.save_checkpoint(str(ckpt))
    assert not list(tmp_path.glob("*.tmp-*"))
    saved = torch.load(ckpt, weights_only=False)
    assert_state_equal(saved["network_weights"], state_copy(tr.net2))
    assert max_abs_diff(saved["network_weights"], state_copy(tr.student)) > 0
    fresh = make_trainer(_CPSExportNet2Tiny, dataset3d, "3d_fullres", fold=3)
    fresh.load_checkpoint(str(ckpt))
    assert_state_equal(state_copy(fresh.student), state_copy(tr.student))  # --c resumes network 1 as network 1
    assert_state_equal(state_copy(fresh.net2), state_copy(tr.net2))
    # the exported weights are a plain nnU-Net network of the plans' architecture (nnUNetv2_predict loads them)
    plain = fresh.build_network_architecture(fresh.plans_manager, fresh.configuration_manager,
                                             fresh.num_input_channels, 3, False)
    plain.load_state_dict(saved["network_weights"])
    # `--val` after loading: the validation scores network 2, not the restored network 1
    scored = {}
    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation",
                        lambda self, save_probabilities=False: scored.update(state_copy(self.student)))
    student_before = state_copy(fresh.student)
    fresh.perform_actual_validation()
    assert_state_equal(scored, state_copy(tr.net2))
    assert_state_equal(state_copy(fresh.student), student_before)  # network 1 is back afterwards
    # the final checkpoint exports network 2 as well
    tr.current_epoch = 1
    tr.on_train_end()
    final = torch.load(tr.output_folder + "/checkpoint_final.pth", weights_only=False)
    assert_state_equal(final["network_weights"], state_copy(tr.net2))
