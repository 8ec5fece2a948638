"""FixMatch trainer: shared geometry of weak/strong views, the confidence-masked CE, mask-ratio logging."""
import json
import math

import pytest
import torch

from nnunet_ssl.algorithms.augment import StrongView
from nnunet_ssl.algorithms.losses.pseudo_label_ce import masked_pseudo_label_ce, pseudo_label_counts
from nnunet_ssl.algorithms.metassl import softmax_stats
from nnunet_ssl.algorithms.mixing import ClassMix, CutMix, partner
from nnunet_ssl.trainers.nnUNetTrainerFixMatch import fixmatch_ratios, nnUNetTrainerFixMatch_sslTiny

from ..conftest import make_trainer
from .helpers import max_abs_diff, one_epoch, start, state_copy

# hand-made example: one case of 2 x 3 voxels, 3 classes, threshold 0.95 (>=)
LABELS = torch.tensor([[[0, 1, 1], [2, 0, 1]]])
CONF = torch.tensor([[[0.99, 0.96, 0.50], [0.95, 0.20, 0.97]]])


@pytest.fixture(scope="module")
def trainer(dataset3d):
    return start(make_trainer(nnUNetTrainerFixMatch_sslTiny, dataset3d, "3d_fullres", fold=0))


def test_mask_ratio_and_histogram_from_counts():
    counts = {k: float(v) for k, v in pseudo_label_counts(LABELS, CONF >= 0.95, 3).items()}
    assert counts["n_vox"] == 6 and counts["n_conf"] == 4  # 0.95 itself passes (>=)
    assert [counts[f"n_pl_{c}"] for c in range(3)] == [2, 3, 1]
    assert [counts[f"n_conf_{c}"] for c in range(3)] == [1, 2, 1]
    r = fixmatch_ratios(counts, 3)
    assert r["mask_ratio"] == pytest.approx(4 / 6)
    assert [r[f"pl_frac_{c}"] for c in range(3)] == pytest.approx([2 / 6, 3 / 6, 1 / 6])
    assert [r[f"mask_ratio_{c}"] for c in range(3)] == pytest.approx([1 / 2, 2 / 3, 1.0])
    # epoch ratios come from summed counts, not from a mean of per-step ratios
    step2 = {k: float(v) for k, v in pseudo_label_counts(torch.zeros(1, 2, 2, dtype=torch.long),
                                                         torch.ones(1, 2, 2, dtype=torch.bool), 3).items()}
    summed = {k: counts[k] + step2[k] for k in counts}
    assert fixmatch_ratios(summed, 3)["mask_ratio"] == pytest.approx(8 / 10)  # mean of ratios would be 0.833
    assert math.isnan(fixmatch_ratios({**summed, "n_pl_2": 0.0, "n_conf_2": 0.0}, 3)["mask_ratio_2"])


def test_masked_ce_value_and_gradient():
    logits = torch.zeros(1, 3, 2, 3, requires_grad=True)  # uniform: CE = ln 3 everywhere
    mask = CONF >= 0.95
    loss = masked_pseudo_label_ce(logits, LABELS, mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(4 * math.log(3) / 6)  # mean over all voxels, masked ones count 0
    loss.backward()
    g = logits.grad
    assert torch.all(g[0, :, ~mask[0]] == 0) and torch.all(g[0, :, mask[0]].abs().sum(0) > 0)
    empty = masked_pseudo_label_ce(logits, LABELS, torch.zeros_like(mask))
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="mask"):
        masked_pseudo_label_ce(logits, LABELS, mask[:, :1])


def test_strong_view_without_ops_equals_weak_view(trainer):
    u = torch.randn(2, 1, 4, 6, 6)
    logits = torch.randn(2, 3, 4, 6, 6)
    trainer.strong_aug, trainer.mixer = None, None
    strong, ref, mask = trainer.make_strong_view(u, logits)
    assert mask is None and torch.equal(strong, u) and torch.equal(ref, logits)
    # intensity ops only (blur with a vanishing sigma): per-sample affine in intensity, same geometry
    trainer.strong_aug = StrongView(p=1.0, blur_sigma=(1e-3, 1e-3))
    strong, ref, _ = trainer.make_strong_view(u, logits)
    assert torch.equal(ref, logits) and not torch.allclose(strong, u)
    for b in range(2):
        x, y = u[b].flatten(), strong[b].flatten()
        a = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
        torch.testing.assert_close(y, a * (x - x.mean()) + y.mean(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mixer", [CutMix(0.5), ClassMix()])
def test_mix_applies_one_mask_to_image_and_pseudo_labels(trainer, mixer):
    b, s = 3, (4, 6, 6)
    ids = torch.arange(b * 4 * 6 * 6, dtype=torch.float32).view(b, 1, *s)  # every voxel traceable
    logits = torch.zeros(b, 3, *s)
    logits[:, 0] = ids[:, 0]
    logits[:, 1] = (ids[:, 0] % 7 == 0).float() * 1e6  # pseudo-labels with two classes for ClassMix
    trainer.strong_aug, trainer.mixer = None, mixer
    strong, ref, mask = trainer.make_strong_view(ids, logits)
    assert mask is not None and mask.shape == (b, *s) and 0 < mask.sum() < mask.numel()
    torch.testing.assert_close(ref[:, 0], strong[:, 0], rtol=0, atol=0)  # identical mask on both
    torch.testing.assert_close(strong[:, 0], torch.where(mask, partner(ids)[:, 0], ids[:, 0]), rtol=0, atol=0)
    # the mixed pseudo-labels / confidences are exactly the mix of the weak ones
    _, y_w, q_w = softmax_stats(logits)
    _, y_s, q_s = softmax_stats(ref)
    assert torch.equal(y_s, torch.where(mask, partner(y_w), y_w))
    assert torch.equal(q_s, torch.where(mask, partner(q_w), q_w))


def test_unsup_loss_is_masked_ce_toward_own_weak_prediction(trainer):
    batch = next(trainer.dataloader_train)
    u = next(trainer.dataloader_unlabeled)["data"]
    trainer.strong_aug, trainer.mixer = None, None
    with torch.no_grad():
        ref = trainer.full_res(trainer.network(u))
        _, _, q = softmax_stats(ref)
        trainer.threshold = 0.0
        _, unsup, m = trainer.compute_losses(batch["data"], batch["target"], u)
    # strong == weak: the CE toward the own argmax is -log max p at every voxel
    assert unsup.item() == pytest.approx(float(-q.log().mean()), rel=1e-4)
    assert m["fm_n_conf"] == m["fm_n_vox"] == q.numel()
    trainer.threshold = 1.01
    with torch.no_grad():
        _, unsup, m = trainer.compute_losses(batch["data"], batch["target"], u)
    assert unsup.item() == 0.0 and m["fm_n_conf"] == 0
    trainer.threshold = 0.95


def test_one_epoch_updates_network_and_logs_mask_ratio(dataset3d):
    tr = start(make_trainer(nnUNetTrainerFixMatch_sslTiny, dataset3d, "3d_fullres", fold=1))
    tr.threshold = 0.5  # an untrained 3-class network is rarely 95% sure
    before = state_copy(tr.student)
    one_epoch(tr)
    assert max_abs_diff(before, state_copy(tr.student)) > 0
    v = {k: s[-1] for k, s in tr.ssl_log.values.items()}
    assert 0.0 <= v["mask_ratio"] <= 1.0 and v["unsup_loss"] >= 0
    assert sum(v[f"pl_frac_{c}"] for c in range(3)) == pytest.approx(1.0)
    assert not any(k.startswith("fm_") for k in v)  # raw counts are turned into ratios
    # mask ratio is the fraction of all unlabeled voxels seen in the epoch
    n_vox = tr.num_iterations_per_epoch * tr.unlabeled_batch_size * math.prod(tr.configuration_manager.patch_size)
    assert (v["mask_ratio"] * n_vox) == pytest.approx(round(v["mask_ratio"] * n_vox), abs=1e-6)
    row = json.loads(open(tr.output_folder + "/ssl_progress.jsonl").read().splitlines()[0])
    assert row["mask_ratio"] == pytest.approx(v["mask_ratio"])


# ---------------------------------------------------------------------------------------------- per-class thresholds
def test_confident_share_per_class_and_foreground_share():
    counts = {k: float(v) for k, v in pseudo_label_counts(LABELS, CONF >= 0.95, 3).items()}
    r = fixmatch_ratios(counts, 3)
    # confident voxels: class 0 {0.99}, class 1 {0.96, 0.97}, class 2 {0.95}, out of 6
    assert [r[f"conf_frac_{c}"] for c in range(3)] == pytest.approx([1 / 6, 2 / 6, 1 / 6])
    assert r["conf_fg_share"] == pytest.approx(3 / 4)


def _probs_to_logits(rows):
    # rows: per voxel the class probabilities; (1, C, 1, 1, V) logits
    return torch.tensor(rows, dtype=torch.float64).log().T.reshape(1, len(rows[0]), 1, 1, len(rows)).float()


def test_adaptive_thresholds_follow_the_class_mean_confidence(dataset3d):
    from nnunet_ssl.algorithms.metassl import ClassThresholds
    from nnunet_ssl.trainers.nnUNetTrainerFixMatch import nnUNetTrainerFixMatch_adaptive

    tr = make_trainer(nnUNetTrainerFixMatch_adaptive, dataset3d, "3d_fullres", fold=2)
    tr.initialize()
    th = tr.ssl_modules["fm_thresholds"]
    assert (th.momentum, th.tau_max, th.tau.tolist()) == (0.99, 0.95, pytest.approx([0.95] * 3))
    tr.ssl_modules["fm_thresholds"] = ClassThresholds(3, init=0.95, momentum=0.5, tau_max=0.95)
    weak = _probs_to_logits([(0.99, 0.005, 0.005), (0.97, 0.02, 0.01), (0.3, 0.6, 0.1), (0.1, 0.8, 0.1),
                             (0.25, 0.25, 0.5)])
    tau = tr.class_thresholds(weak)
    # tau_c = 0.5 * 0.95 + 0.5 * s_c / (n_c + 1): class 0 (0.99 + 0.97) / 3, class 1 (0.6 + 0.8) / 3, class 2 0.5 / 2
    expected = [0.475 + 0.5 * 1.96 / 3, 0.475 + 0.5 * 1.4 / 3, 0.475 + 0.5 * 0.25]
    assert tau.tolist() == pytest.approx(expected, abs=1e-6)
    # a class whose mean confidence stays above the cap is compared with the cap, never a stricter value
    tr.ssl_modules["fm_thresholds"].tau.fill_(0.999)
    assert tr.class_thresholds(weak).max().item() <= 0.95


def test_adaptive_epoch_logs_thresholds_and_checkpoint_restores_them(dataset3d, tmp_path):
    from nnunet_ssl.trainers.nnUNetTrainerFixMatch import nnUNetTrainerFixMatch_adaptive

    tr = start(make_trainer(nnUNetTrainerFixMatch_adaptive, dataset3d, "3d_fullres", fold=3))
    tr.num_iterations_per_epoch, tr.num_val_iterations_per_epoch = 2, 1
    one_epoch(tr)
    v = {k: s[-1] for k, s in tr.ssl_log.values.items()}
    taus = [v[f"fixmatch_tau_{c}"] for c in range(3)]
    assert all(0 < t <= 0.95 for t in taus)
    assert tr.ssl_modules["fm_thresholds"].num_updates.item() == 2
    assert sum(v[f"conf_frac_{c}"] for c in range(3)) == pytest.approx(v["mask_ratio"])
    assert math.isnan(v["conf_fg_share"]) or 0 <= v["conf_fg_share"] <= 1
    ckpt = tmp_path / "fm.pth"
    tr.save_checkpoint(str(ckpt))
    fresh = make_trainer(nnUNetTrainerFixMatch_adaptive, dataset3d, "3d_fullres", fold=3)
    fresh.load_checkpoint(str(ckpt))
    torch.testing.assert_close(fresh.ssl_modules["fm_thresholds"].tau, tr.ssl_modules["fm_thresholds"].tau,
                               rtol=0, atol=0)
    assert fresh.ssl_modules["fm_thresholds"].num_updates.item() == 2


def test_unknown_threshold_mode_is_a_clear_error(dataset3d):
    from nnunet_ssl.trainers.nnUNetTrainerFixMatch import nnUNetTrainerFixMatch

    class Bad(nnUNetTrainerFixMatch):
        threshold_mode = "freematch"

    with pytest.raises(ValueError, match="threshold_mode must be 'fixed' or 'adaptive', got 'freematch'"):
        make_trainer(Bad, dataset3d, "3d_fullres", fold=0).initialize()
