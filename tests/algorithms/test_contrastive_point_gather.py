"""gather_points equals interpolate-then-index (spec 9.4); FeatureCapture; sample_coords."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunet_ssl.algorithms.contrastive.point_gather import FeatureCapture, gather_points, sample_coords


def _reference(features, coords, full_shape):
    mode = "bilinear" if len(full_shape) == 2 else "trilinear"
    up = torch.cat([F.interpolate(f, size=full_shape, mode=mode, align_corners=False) for f in features], 1)
    return up[(coords[:, 0], slice(None), *coords[:, 1:].t())]


@pytest.mark.parametrize("full_shape,levels", [
    ((20, 12), [(3, 10, 6), (5, 5, 3), (4, 20, 12), (2, 7, 5)]),
    ((12, 10, 8), [(3, 6, 5, 4), (4, 3, 3, 2), (2, 12, 10, 8), (3, 5, 7, 3)]),
])
def test_gather_equals_interpolate_then_index(full_shape, levels):
    torch.manual_seed(0)
    b = 3
    features = [torch.randn(b, c, *s, dtype=torch.float64, requires_grad=True) for c, *s in levels]
    n_pts = 200
    coords = torch.stack([torch.randint(0, b, (n_pts,))] + [torch.randint(0, s, (n_pts,)) for s in full_shape], 1)
    # include the corners, where clamping matters
    corners = torch.tensor([[0] + [0] * len(full_shape), [b - 1] + [s - 1 for s in full_shape]])
    coords = torch.cat([coords, corners])
    out = gather_points(features, coords, full_shape)
    ref = _reference(features, coords, full_shape)
    assert out.shape == (coords.shape[0], sum(c for c, *_ in levels))
    assert out.dtype == torch.float64
    assert torch.allclose(out, ref, atol=1e-10)
    # gradients agree as well
    w = torch.randn_like(out)
    g_out = torch.autograd.grad((out * w).sum(), features)
    g_ref = torch.autograd.grad((ref * w).sum(), features)
    for a, r in zip(g_out, g_ref):
        assert torch.allclose(a, r, atol=1e-10)


def test_gather_float32_and_empty():
    feats = [torch.randn(2, 4, 5, 6), torch.randn(2, 3, 10, 12)]
    coords = torch.tensor([[1, 9, 11], [0, 0, 3]])
    assert torch.allclose(gather_points(feats, coords, (10, 12)), _reference(feats, coords, (10, 12)), atol=1e-5)
    assert gather_points(feats, coords[:0], (10, 12)).shape == (0, 7)
    with pytest.raises(ValueError):
        gather_points(feats, coords[:, :2], (10, 12))


def test_sample_coords_only_masked_and_reproducible():
    mask = torch.zeros(2, 6, 7, dtype=torch.bool)
    mask[1, 2, 3] = mask[0, 5, 0] = mask[1, 0, 6] = True
    g = torch.Generator().manual_seed(0)
    pts = sample_coords(mask, 50, g)
    assert pts.shape == (50, 3)
    assert mask[pts[:, 0], pts[:, 1], pts[:, 2]].all()
    assert len({tuple(p) for p in pts.tolist()}) == 3
    again = sample_coords(mask, 50, torch.Generator().manual_seed(0))
    assert torch.equal(pts, again)
    assert sample_coords(torch.zeros(1, 3, 3, 3, dtype=torch.bool), 5, g).shape == (0, 4)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 3, 3, stride=2, padding=1)])
        self.head = nn.Conv2d(3, 1, 1)

    def forward(self, x):
        for s in self.stages:
            x = s(x)
        return self.head(x)


def test_feature_capture_store_clear_remove():
    net = _Net()
    teacher = copy.deepcopy(net)  # copied before hooking: the teacher stays unhooked
    cap = FeatureCapture([net.stages[1], net.stages[0]])
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(RuntimeError):
        cap.features()
    net(x)
    feats = cap.features()
    assert [tuple(f.shape) for f in feats] == [(2, 3, 4, 4), (2, 2, 8, 8)]
    assert feats[0].requires_grad  # the graph's own tensors, not copies
    cap.clear()
    assert len(cap) == 0
    teacher(x)
    assert len(cap) == 0
    cap.active = False
    net(x)
    assert len(cap) == 0
    cap.active = True
    net(x)
    assert len(cap) == 2
    cap.remove()
    assert len(cap) == 0
    net(x)
    assert len(cap) == 0
