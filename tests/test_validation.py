"""pancls.validation: the one home of argument checks, and how the config boundary names the key."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pancls.config import from_dict
from pancls.errors import UserError
from pancls.schemas import LossConfig, ModelConfig, build_model_and_loss
from pancls.validation import InvalidParameter, check_choice, check_class_counts, check_scalar


@pytest.mark.parametrize("kwargs, good, bad, message", [
    ({"target_type": int, "min_val": 1}, [1, np.int64(7), torch.tensor(3)], [0, 2.5, "3", True, None],
     "must be an integer >= 1"),
    ({"target_type": float, "min_val": 0, "include_boundaries": "neither"}, [1e-9, 3, np.float32(2)],
     [0, -1, math.nan, math.inf, True, "1"], "must be a finite number > 0"),
    ({"target_type": float, "min_val": 0, "max_val": 1, "include_boundaries": "left"}, [0, 0.5, 0.9999],
     [1, 1.5, -0.1, math.nan], "must be a finite number in [0, 1)"),
    ({"target_type": float, "max_val": 10, "include_boundaries": "neither"}, [-5, 9.9], [10, math.inf],
     "must be a finite number < 10"),
])
def test_check_scalar_bounds_types_and_message(kwargs, good, bad, message):
    for value in good:
        assert check_scalar(value, "x", **kwargs) == value
    for value in bad:
        with pytest.raises(InvalidParameter) as info:
            check_scalar(value, "x", **kwargs)
        assert str(info.value) == f"x: {message}, got {value!r}"
        assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_check_choice_suggests_the_closest_name():
    assert check_choice("sqrt", "train.sampler", ("none", "sqrt")) == "sqrt"
    with pytest.raises(InvalidParameter) as info:
        check_choice("sqtr", "train.sampler", ("none", "sqrt"))
    assert str(info.value) == "train.sampler: unknown sampler 'sqtr' (did you mean 'sqrt'?); choose one of: none, sqrt"


def test_check_class_counts():
    assert check_class_counts(np.array([5, 1])) == [5, 1]
    for bad, reason in (([5], "needs at least 2 classes"), ([5, 0], "class(es) [1] have no training samples"),
                        ([5, 2.5], "must be a sequence of integers"), ("53", "must be a sequence of integers"),
                        ([5, True], "must be a sequence of integers")):
        with pytest.raises(InvalidParameter) as info:
            check_class_counts(bad)
        assert reason in info.value.reason and info.value.where == "class_counts"


def test_within_prefixes_only_the_keys_the_caller_gave():
    exc = InvalidParameter("must be > 0", "scale_init")
    assert exc.within("model.head_kwargs").where == "model.head_kwargs.scale_init"
    assert exc.within("loss.kwargs", {"max_m": 1}) is exc  # not a key of that section: unchanged


def test_config_boundary_names_the_yaml_key():
    """The library names its argument; the command's config loader puts the section in front of it."""
    with pytest.raises(UserError) as info:
        build_model_and_loss(ModelConfig(backbone="resnet20_cifar", head="tsp",
                                         head_kwargs={"form": "kernel", "scale_init": 0.5}), LossConfig(), [10, 5])
    assert info.value.where == "model.head_kwargs.scale_init" and "must be a finite number > 1" in info.value.reason
    with pytest.raises(UserError) as info:
        build_model_and_loss(ModelConfig(backbone="resnet20_cifar", head="linear"),
                             LossConfig(name="ldam", kwargs={"max_m": -1}), [10, 5])
    assert info.value.where == "loss.kwargs.max_m"
    with pytest.raises(UserError) as info:
        build_model_and_loss(ModelConfig(backbone="resnet20_cifar", head="linear"), LossConfig(), [10, 0])
    assert info.value.where == "class_counts"  # computed from the data, not a key of loss.kwargs
    from pancls.train.engine import TrainConfig
    with pytest.raises(UserError) as info:
        from_dict(TrainConfig, {"momentum": 1.0}, "config.train")
    assert str(info.value) == "config.train.momentum: must be a finite number in [0, 1), got 1.0"
