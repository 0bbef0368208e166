import numpy as np
import pytest
import torch

from pancls.eval.diagnostics import centre_parameter, group_prediction_share, head_diagnostics
from pancls.heads import HEADS


@pytest.mark.parametrize("name", ["linear", "cosine", "tsp"])
def test_diagnostics_shapes_and_shares(name):
    torch.manual_seed(0)
    head = HEADS.create(name, in_features=16, num_classes=3)
    feats = torch.randn(60, 16)
    labels = torch.tensor([0] * 40 + [1] * 15 + [2] * 5)
    report = head_diagnostics(head, feats, labels, train_counts=[500, 50, 5])
    shares = [report[g]["loss_share"] for g in ("head", "middle", "tail")]
    assert sum(shares) == pytest.approx(1.0)
    assert all(0 <= report[g]["mean_p_true"] <= 1 for g in ("head", "middle", "tail"))
    assert centre_parameter(head).shape[0] == 3
    assert report["tail"]["push_on_tail_centres"] > 0
    assert ("mean_cos_to_own_centre" in report) == (name == "tsp")


def test_push_is_zero_from_samples_that_are_certain():
    # a linear head whose many-shot samples are classified with near-certainty pushes nothing
    head = HEADS.create("linear", in_features=3, num_classes=3)
    with torch.no_grad():
        head.weight.copy_(50.0 * torch.eye(3))
        head.bias.zero_()
    feats = torch.tensor([[1.0, 0.0, 0.0]] * 10 + [[0.0, 1.0, 0.0]] * 4 + [[0.0, 0.0, 0.01]] * 2)
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 2)
    report = head_diagnostics(head, feats, labels, train_counts=[500, 300, 5])
    assert report["head"]["push_on_tail_centres"] < 1e-15
    assert report["tail"]["push_on_tail_centres"] > 1e-3


def test_prediction_share():
    logits = np.eye(3)[[0, 0, 1, 2]]
    assert group_prediction_share(logits, [500, 50, 5]) == {"head": 0.5, "middle": 0.25, "tail": 0.25}


def test_terciles_follow_counts_not_index():
    from pancls.eval.diagnostics import class_terciles

    t = class_terciles([5, 500, 50, 1, 1000, 100])
    assert t["head"].tolist() == [1, 4] and t["middle"].tolist() == [2, 5] and t["tail"].tolist() == [0, 3]


def test_mean_cos_to_own_centre_is_one_on_the_centres():
    head = HEADS.create("tsp", in_features=4, num_classes=3, dim=4)
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(4))
        head.mu.copy_(torch.eye(3, 4))
    report = head_diagnostics(head, torch.eye(3, 4) * 5.0, torch.tensor([0, 1, 2]), [50, 20, 5])
    assert report["mean_cos_to_own_centre"] == pytest.approx(1.0)
