"""MONAI's ``spatial_dims``-generic ResNets as feature extractors (2D or 3D, any input channels).

The classification layer of MONAI's ResNet is replaced by the identity so that any pancls head can sit
on top. Reference: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; Chen et al.,
"Med3D", 2019 (the 3D variants MONAI implements).
"""
from __future__ import annotations

from torch import nn

from pancls.models import BACKBONES


class MonaiResNetFeatures(nn.Module):
    """MONAI ``resnet{depth}`` without its classification layer; ``out_features`` is its pooled width.

    ``conv1_t_size``/``conv1_t_stride`` are the stem's kernel and stride (MONAI defaults 7 and 1; a stride of
    2 quarters the cost of a 3D network on small ROIs), ``no_max_pool`` drops the stem's max-pool,
    ``shortcut_type`` "A" (parameter-free) or "B" (1x1 convolution, MONAI's default), ``bias_downsample`` a
    bias in the "B" shortcut (MedicalNet's weights have none).
    """

    def __init__(self, depth: int, spatial_dims: int = 3, in_channels: int = 1, widen_factor: float = 1.0,
                 conv1_t_size: int = 7, conv1_t_stride: int = 1, no_max_pool: bool = False,
                 shortcut_type: str = "B", bias_downsample: bool = True):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        # Imported here so that the 2D benchmarks run where MONAI is not installed (e.g. a bare GPU image).
        from monai.networks.nets import resnet as monai_resnet

        factory = getattr(monai_resnet, f"resnet{depth}")
        self.net = factory(spatial_dims=spatial_dims, n_input_channels=in_channels, widen_factor=widen_factor,
                           num_classes=1, feed_forward=False, conv1_t_size=conv1_t_size,
                           conv1_t_stride=conv1_t_stride, no_max_pool=no_max_pool, shortcut_type=shortcut_type,
                           bias_downsample=bias_downsample)
        self.out_features = self.net.fc.in_features if isinstance(self.net.fc, nn.Linear) else _infer_width(depth, widen_factor)

    def forward(self, x):
        return self.net(x)


def _infer_width(depth: int, widen_factor: float) -> int:
    expansion = 4 if depth >= 50 else 1
    return int(512 * widen_factor) * expansion


for _depth in (10, 18, 34, 50):
    def _factory(spatial_dims: int = 3, in_channels: int = 1, widen_factor: float = 1.0, conv1_t_size: int = 7,
                 conv1_t_stride: int = 1, no_max_pool: bool = False, shortcut_type: str = "B",
                 bias_downsample: bool = True, _d=_depth):
        return MonaiResNetFeatures(_d, spatial_dims, in_channels, widen_factor, conv1_t_size, conv1_t_stride,
                                   no_max_pool, shortcut_type, bias_downsample)

    BACKBONES.register(f"resnet{_depth}")(_factory)
