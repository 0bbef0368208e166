import numpy as np
import pytest

from pancls.eval.metrics import classification_report, per_class_accuracy, shot_groups


def test_shot_groups_follow_oltr_thresholds():
    groups = shot_groups([5000, 101, 100, 20, 19, 1])
    assert groups["many"].tolist() == [0, 1]
    assert groups["medium"].tolist() == [2, 3]
    assert groups["few"].tolist() == [4, 5]


def test_report_matches_hand_computation():
    y = np.array([0, 0, 1, 1, 2, 2])
    logits = np.eye(3)[[0, 1, 1, 1, 0, 0]]  # predictions 0,1,1,1,0,0
    rep = classification_report(y, logits, train_counts=[500, 50, 5])
    assert rep["top1"] == pytest.approx(3 / 6)
    assert rep["per_class_accuracy"] == [0.5, 1.0, 0.0]
    assert rep["many_shot_top1"] == 0.5 and rep["medium_shot_top1"] == 1.0 and rep["few_shot_top1"] == 0.0
    assert rep["balanced_accuracy"] == pytest.approx(0.5)


def test_empty_group_is_none_and_absent_class_is_ignored():
    y = np.array([0, 0, 1])
    logits = np.eye(3)[[0, 0, 0]]
    rep = classification_report(y, logits, train_counts=[500, 400, 300])
    assert rep["medium_shot_top1"] is None and rep["few_shot_top1"] is None
    assert rep["per_class_accuracy"][2] is None  # class 2 has no test sample
    assert rep["many_shot_top1"] == pytest.approx(0.5)
    assert np.isnan(per_class_accuracy(y, np.zeros(3, int), 3)[2])


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError):
        classification_report(np.zeros(4, int), np.zeros((4, 3)), train_counts=[1, 2])
