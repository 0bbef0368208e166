"""The CIFAR ResNets of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, sec. 4.2.

A 3x3 stem, then three stages of ``n`` basic blocks with 16, 32, 64 channels (times ``width``) on 32, 16 and 8
pixel maps, global average pooling: depth ``6n + 2`` (ResNet-20/32/44/56 for n = 3/5/7/9). Shortcuts that
change shape use option A, parameter-free: subsample by 2 and zero-pad the new channels, so ResNet-32 with a
10-class linear layer has 0.46 M parameters (the backbone of LDAM-DRW and the tSP paper).

As a backbone it returns the pooled feature ``(N, out_features)``; the classification layer is a pancls head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pancls.models.backbones import BACKBONES
from pancls.validation import check_scalar


class ShortcutA(nn.Module):
    """Option-A shortcut: ``x[:, :, ::stride, ::stride]`` with zero channels padded evenly on both sides."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad_before = (planes - in_planes) // 2
        self.pad_after = planes - in_planes - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` with 3x3 convolutions."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ShortcutA(in_planes, planes, stride) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet of depth ``6 * blocks_per_stage + 2`` as a feature extractor.

    Parameters
    ----------
    blocks_per_stage : int
        ``n``: 3, 5, 7, 9 for ResNet-20, 32, 44, 56.
    width : float
        Multiplies the stage widths 16/32/64 (rounded: ``out_features = round(64 * width)``).
    in_channels : int
        Input channels (3 for RGB).
    """

    def __init__(self, blocks_per_stage: int, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        check_scalar(width, "width", float, min_val=0, include_boundaries="neither")
        self.spatial_dims, self.in_channels = 2, in_channels  # the input a caller must give
        planes = [max(1, int(round(base * width))) for base in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        in_planes = planes[0]
        stages = []
        for i, p in enumerate(planes):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, p, stride=2 if (i > 0 and b == 0) else 1))
                in_planes = p
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.out_features = planes[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He et al. 2015 ("Delving deep into rectifiers"), fan-in mode as in LDAM-DRW's resnet_cifar.py
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def _register(depth: int) -> None:
    def factory(width: float = 1.0, in_channels: int = 3) -> ResNetCifar:
        return ResNetCifar((depth - 2) // 6, width=width, in_channels=in_channels)

    factory.__doc__ = f"ResNet-{depth} for CIFAR (He et al. 2016, sec. 4.2), option-A shortcuts."
    BACKBONES.register(f"resnet{depth}_cifar")(factory)


for _depth in (20, 32, 44, 56):
    _register(_depth)
