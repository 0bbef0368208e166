"""Every registered backbone, as timm tests its registry: builds with its defaults, runs forward on a small
input, and round-trips through TorchScript inside a classifier with the tSP head (as MONAI tests every network).

A backbone states the input it takes through ``spatial_dims`` and ``in_channels``; a new registration is picked up
here without editing this file.
"""
from __future__ import annotations

import pytest
import torch

from pancls.heads import HEADS
from pancls.models import BACKBONES, create_model

SIDE = 32  # enough for five stride-2 stages; small enough to keep the whole registry in seconds


def _input(net, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, net.in_channels, *([SIDE] * net.spatial_dims), generator=generator)


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_builds_runs_and_round_trips_through_torchscript(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, "tsp", num_classes=4, head_kwargs={"dim": 16}).eval()
    net = model.backbone
    assert net.spatial_dims in (2, 3) and net.in_channels >= 1
    x = _input(net)
    with torch.no_grad():
        features = net(x)
        logits = model(x)
    assert features.shape == (2, net.out_features) and torch.isfinite(features).all()
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()

    traced = torch.jit.trace(model, x)
    torch.jit.save(traced, str(tmp_path / "model.ts"))
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    other = _input(net, seed=1)  # not the tracing input: the graph, not a cached output, is compared
    with torch.no_grad():
        torch.testing.assert_close(loaded(other), model(other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", HEADS.names())
def test_every_head_round_trips_through_torchscript(head, tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet20_cifar", head, num_classes=5, backbone_kwargs={"width": 0.25}).eval()
    x = _input(model.backbone)
    scripted = torch.jit.trace(model, x)
    torch.jit.save(scripted, str(tmp_path / "model.ts"))
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    other = _input(model.backbone, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(other), model(other), rtol=1e-5, atol=1e-5)
