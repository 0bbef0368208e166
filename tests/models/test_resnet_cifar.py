"""CIFAR ResNets (He et al. 2016, sec. 4.2) as pancls backbones."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pancls.models import BACKBONES
from pancls.models.resnet_cifar import ShortcutA


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet32_parameter_count_matches_ldam_table():
    net = BACKBONES.create("resnet32_cifar")
    total = n_params(net) + 64 * 10 + 10  # + the 10-class linear layer
    assert abs(total - 0.464e6) / 0.464e6 < 0.01
    # 6n + 2 weighted layers: 31 convolutions + the classifier
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 31


@pytest.mark.parametrize("name, convs", [("resnet20_cifar", 19), ("resnet44_cifar", 43), ("resnet56_cifar", 55)])
def test_depths(name, convs):
    assert sum(isinstance(m, nn.Conv2d) for m in BACKBONES.create(name).modules()) == convs


@pytest.mark.parametrize("width", [1.0, 2.0])
def test_output_is_pooled_feature(width):
    net = BACKBONES.create("resnet32_cifar", width=width, in_channels=3)
    assert net.out_features == int(64 * width)
    out = net.eval()(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, int(64 * width))
    assert torch.all(out >= 0)  # average of ReLU maps


def test_option_a_shortcut_is_parameter_free_subsample_and_zero_pad():
    net = BACKBONES.create("resnet32_cifar")
    shortcuts = [m for m in net.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2 and all(n_params(s) == 0 for s in shortcuts)
    x = torch.randn(2, 16, 32, 32)
    y = ShortcutA(16, 32, 2)(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


def test_kaiming_init():
    net = BACKBONES.create("resnet32_cifar")
    conv = net.layer3[-1].conv2  # 64 x 64 x 3 x 3: fan_in 576
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.05)


def test_create_model_with_linear_head():
    pytest.importorskip("pancls.heads", reason="pancls/heads.py is written by another task")
    from pancls.models import create_model

    model = create_model("resnet32_cifar", "linear", 10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert abs(n_params(model) - 0.464e6) / 0.464e6 < 0.01
