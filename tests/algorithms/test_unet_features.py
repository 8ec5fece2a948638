"""feature_modules / feature_channels on the plain U-Net (residual encoder: tests/trainers/test_action.py)."""
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_ssl.algorithms.contrastive.point_gather import FeatureCapture
from nnunet_ssl.algorithms.unet_features import feature_channels, feature_modules


def test_bottleneck_then_decoder_stages_coarsest_first_2d():
    net = PlainConvUNet(1, 4, (8, 16, 32, 32), torch.nn.Conv2d, 3, ((1, 1), (2, 2), (2, 2), (2, 2)), 2, 3, 2,
                        conv_bias=True, norm_op=torch.nn.InstanceNorm2d, nonlin=torch.nn.LeakyReLU,
                        deep_supervision=True)
    mods = feature_modules(net)
    assert mods[0] is net.encoder.stages[-1] and mods[1:] == list(net.decoder.stages)
    with FeatureCapture(mods) as cap, torch.no_grad():
        net(torch.randn(2, 1, 32, 32))
        shapes = [tuple(f.shape) for f in cap.features()]
    # bottleneck 32 ch at 4x4, then decoder stages fused with the 32-, 16- and 8-channel skips
    assert shapes == [(2, 32, 4, 4), (2, 32, 8, 8), (2, 16, 16, 16), (2, 8, 32, 32)]
    assert feature_channels(net) == [32, 32, 16, 8]
