import pytest
import torch

from nnunet_ssl.algorithms.losses.consistency import softmax_mse
from nnunet_ssl.algorithms.perturb import clipped_gaussian_noise


def test_softmax_mse_hand_computed():
    # one voxel, two classes: p_s = (0.5, 0.5), p_t = (0.8, 0.2) -> mean((0.3^2, 0.3^2)) = 0.09
    zs = torch.zeros(1, 2, 1, 1, requires_grad=True)
    zt = torch.log(torch.tensor([0.8, 0.2])).view(1, 2, 1, 1).requires_grad_(True)
    loss = softmax_mse(zs, zt)
    assert loss.item() == pytest.approx(0.09, abs=1e-6)
    loss.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None  # the teacher is a constant target


def test_softmax_mse_3d_zero_for_equal_and_float32_for_half():
    z = torch.randn(2, 3, 4, 5, 6)
    assert softmax_mse(z, z.clone()).item() == 0.0
    out = softmax_mse(z.half(), (z + 1).bfloat16())
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="shape mismatch"):
        softmax_mse(z, z[:, :2])


def test_clipped_noise_bounds_and_reproducible():
    x = torch.zeros(2, 1, 8, 8)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a, b = clipped_gaussian_noise(x, 0.5, 0.2, g1), clipped_gaussian_noise(x, 0.5, 0.2, g2)
    torch.testing.assert_close(a, b)
    assert a.abs().max() <= 0.2 + 1e-7 and a.abs().max() > 0.1
    assert a.shape == x.shape and x.abs().sum() == 0  # input untouched
