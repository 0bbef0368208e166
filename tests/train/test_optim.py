"""Learning-rate schedule (checked against the LDAM-DRW code), optimiser groups and config validation."""
import math

import pytest
import torch
from torch import nn

from pancls.config import from_dict
from pancls.errors import UserError
from pancls.train.engine import TrainConfig
from pancls.train.optim import LRSchedule, build_optimizer


def ldam_drw_lr(epoch, base=0.1):
    """``adjust_learning_rate`` of the LDAM-DRW reference code (cifar_train.py), verbatim in logic."""
    epoch = epoch + 1
    if epoch <= 5:
        return base * epoch / 5
    if epoch > 180:
        return base * 0.0001
    if epoch > 160:
        return base * 0.01
    return base


def test_epoch_warmup_is_ldam_drw_for_every_epoch_and_step():
    schedule = LRSchedule(TrainConfig(warmup="epoch"), steps_per_epoch=97)
    for epoch in range(200):
        for step in (0, 50, 96):
            assert math.isclose(schedule.lr_at(epoch, step), ldam_drw_lr(epoch), rel_tol=1e-12), (epoch, step)


@pytest.mark.parametrize("epoch, lr", [(0, 0.02), (4, 0.1), (5, 0.1), (159, 0.1), (160, 1e-3), (179, 1e-3),
                                       (180, 1e-5), (199, 1e-5)])
def test_ldam_drw_values_at_chosen_epochs(epoch, lr):
    assert math.isclose(LRSchedule(TrainConfig(warmup="epoch"), 10).lr_at(epoch), lr, rel_tol=1e-12)


def test_step_warmup_ramps_linearly_per_iteration_issue_19():
    # The issue-19 recipe: 1 warm-up epoch of 97 iterations, then cosine. The per-epoch staircase ran the
    # whole first epoch at the full lr (no warm-up at all for W = 1), which cost 5-10 points of top-1.
    s = LRSchedule(TrainConfig(schedule="cosine", epochs=15, warmup_epochs=1, lr=0.1), steps_per_epoch=97)
    first = [s.lr_at(0, i) for i in range(97)]
    assert math.isclose(first[0], 0.1 / 97, rel_tol=1e-12) and math.isclose(first[-1], 0.1, rel_tol=1e-12)
    assert all(math.isclose(b - a, 0.1 / 97, rel_tol=1e-9) for a, b in zip(first, first[1:], strict=False))
    assert math.isclose(s.lr_at(1, 0), 0.1, rel_tol=1e-12)  # cosine starts where the ramp ends
    # two warm-up epochs of 10 steps: global iteration i -> lr * (i + 1) / 20, continuous across the epoch edge
    s2 = LRSchedule(TrainConfig(warmup_epochs=2, lr=0.4), steps_per_epoch=10)
    assert [round(s2.lr_at(e, i), 12) for e, i in ((0, 0), (0, 9), (1, 0), (1, 9), (2, 0))] == [0.02, 0.2, 0.22, 0.4, 0.4]


def test_cosine_after_warmup():
    s = LRSchedule(TrainConfig(schedule="cosine", epochs=12, warmup_epochs=2, lr=0.4), steps_per_epoch=10)
    assert math.isclose(s.lr_at(0, 9), 0.2) and math.isclose(s.lr_at(1, 9), 0.4) and math.isclose(s.lr_at(2, 0), 0.4)
    assert math.isclose(s.lr_at(7, 0), 0.2)  # half-way through the 10 post-warm-up epochs
    values = [s.lr_at(e, i) for e in range(2, 12) for i in range(10)]
    assert all(b < a for a, b in zip(values, values[1:], strict=False)) and 0 < values[-1] < 1e-3


def test_constant_schedule_and_no_warmup():
    s = LRSchedule(TrainConfig(schedule="constant", warmup_epochs=0, lr=0.3), 5)
    assert {s.lr_at(e, i) for e in (0, 100, 199) for i in (0, 4)} == {0.3}


def test_resume_refuses_a_different_epoch_length():
    s = LRSchedule(TrainConfig(), 10)
    s.load_state_dict(LRSchedule(TrainConfig(), 10).state_dict())
    with pytest.raises(UserError, match="batches per epoch"):
        s.load_state_dict(LRSchedule(TrainConfig(), 11).state_dict())


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)
        self.scale = nn.Parameter(torch.tensor(16.0))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


@pytest.mark.parametrize("wd_on_all", [True, False])
def test_weight_decay_groups(wd_on_all):
    model = _Tiny()
    opt = build_optimizer(model, TrainConfig(weight_decay=5e-4, wd_on_all=wd_on_all))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 5e-4 for p in g["params"]}
    plain = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    small = {id(model.fc.bias), id(model.norm.weight), id(model.norm.bias), id(model.scale)}
    if wd_on_all:
        assert decayed == small | {id(model.fc.weight)} and not plain
    else:
        assert decayed == {id(model.fc.weight)} and plain == small
    assert id(model.frozen) not in decayed | plain
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9


def test_adamw():
    opt = build_optimizer(_Tiny(), TrainConfig(optimizer="adamw", lr=1e-3))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 1e-3


def test_yaml_mapping_builds_the_config():
    cfg = from_dict(TrainConfig, {"epochs": 10, "milestones": [6, 8], "clip_grad_norm": 5}, "config.train")
    assert cfg.milestones == (6, 8) and cfg.clip_grad_norm == 5.0 and cfg.lr == 0.1


@pytest.mark.parametrize("mapping, key", [
    ({"milestones": [180, 160]}, "train.milestones"),
    ({"lr": 0}, "train.lr"),
    ({"epochs": 0}, "train.epochs"),
    ({"momentum": 0.0, "nesterov": True}, "train.nesterov"),
    ({"schedule": "cosine", "epochs": 5}, "train.warmup_epochs"),
    ({"schedule": "step", "epochs": 1, "warmup_epochs": 5}, "train.warmup_epochs"),  # ended inside its warm-up
    ({"schedule": "constant", "epochs": 2, "warmup_epochs": 3}, "train.warmup_epochs"),
    ({"clip_grad_norm": -1.0}, "train.clip_grad_norm"),
    ({"amp": "fp8"}, "amp"),
    ({"learning_rate": 0.1}, "learning_rate"),
])
def test_bad_values_name_the_key(mapping, key):
    with pytest.raises(UserError) as info:
        from_dict(TrainConfig, mapping, "config.train")
    assert key in str(info.value)


def test_literals_are_checked_when_built_in_python():
    # Built in Python, the error names the argument; from_dict puts the config section in front of it.
    with pytest.raises(UserError, match=r"^sampler: unknown sampler 'balanced' \(did you mean 'class_balanced'\?\)"):
        TrainConfig(sampler="balanced")
    with pytest.raises(UserError, match=r"^config\.train\.sampler: unknown sampler"):
        from_dict(TrainConfig, {"sampler": "balanced"}, "config.train")
