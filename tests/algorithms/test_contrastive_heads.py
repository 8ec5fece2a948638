"""Heads and predictors: shapes in 2D and 3D, layer layout, activation switch, 1x1-conv equivalence."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunet_ssl.algorithms.contrastive.heads import (DenseRepresentationHead2d, GlobalHead, GlobalPredictor,
                                                     PointHead, WindowHead, WindowPredictor, global_pool)


def test_global_head_and_predictor_shapes_and_pooling():
    g, q = GlobalHead(16, 8), GlobalPredictor(8)
    for spatial in [(5, 6), (3, 4, 5)]:
        x = torch.randn(2, 16, *spatial)
        out = g(x)
        assert out.shape == (2, 8)
        assert torch.allclose(out, g(x.mean(dim=tuple(range(2, x.ndim)))), atol=1e-6)
        assert q(out).shape == (2, 8)
    assert (g.fc1.in_features, g.fc1.out_features, g.fc2.out_features) == (16, 16, 8)
    assert isinstance(g.act, nn.ReLU) and isinstance(GlobalHead(16, 8, activation=False).act, nn.Identity)
    assert global_pool(torch.ones(2, 3)).shape == (2, 3)


def test_window_head_is_a_1x1_conv_mlp_in_2d_and_3d():
    h, r = WindowHead(3), WindowPredictor(3)
    assert (h.fc1.out_features, h.fc2.out_features) == (6, 3)
    assert (r.fc1.out_features, r.fc2.out_features) == (3, 3)
    for conv, spatial in [(F.conv2d, (4, 5)), (F.conv3d, (2, 3, 4))]:
        x = torch.randn(2, 3, *spatial)
        ones = (1,) * len(spatial)
        ref = conv(F.relu(conv(x, h.fc1.weight.view(6, 3, *ones), h.fc1.bias)), h.fc2.weight.view(3, 6, *ones),
                   h.fc2.bias)
        assert torch.allclose(h(x), ref, atol=1e-5)
        assert r(x).shape == x.shape


def test_point_head_no_first_bias():
    rho = PointHead(10, 4)
    assert rho.fc1.bias is None and rho.fc2.bias is not None
    x = torch.randn(7, 10)
    assert rho(x).shape == (7, 4)
    assert torch.allclose(rho(x), rho.fc2(F.relu(x @ rho.fc1.weight.t())), atol=1e-6)
    no_act = PointHead(10, 4, activation=False)
    assert torch.allclose(no_act(x), no_act.fc2(no_act.fc1(x)), atol=1e-6)


def test_dense_head_shape():
    assert DenseRepresentationHead2d(5, 4)(torch.randn(2, 5, 6, 7)).shape == (2, 4, 6, 7)
