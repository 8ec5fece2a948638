"""Projection heads and predictors of ACTION / ACTION++ (spec section 2.4, 2.5, 2.8).

All heads are plain ``nn.Module`` two-layer MLPs. The teacher's copies are deep copies updated by the
trainer's EMA code, so nothing here knows about student or teacher. ``activation=False`` drops the
ReLU between the two layers, which is what the released code does (spec section 6, row 3).

| head | input | layers |
|---|---|---|
| ``GlobalHead`` g | ``(B, C_b)`` or bottleneck ``(B, C_b, *S)`` | Linear(C_b, C_b) - ReLU - Linear(C_b, d_g) |
| ``GlobalPredictor`` q | ``(B, d_g)`` | Linear(d_g, d_g) - ReLU - Linear(d_g, d_g) |
| ``WindowHead`` h_l | ``(B, C, *S)`` | 1x1 conv C -> 2C - ReLU - 1x1 conv 2C -> C |
| ``WindowPredictor`` r_l | ``(B, C, *S)`` | 1x1 conv C -> C - ReLU - 1x1 conv C -> C |
| ``PointHead`` rho | ``(N, C_cat)`` points | Linear(C_cat, D, no bias) - ReLU - Linear(D, D) |
| ``DenseRepresentationHead2d`` | ``(B, C_cat, H, W)`` | 3x3 conv C_cat -> D - ReLU - 1x1 conv D -> D |
"""
from __future__ import annotations

import torch
import torch.nn as nn


class MLP(nn.Module):
    """``Linear(in, hidden) - [ReLU] - Linear(hidden, out)`` on the last axis.

    Args:
        in_features, hidden_features, out_features: layer widths.
        activation: ReLU between the layers (True) or none (the released code).
        first_bias: bias of the first layer.

    Shapes:
        ``(*, in_features) -> (*, out_features)``.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int, activation: bool = True,
                 first_bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=first_bias)
        self.act = nn.ReLU(inplace=True) if activation else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ChannelMLP(MLP):
    """``MLP`` applied along the channel axis 1: two 1x1 convolutions, for any number of spatial axes.

    A Linear over the channel axis is a 1x1 convolution, and it needs no choice between Conv2d and
    Conv3d, so the same module (and state dict) serves 2D and 3D.

    Shapes:
        ``(B, in_features, *S) -> (B, out_features, *S)`` with ``S`` of any length (also ``(B, C)``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """Global average pool over the spatial axes: ``(B, C, *S) -> (B, C)``; ``(B, C)`` passes through."""
    return x.flatten(2).mean(dim=2) if x.ndim > 2 else x


class GlobalHead(MLP):
    """Global projection head g: ``Linear(C_b, C_b) - ReLU - Linear(C_b, d_g)``.

    Args:
        in_channels: bottleneck channels ``C_b``.
        out_dim: embedding width ``d_g`` (spec: 512 in 2D, 128 in 3D).
        activation: ReLU between the layers.

    Shapes:
        ``(B, C_b)`` or the bottleneck map ``(B, C_b, *S)`` (average-pooled first) ``-> (B, d_g)``,
        not normalised.
    """

    def __init__(self, in_channels: int, out_dim: int, activation: bool = True):
        super().__init__(in_channels, in_channels, out_dim, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(global_pool(x))


class GlobalPredictor(MLP):
    """Student-only predictor q: ``Linear(d_g, d_g) - ReLU - Linear(d_g, d_g)``; ``(B, d_g) -> (B, d_g)``."""

    def __init__(self, dim: int, activation: bool = True):
        super().__init__(dim, dim, dim, activation)


class WindowHead(ChannelMLP):
    """Local head h_l: ``1x1 conv C -> 2C - ReLU - 1x1 conv 2C -> C``; ``(B, C, *S) -> (B, C, *S)``.

    Args:
        channels: ``C``, the number of classes (it runs on the logits, 2D or 3D).
        activation: ReLU between the layers.
    """

    def __init__(self, channels: int, activation: bool = True):
        super().__init__(channels, 2 * channels, channels, activation)


class WindowPredictor(ChannelMLP):
    """Student-only local predictor r_l: ``1x1 conv C -> C - ReLU - 1x1 conv C -> C``; ``(B, C, *S) -> (B, C, *S)``."""

    def __init__(self, channels: int, activation: bool = True):
        super().__init__(channels, channels, channels, activation)


class PointHead(MLP):
    """Point representation head rho: ``Linear(C_cat, D, bias=False) - ReLU - Linear(D, D)``.

    Applied point-wise to features gathered with ``gather_points``, which is the 1x1 part of a dense
    head without ever building the full-resolution map.

    Args:
        in_channels: ``C_cat``, bottleneck plus all decoder stage channels.
        dim: ``D`` (spec: 512 in 2D / 128 in 3D for ACTION, 128 for ACTION++).
        activation: ReLU between the layers.

    Shapes:
        ``(N, C_cat) -> (N, D)``, not normalised.
    """

    def __init__(self, in_channels: int, dim: int, activation: bool = True):
        super().__init__(in_channels, dim, dim, activation, first_bias=False)


class DenseRepresentationHead2d(nn.Module):
    """The released code's 2D representation head (``anco_head_mode='dense'``).

    ``Conv2d(C_cat, D, 3, padding=1, bias=False) - ReLU - Conv2d(D, D, 1)`` on the materialised
    full-resolution concatenation. 2D only, because the 3D map would need gigabytes.

    Shapes:
        ``(B, C_cat, H, W) -> (B, D, H, W)``.
    """

    def __init__(self, in_channels: int, dim: int, activation: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, dim, 3, padding=1, bias=False)
        self.act = nn.ReLU(inplace=True) if activation else nn.Identity()
        self.conv2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))
