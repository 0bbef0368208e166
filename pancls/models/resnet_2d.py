"""The 2D backbones of the large long-tailed benchmarks (ImageNet-LT, iNaturalist 2018): ResNet-10, ResNet-50 and
ResNeXt-50 (32x4d), all with the ImageNet stem (7x7 stride-2 convolution, 3x3 stride-2 max-pool), 3 input channels.

* ``resnet10_2d``, ``resnet50_2d``: MONAI's ``ResNet`` with ``spatial_dims=2`` (through
  :class:`~pancls.models.monai_resnet.MonaiResNetFeatures`), projection shortcuts without bias as in He et al.,
  "Deep Residual Learning for Image Recognition", CVPR 2016. ResNet-10 is OLTR's and Kang et al.'s (basic blocks,
  one per stage: 5.42 M parameters with a 1000-class fc); ResNet-50 has torchvision's 25.56 M.
* ``resnext50_32x4d``: MONAI has no plain ResNeXt classifier (only the SE variants), so its ``ResNet`` is built
  with :class:`ResNeXtBottleneck`, the bottleneck of Xie et al., "Aggregated Residual Transformations for Deep
  Neural Networks", CVPR 2017: a 3x3 convolution in ``C = 32`` groups, each ``d = 4`` channels wide at the first
  stage (width ``int(planes * d / 64) * C`` = 128, 256, 512, 1024 per stage), 25.03 M parameters with a 1000-class
  fc (the paper's Table 1 gives 25.0 M).

Each returns the pooled feature ``(N, out_features)`` (512 for ResNet-10, 2048 for the others); a pancls head
sits on top. Weights are initialised as MONAI does (He normal, fan-out); nothing is downloaded.
"""
from __future__ import annotations

from typing import Type

from torch import nn

from pancls.models.backbones import BACKBONES
from pancls.models.monai_resnet import MonaiResNetFeatures
from pancls.validation import InvalidParameter, check_choice, check_scalar


def _resnext_block(cardinality: int, width_per_group: int) -> Type[nn.Module]:
    """MONAI's ``ResNetBottleneck`` with its 3x3 convolution in ``cardinality`` groups (a class: MONAI's ResNet
    reads ``block.expansion`` and builds blocks with a fixed signature)."""
    from monai.networks.layers.factories import Conv
    from monai.networks.layers.utils import get_norm_layer
    from monai.networks.nets.resnet import ResNetBottleneck

    class ResNeXtBottleneck(ResNetBottleneck):
        """1x1 (``planes -> width``), grouped 3x3 (``width -> width``, stride), 1x1 (``width -> 4 planes``), with
        ``width = int(planes * width_per_group / 64) * cardinality`` (Xie et al. 2017, Fig. 3c)."""

        def __init__(self, in_planes: int, planes: int, spatial_dims: int = 3, stride: int = 1, downsample=None,
                     act=("relu", {"inplace": True}), norm="batch"):
            super().__init__(in_planes, planes, spatial_dims, stride, downsample, act, norm)
            conv = Conv[Conv.CONV, spatial_dims]
            width = int(planes * width_per_group / 64) * cardinality
            self.conv1 = conv(in_planes, width, kernel_size=1, bias=False)
            self.bn1 = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=width)
            self.conv2 = conv(width, width, kernel_size=3, stride=stride, padding=1, groups=cardinality, bias=False)
            self.bn2 = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=width)
            self.conv3 = conv(width, planes * self.expansion, kernel_size=1, bias=False)

    ResNeXtBottleneck.__name__ = ResNeXtBottleneck.__qualname__ = f"ResNeXtBottleneck{cardinality}x{width_per_group}d"
    return ResNeXtBottleneck


class ResNeXtFeatures(nn.Module):
    """ResNeXt with stages ``layers`` (ResNeXt-50: 3, 4, 6, 3) as a feature extractor; ``out_features`` = 2048
    at ``widen_factor`` 1. MONAI's ``ResNet`` supplies the stem, stages, shortcuts and initialisation."""

    def __init__(self, layers=(3, 4, 6, 3), cardinality: int = 32, width_per_group: int = 4, spatial_dims: int = 2,
                 in_channels: int = 3, widen_factor: float = 1.0):
        super().__init__()
        from monai.networks.nets.resnet import ResNet

        check_scalar(cardinality, "cardinality", int, min_val=1)
        check_scalar(width_per_group, "width_per_group", int, min_val=1)
        check_scalar(in_channels, "in_channels", int, min_val=1)
        check_scalar(widen_factor, "widen_factor", float, min_val=0, include_boundaries="neither")
        check_choice(spatial_dims, "spatial_dims", (2, 3))
        if int(int(64 * widen_factor) * width_per_group / 64) < 1:
            raise InvalidParameter(f"with width_per_group {width_per_group} leaves the first stage's groups no "
                                   f"channel (int(64 * widen_factor * width_per_group / 64) = 0), got {widen_factor}",
                                   "widen_factor")
        block = _resnext_block(cardinality, width_per_group)
        self.net = ResNet(block, list(layers), [64, 128, 256, 512], spatial_dims=spatial_dims,
                          n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2, shortcut_type="B",
                          widen_factor=widen_factor, feed_forward=False, bias_downsample=False)
        self.out_features = int(512 * widen_factor) * block.expansion
        self.spatial_dims, self.in_channels = spatial_dims, in_channels

    def forward(self, x):
        return self.net(x)


def _imagenet_resnet(depth: int, in_channels: int, widen_factor: float) -> MonaiResNetFeatures:
    return MonaiResNetFeatures(depth, spatial_dims=2, in_channels=in_channels, widen_factor=widen_factor,
                               conv1_t_size=7, conv1_t_stride=2, no_max_pool=False, shortcut_type="B",
                               bias_downsample=False)


@BACKBONES.register("resnet10_2d")
def resnet10_2d(in_channels: int = 3, widen_factor: float = 1.0) -> MonaiResNetFeatures:
    """ResNet-10 (basic blocks 1, 1, 1, 1), ImageNet stem; 512 features."""
    return _imagenet_resnet(10, in_channels, widen_factor)


@BACKBONES.register("resnet50_2d")
def resnet50_2d(in_channels: int = 3, widen_factor: float = 1.0) -> MonaiResNetFeatures:
    """ResNet-50 (bottlenecks 3, 4, 6, 3), ImageNet stem; 2048 features."""
    return _imagenet_resnet(50, in_channels, widen_factor)


@BACKBONES.register("resnext50_32x4d")
def resnext50_32x4d(in_channels: int = 3, widen_factor: float = 1.0, cardinality: int = 32,
                    width_per_group: int = 4) -> ResNeXtFeatures:
    """ResNeXt-50 (32x4d), ImageNet stem; 2048 features."""
    return ResNeXtFeatures((3, 4, 6, 3), cardinality, width_per_group, 2, in_channels, widen_factor)
