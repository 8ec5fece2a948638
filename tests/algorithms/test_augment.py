"""Strong-view GPU intensity operations (ACTION spec 2.3)."""
import pytest
import torch

from nnunet_ssl.algorithms.augment import StrongView, gaussian_blur


@pytest.mark.parametrize("shape", [(4, 2, 12, 10), (3, 1, 6, 7, 8)])
def test_shape_dtype_determinism(shape):
    x = torch.rand(shape)
    view = StrongView()
    a = view(x, torch.Generator().manual_seed(0))
    b = view(x, torch.Generator().manual_seed(0))
    c = view(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    half = view(x.half(), torch.Generator().manual_seed(0))
    assert half.dtype == torch.float16


def test_probabilities_zero_and_one():
    x = torch.rand(3, 2, 8, 8)
    assert torch.equal(StrongView(p=0.0)(x, torch.Generator().manual_seed(0)), x)
    assert not torch.allclose(StrongView(p=1.0)(x, torch.Generator().manual_seed(0)), x)


def test_brightness_and_contrast_values():
    x = torch.rand(2, 1, 6, 6) + 1.0
    u = torch.rand((6, 2), generator=torch.Generator().manual_seed(0))  # the view's draws, in order
    no_blur = (1e-3, 1e-3)  # neighbour taps weigh exp(-5e5) = 0: blur is the identity
    out = StrongView(p=1.0, contrast=(1.0, 1.0), blur_sigma=no_blur)(x, torch.Generator().manual_seed(0))
    assert torch.allclose(out, x * (0.75 + 0.5 * u[1]).view(2, 1, 1, 1), atol=1e-6)
    # contrast: per-sample, per-channel mean preserved, deviations scaled by the factor
    out = StrongView(p=1.0, brightness=(1.0, 1.0), blur_sigma=no_blur)(x, torch.Generator().manual_seed(0))
    assert torch.allclose(out.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-5)
    ratio = (out - out.mean(dim=(2, 3), keepdim=True)).std(dim=(2, 3)) / \
        (x - x.mean(dim=(2, 3), keepdim=True)).std(dim=(2, 3))
    assert torch.allclose(ratio.view(-1), 0.75 + 0.5 * u[3], atol=1e-5)


@pytest.mark.parametrize("spatial", [(9, 11), (7, 8, 9)])
def test_gaussian_blur_per_sample(spatial):
    x = torch.zeros(2, 1, *spatial)
    center = tuple(s // 2 for s in spatial)
    x[(slice(None), 0) + center] = 1.0
    out = gaussian_blur(x, torch.tensor([0.5, 1.0]), radius=3)
    assert torch.allclose(out.flatten(1).sum(1), torch.ones(2), atol=1e-5)  # mass preserved away from edges
    assert out[(0, 0) + center] > out[(1, 0) + center]  # larger sigma spreads more
    # separable 1D profile along the last axis matches the normalised Gaussian
    k = torch.exp(-0.5 * (torch.arange(-3, 4).float() / 1.0) ** 2)
    k = k / k.sum()
    profile = out[(1, 0) + center[:-1]][center[-1] - 3:center[-1] + 4]
    assert torch.allclose(profile / profile.sum(), k, atol=1e-6)
    const = torch.full((1, 2, *spatial), 3.0)
    assert torch.allclose(gaussian_blur(const, torch.tensor([1.15]), 4), const, atol=1e-5)
