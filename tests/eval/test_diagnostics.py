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
    assert centre_parameter(head).shape[0] == 3
    assert report["tail"]["push_on_tail_centres"] > 0
    assert ("mean_cos_to_own_centre" in report) == (name == "tsp")


def test_known_answer_on_a_head_that_knows_nothing():
    """All logits 0: p = 1/3 everywhere, CE = log 3 per sample, so each group's loss share is its sample share,
    and dCE/dW_tail = sum_i (p_tail - [y_i = tail]) x_i is worked by hand per group."""
    head = HEADS.create("linear", in_features=2, num_classes=3)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    feats = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 2 + [[1.0, 1.0]])
    labels = torch.tensor([0] * 4 + [1] * 2 + [2])
    report = head_diagnostics(head, feats, labels, train_counts=[500, 50, 5])
    assert report["train_ce"] == pytest.approx(np.log(3)) and report["mean_logit_range"] == 0
    for group, n, push in (("head", 4, 4 / 3), ("middle", 2, 2 / 3), ("tail", 1, 2 / 3 * np.sqrt(2))):
        assert report[group]["loss_share"] == pytest.approx(n / 7)
        assert report[group]["mean_p_true"] == pytest.approx(1 / 3)
        assert report[group]["push_on_tail_centres"] == pytest.approx(push)


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
