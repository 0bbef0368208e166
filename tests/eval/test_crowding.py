import numpy as np
import pytest
import torch

from pancls.eval.crowding import mean_angle_to_other_centres, plot_crowding


def test_orthogonal_centres_are_90_degrees_apart():
    np.testing.assert_allclose(mean_angle_to_other_centres(torch.eye(4) * 3.0), 90.0)


def test_crowded_class_has_smaller_mean_angle():
    # centres 0 and 1 nearly coincide, 2 is opposite to both
    c = torch.tensor([[1.0, 0.0], [0.99, 0.14], [-1.0, 0.0]])
    angles = mean_angle_to_other_centres(c)
    expected_0 = (np.degrees(np.arccos(0.99 / np.hypot(0.99, 0.14))) + 180.0) / 2
    assert angles[0] == pytest.approx(expected_0)
    assert angles[2] > angles[0]


def test_plot_written(tmp_path):
    plot_crowding([80.0, 95.0], [500, 5], ["a", "b"], tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
