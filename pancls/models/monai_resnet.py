"""MONAI's ``spatial_dims``-generic ResNets as feature extractors (2D or 3D, any input channels).

The classification layer of MONAI's ResNet is replaced by the identity so that any pancls head can sit
on top. Reference: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; Chen et al.,
"Med3D", 2019 (the 3D variants MONAI implements).
"""
from __future__ import annotations

from torch import nn

from pancls.models import BACKBONES


class MonaiResNetFeatures(nn.Module):
    def __init__(self, depth: int, spatial_dims: int = 3, in_channels: int = 1, widen_factor: float = 1.0):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        # Imported here so that the 2D benchmarks run where MONAI is not installed (e.g. a bare GPU image).
        from monai.networks.nets import resnet as monai_resnet

        factory = getattr(monai_resnet, f"resnet{depth}")
        self.net = factory(spatial_dims=spatial_dims, n_input_channels=in_channels, widen_factor=widen_factor,
                           num_classes=1, feed_forward=False)
        self.out_features = self.net.fc.in_features if isinstance(self.net.fc, nn.Linear) else _infer_width(depth, widen_factor)

    def forward(self, x):
        return self.net(x)


def _infer_width(depth: int, widen_factor: float) -> int:
    expansion = 4 if depth >= 50 else 1
    return int(512 * widen_factor) * expansion


for _depth in (10, 18, 34, 50):
    def _factory(spatial_dims: int = 3, in_channels: int = 1, widen_factor: float = 1.0, _d=_depth):
        return MonaiResNetFeatures(_d, spatial_dims, in_channels, widen_factor)

    BACKBONES.register(f"resnet{_depth}")(_factory)
