"""The 2D backbones of the large long-tailed benchmarks: published sizes, output shapes, the grouped bottleneck."""
import pytest
import torch

from pancls.errors import UserError
from pancls.models import BACKBONES, create_model


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name, features, with_fc_1000", [
    ("resnet10_2d", 512, 5_418_792),        # OLTR / Kang et al.'s ResNet-10 (basic blocks 1-1-1-1)
    ("resnet50_2d", 2048, 25_557_032),      # He et al. 2016; torchvision's resnet50 has the same count
    ("resnext50_32x4d", 2048, 25_028_904),  # Xie et al. 2017, Table 1: 25.0 M; torchvision's resnext50_32x4d: same
])
def test_parameter_counts_match_the_published_networks(name, features, with_fc_1000):
    net = BACKBONES.create(name)
    assert net.out_features == features
    assert _parameters(net) + features * 1000 + 1000 == with_fc_1000


def test_resnext_bottleneck_is_grouped_32x4d():
    net = BACKBONES.create("resnext50_32x4d").net
    widths = []
    for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
        block = stage[0]
        assert block.conv2.groups == 32 and block.conv2.kernel_size == (3, 3)
        widths.append(block.conv2.in_channels)
        assert block.conv3.out_channels == 2 * block.conv2.out_channels  # 4 planes = 2 width at 32x4d
    assert widths == [128, 256, 512, 1024]  # int(planes * 4 / 64) * 32
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)  # stride in the 3x3
    assert [len(s) for s in (net.layer1, net.layer2, net.layer3, net.layer4)] == [3, 4, 6, 3]


@pytest.mark.parametrize("name", ["resnet10_2d", "resnet50_2d", "resnext50_32x4d"])
def test_output_shape_and_channels_last(name):
    torch.manual_seed(0)
    net = BACKBONES.create(name, widen_factor=0.25).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = net(x)
        assert out.shape == (2, net.out_features)
        last = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(last, out, rtol=1e-4, atol=1e-4)


def test_full_width_224_forward_shape():
    net = BACKBONES.create("resnext50_32x4d").eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 224, 224)).shape == (1, 2048)


def test_a_2d_classifier_with_a_tsp_head_trains_one_step():
    torch.manual_seed(0)
    model = create_model("resnext50_32x4d", "tsp", 5, backbone_kwargs={"widen_factor": 0.25, "cardinality": 8},
                         head_kwargs={"dim": 16})
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 4])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_unknown_options_are_refused_naming_the_accepted_ones():
    with pytest.raises(UserError, match="groups: not an option of backbone 'resnext50_32x4d'; accepted: in_channels, widen_factor, cardinality"):
        BACKBONES.create("resnext50_32x4d", groups=32)
    with pytest.raises(UserError, match="cardinality"):
        BACKBONES.create("resnext50_32x4d", cardinality=0)
    with pytest.raises(ValueError, match="no channel"):
        BACKBONES.create("resnext50_32x4d", widen_factor=0.125)
