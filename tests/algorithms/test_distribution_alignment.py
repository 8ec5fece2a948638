"""Distribution alignment of dense pseudo-labels: class shares, the running mean, the clamped logit shift."""
import math

import numpy as np
import pytest
import torch

from nnunet_ssl.algorithms.distribution_alignment import DistributionAlignment, class_fractions


def test_class_fractions_pool_voxels_and_skip_invalid_and_ignored_labels():
    segs = [np.array([[0, 0, 1, 2]]), torch.tensor([-1, 3, 1, 1, 7])]  # -1 outside the crop, 3 ignored, 7 no class
    f = class_fractions(segs, num_classes=4, ignore_label=3)
    assert f.dtype == torch.float64
    assert f.tolist() == pytest.approx([2 / 6, 3 / 6, 1 / 6, 0.0])  # counts 2, 3, 1, 0 of 6 valid voxels
    assert class_fractions([np.array([0, 3])], num_classes=4).tolist() == [0.5, 0.0, 0.0, 0.5]  # 3 counts unignored
    with pytest.raises(ValueError, match=r"no voxel with a label in \[0, 4\) \(ignore label 3\)"):
        class_fractions([np.array([-1, 3])], num_classes=4, ignore_label=3)


def test_first_update_sets_the_running_mean_then_ema():
    da = DistributionAlignment(2, momentum=0.9)
    assert not da.has_prior and da.running.tolist() == [0.5, 0.5]
    logits = torch.zeros(2, 2, 3, 3)  # p = (1/2, 1/2) everywhere
    logits[:, 0] = math.log(3.0)     # p = (3/4, 1/4) everywhere
    da.update(logits)
    assert da.running.tolist() == pytest.approx([0.75, 0.25])  # the first batch's mean, not 0.9 * uniform + ...
    da.update(torch.zeros(1, 2, 4))  # mean (1/2, 1/2)
    assert da.running.tolist() == pytest.approx([0.9 * 0.75 + 0.1 * 0.5, 0.9 * 0.25 + 0.1 * 0.5])  # 0.725, 0.275
    assert int(da.num_updates) == 2


def test_shift_is_log_prior_over_running_and_softmax_is_the_renormalised_product():
    da = DistributionAlignment(2, momentum=0.0)
    x = torch.randn(2, 2, 5, 5)
    assert torch.equal(da(x), x)  # identity without a prior
    da.update(torch.zeros(1, 2, 8))  # running (1/2, 1/2)
    da.set_prior(torch.tensor([1.0, 3.0]))  # normalised to (1/4, 3/4)
    assert da.prior.tolist() == [0.25, 0.75]
    assert da.ratio().tolist() == pytest.approx([0.5, 1.5])
    out = da(torch.zeros(1, 2, 3))
    assert out[0, :, 0].tolist() == pytest.approx([math.log(0.5), math.log(1.5)])
    # softmax(aligned) = normalize(p * ratio): p = (1/2, 1/2) -> (1/4, 3/4)
    assert torch.softmax(out, 1)[0, :, 0].tolist() == pytest.approx([0.25, 0.75])
    p = torch.softmax(x, 1)
    q = p * torch.tensor([0.5, 1.5]).view(1, 2, 1, 1)
    torch.testing.assert_close(torch.softmax(da(x), 1), q / q.sum(1, keepdim=True))


def test_an_over_predicted_class_loses_boundary_voxels():
    # class 1 is predicted on 6 of 10 voxels (logit margins -3.5 .. 5.5); the labeled data holds 40 % class 1
    margins = torch.arange(-3.5, 6.0)
    logits = torch.stack([torch.zeros(10), margins])[None]
    da = DistributionAlignment(2, momentum=0.0)
    da.update(logits)
    share1 = float(torch.sigmoid(margins).mean())  # softmax of (0, m) = sigmoid(m)
    da.set_prior(torch.tensor([0.6, 0.4]))
    shift = math.log(0.4 / share1) - math.log(0.6 / (1 - share1))  # the change of every class-1 margin
    aligned = da(logits)
    torch.testing.assert_close(aligned[0, 1] - aligned[0, 0], margins + shift)
    assert int(logits.argmax(1).sum()) == 6
    assert shift < 0 and int(aligned.argmax(1).sum()) == int((margins + shift > 0).sum()) < 6


def test_ratio_is_clamped_and_state_round_trips():
    da = DistributionAlignment(3, momentum=0.5, max_ratio=4.0)
    da.set_prior(torch.tensor([0.9, 0.1, 0.0]))
    logits = torch.zeros(1, 3, 6)
    logits[0, 0] = 10.0  # running ~ (1, 0, 0): ratios 0.9, 1e5 (floor eps), 1 -> clamped to [0.25, 4]
    da.update(logits)
    r = da.ratio().tolist()
    # running = softmax(10, 0, 0) = (1 - 2e, e, e) with e = 1 / (e^10 + 2) = 4.5e-5; prior (0.9, 0.1, 0 -> eps 1e-6)
    e = 1 / (math.exp(10) + 2)
    assert r[0] == pytest.approx(0.9 / (1 - 2 * e))
    assert r[1] == 4.0                     # 0.1 / 4.5e-5 = 2203, clamped
    assert r[2] == 0.25                    # 1e-6 / 4.5e-5 = 0.022, clamped
    other = DistributionAlignment(3)
    other.load_state_dict(da.state_dict())
    assert torch.equal(other.prior, da.prior) and torch.equal(other.running, da.running)
    assert int(other.num_updates) == 1


@pytest.mark.parametrize("kwargs, match", [({"num_classes": 1}, "num_classes must be >= 2"),
                                           ({"num_classes": 2, "momentum": 1.0}, r"momentum must be in \[0, 1\)"),
                                           ({"num_classes": 2, "max_ratio": 0.5}, "max_ratio must be >= 1")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistributionAlignment(**kwargs)


def test_bad_prior_and_bad_logits():
    da = DistributionAlignment(2)
    with pytest.raises(ValueError, match=r"prior must be 2 non-negative shares"):
        da.set_prior(torch.tensor([0.5, 0.3, 0.2]))
    with pytest.raises(ValueError, match=r"prior must be 2 non-negative shares"):
        da.set_prior(torch.tensor([1.5, -0.5]))
    with pytest.raises(ValueError, match=r"logits have 3 channels, expected 2"):
        da.update(torch.zeros(1, 3, 4))
