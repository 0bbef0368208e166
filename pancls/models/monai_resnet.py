"""MONAI's ``spatial_dims``-generic ResNets as feature extractors (2D or 3D, any input channels).

The classification layer of MONAI's ResNet is replaced by the identity so that any pancls head can sit
on top. Reference: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; Chen et al.,
"Med3D", 2019 (the 3D variants MONAI implements).
"""
from __future__ import annotations

from torch import nn

from pancls.models.backbones import BACKBONES
from pancls.validation import check_choice


class MonaiResNetFeatures(nn.Module):
    """MONAI ``resnet{depth}`` without its classification layer; ``out_features`` is its pooled width.

    ``conv1_t_size``/``conv1_t_stride`` are the stem's kernel and stride (MONAI defaults 7 and 1; a stride of
    2 quarters the cost of a 3D network on small ROIs), ``no_max_pool`` drops the stem's max-pool,
    ``shortcut_type`` "A" (parameter-free) or "B" (1x1 convolution, MONAI's default), ``bias_downsample`` a
    bias in the "B" shortcut (MedicalNet's weights have none).

    ``pretrained``: a local file of weights in the MedicalNet layout (Chen et al., "Med3D", 2019: a
    ``{"state_dict": ...}`` of ``module.``-prefixed keys, or a bare state dict); nothing is downloaded. The
    architecture must match the file: MedicalNet's resnet18/34 use ``shortcut_type="A"`` with
    ``bias_downsample=True``, its resnet10/50 ``shortcut_type="B"`` with ``bias_downsample=False`` (what MONAI's
    ``get_medicalnet_pretrained_resnet_args`` states); its stem is ``conv1_t_size=7, conv1_t_stride=2`` and one
    input channel. A mismatch is refused with the missing and unexpected keys.
    """

    def __init__(self, depth: int, spatial_dims: int = 3, in_channels: int = 1, widen_factor: float = 1.0,
                 conv1_t_size: int = 7, conv1_t_stride: int = 1, no_max_pool: bool = False,
                 shortcut_type: str = "B", bias_downsample: bool = True, pretrained: str | None = None):
        super().__init__()
        check_choice(spatial_dims, "spatial_dims", (2, 3))
        self.spatial_dims, self.in_channels = spatial_dims, in_channels  # the input a caller must give
        # Imported here so that the 2D benchmarks run where MONAI is not installed (e.g. a bare GPU image).
        from monai.networks.nets import resnet as monai_resnet

        factory = getattr(monai_resnet, f"resnet{depth}")
        self.net = factory(spatial_dims=spatial_dims, n_input_channels=in_channels, widen_factor=widen_factor,
                           num_classes=1, feed_forward=False, conv1_t_size=conv1_t_size,
                           conv1_t_stride=conv1_t_stride, no_max_pool=no_max_pool, shortcut_type=shortcut_type,
                           bias_downsample=bias_downsample)
        self.out_features = self.net.fc.in_features if isinstance(self.net.fc, nn.Linear) else _infer_width(depth, widen_factor)
        if pretrained:
            load_medicalnet_weights(self.net, pretrained, depth)

    def forward(self, x):
        return self.net(x)


def load_medicalnet_weights(net: nn.Module, path: str, depth: int) -> None:
    """Load a local MedicalNet-layout file into a MONAI ResNet (classification layer ignored), or refuse."""
    import torch

    from pancls.errors import UserError, exception_text
    from pancls.models.weights import describe_mismatch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError("pretrained weights file not found", path) from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"cannot read pretrained weights ({exception_text(exc, path)})", path) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError("expected a state dict (or {'state_dict': ...}) of tensors", path)
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    details = describe_mismatch(net.state_dict(), state)
    if details:
        hint = ("shortcut_type 'A', bias_downsample true" if depth in (18, 34) else
                "shortcut_type 'B', bias_downsample false")
        raise UserError(f"the weights do not fit resnet{depth} as configured ({details}); MedicalNet's resnet{depth} "
                        f"needs {hint}, conv1_t_size 7, conv1_t_stride 2, in_channels 1", path)
    net.load_state_dict(state, strict=False)  # strict except for the (absent) classification layer


def _infer_width(depth: int, widen_factor: float) -> int:
    expansion = 4 if depth >= 50 else 1
    return int(512 * widen_factor) * expansion


for _depth in (10, 18, 34, 50):
    def _factory(spatial_dims: int = 3, in_channels: int = 1, widen_factor: float = 1.0, conv1_t_size: int = 7,
                 conv1_t_stride: int = 1, no_max_pool: bool = False, shortcut_type: str = "B",
                 bias_downsample: bool = True, pretrained: str | None = None, _d=_depth):
        return MonaiResNetFeatures(_d, spatial_dims, in_channels, widen_factor, conv1_t_size, conv1_t_stride,
                                   no_max_pool, shortcut_type, bias_downsample, pretrained)

    BACKBONES.register(f"resnet{_depth}")(_factory)
