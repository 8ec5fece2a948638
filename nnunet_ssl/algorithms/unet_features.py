"""Where to read multi-level features in nnU-Net's U-Nets, for hooks such as ``FeatureCapture``.

Duck-typed on the layout of ``dynamic_network_architectures``' ``PlainConvUNet`` and ``ResidualEncoderUNet``
(``net.encoder.stages``, ``net.encoder.output_channels``, ``net.decoder.stages``), so reading features needs
no change to the network that nnU-Net builds, saves and predicts with.
"""
from __future__ import annotations

from typing import List

from torch import nn


def feature_modules(net: nn.Module) -> List[nn.Module]:
    """The bottleneck ``encoder.stages[-1]``, then every ``decoder.stages[k]``, coarsest first.

    Their outputs are ``(B, C_l, *S_l)`` feature maps; the last decoder stage's ``S_l`` is the full input
    resolution. Channels: :func:`feature_channels`.
    """
    return [net.encoder.stages[-1], *net.decoder.stages]


def feature_channels(net: nn.Module) -> List[int]:
    """``C_l`` of each module of :func:`feature_modules`: the bottleneck's, then decoder stage ``k``'s, which is
    ``encoder.output_channels[-(k + 2)]`` (the channels of the skip connection it is fused with)."""
    out = list(net.encoder.output_channels)
    return [out[-1]] + [out[-(k + 2)] for k in range(len(net.decoder.stages))]
