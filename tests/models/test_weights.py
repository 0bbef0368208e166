"""Weights into a built network: the one fit check, a pancls run's backbone (cRT stage 2), a frozen backbone."""
from __future__ import annotations

import pytest
import torch

from pancls.errors import UserError
from pancls.models import create_model
from pancls.models.weights import describe_mismatch, load_backbone_from
from pancls.train.optim import param_groups


def _net(width: float = 0.25, head: str = "softmax", seed: int = 0):
    torch.manual_seed(seed)
    return create_model("resnet20_cifar", head, 4, backbone_kwargs={"width": width})


def test_describe_mismatch_by_hand():
    own = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    assert describe_mismatch(own, dict(own)) == ""
    text = describe_mismatch(own, {"a": torch.zeros(2), "b": torch.zeros(4), "d": torch.zeros(1)})
    assert text == "missing 1: c; unexpected 1: d; shape differs: b"
    many = describe_mismatch({f"k{i}": torch.zeros(1) for i in range(8)}, {})
    assert many.startswith("missing 8: k0, k1, k2, k3, k4, k5 ...")


def test_the_backbone_of_a_run_folder_is_loaded_and_the_head_is_not(tmp_path):
    stage1 = _net(seed=1)
    (tmp_path / "run").mkdir()
    torch.save({"model": stage1.state_dict(), "epoch": 3}, tmp_path / "run" / "last.pt")
    stage2 = _net(head="tsp", seed=2)
    head_before = {k: v.clone() for k, v in stage2.head.state_dict().items()}
    assert load_backbone_from(stage2, str(tmp_path / "run")) == tmp_path / "run" / "last.pt"
    for key, value in stage1.backbone.state_dict().items():
        assert torch.equal(stage2.backbone.state_dict()[key], value), key
    for key, value in head_before.items():
        assert torch.equal(stage2.head.state_dict()[key], value), key


def test_bad_sources_are_one_line_refusals_naming_file_and_key(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_backbone_from(_net(), str(tmp_path / "nowhere"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError) as info:
        load_backbone_from(_net(), str(tmp_path / "other.pt"))
    assert "model.init_backbone_from" in str(info.value) and "not a pancls checkpoint" in str(info.value)
    torch.save({"model": _net(width=0.5).state_dict()}, tmp_path / "wide.pt")
    with pytest.raises(UserError) as info:
        load_backbone_from(_net(width=0.25), str(tmp_path / "wide.pt"))
    message = str(info.value)
    assert "does not fit model.backbone" in message and "shape differs" in message and "\n" not in message
    assert str(tmp_path / "wide.pt") in message


def test_a_frozen_backbone_keeps_weights_and_batchnorm_statistics_while_the_head_trains():
    net = _net(head="tsp").freeze_backbone()
    backbone = {k: v.clone() for k, v in net.backbone.state_dict().items()}  # running means included
    head = {k: v.clone() for k, v in net.head.state_dict().items()}
    groups = param_groups(net, weight_decay=5e-4, wd_on_all=True)
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in net.head.parameters()}  # the optimiser never sees the backbone
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    net.train()
    assert net.training and net.head.training and not net.backbone.training
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.randint(0, 4, (8,))).backward()
        opt.step()
    for key, value in backbone.items():
        assert torch.equal(net.backbone.state_dict()[key], value), key
    assert any(not torch.equal(net.head.state_dict()[k], v) for k, v in head.items())
    net.eval()
    net.train()  # what the engine does between epochs
    assert not net.backbone.training
