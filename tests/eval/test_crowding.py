import numpy as np
import pytest
import torch

from pancls.eval.crowding import (
    crowding_figure,
    mean_angle_to_other_centres,
    min_angle_to_other_centres,
    plot_crowding,
    simplex_angle,
)


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


def test_min_angle_is_the_nearest_other_centre():
    c = torch.tensor([[1.0, 0.0], [0.99, 0.14], [-1.0, 0.0]])
    near = np.degrees(np.arccos(0.99 / np.hypot(0.99, 0.14)))  # 8.05 deg
    np.testing.assert_allclose(min_angle_to_other_centres(c), [near, near, 180.0 - near])


def test_the_regular_simplex_reaches_the_optimum():
    k = 5
    vertices = torch.eye(k) - 1.0 / k  # K points, pairwise cos = -1/(K-1) after normalising
    assert simplex_angle(k) == pytest.approx(104.4775, abs=1e-4)
    np.testing.assert_allclose(min_angle_to_other_centres(vertices), simplex_angle(k))
    np.testing.assert_allclose(mean_angle_to_other_centres(vertices), simplex_angle(k))
    assert simplex_angle(10) == pytest.approx(96.379, abs=1e-3) and simplex_angle(2) == 180.0
    random = torch.randn(k, 16, generator=torch.Generator().manual_seed(0))
    assert min_angle_to_other_centres(random).max() < simplex_angle(k)  # nothing beats the simplex


def test_figure_axis_optimum_groups_and_range():
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    names = [f"c{i}" for i in range(10)]
    angles = [84.0, 79.4, 74.9, 76.3, 71.7, 71.7, 74.9, 80.2, 78.1, 79.4]
    fig = crowding_figure(angles, counts, names, "cifar10, 12 epochs, top-1 45.6%", measure="min", dim=128)
    ax = fig.axes[0]
    assert ax.get_ylim() == (0.0, 110.0)  # from 0 to the optimum (96.4) + margin, not zoomed on 72..84
    assert "smallest angle to another class centre" in ax.get_ylabel() and "higher = less crowded" in ax.get_ylabel()
    assert ax.get_title() == "cifar10, 12 epochs, top-1 45.6%"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:3] == ["head (most frequent third)", "medium (middle third)", "tail (least frequent third)"]
    assert labels[3] == "optimum for K = 10: arccos(-1/(K-1)) = 96.4°"
    (line,) = ax.get_lines()
    assert line.get_ydata()[0] == pytest.approx(96.379, abs=1e-3)
    tail = ax.collections[2].get_offsets()  # the tail third: the three smallest classes, in red
    assert sorted(tail[:, 0].tolist()) == [50, 83, 139]
    low = crowding_figure(angles, counts, names, "t", measure="min", dim=4)
    assert "out of reach in d = 4 < K-1" in low.axes[0].get_legend().get_texts()[3].get_text()
    assert crowding_figure([170.0, 175.0], [10, 5], ["a", "b"], "t").axes[0].get_ylim() == (0.0, 180.0)
    import matplotlib.pyplot as plt

    plt.close("all")


def _unit(deg):
    r = np.deg2rad(np.asarray(deg, dtype=float))
    return np.stack([np.cos(r), np.sin(r)], axis=1)


def test_angular_regions_by_hand():
    from pancls.eval.crowding import angular_regions

    # class 0: samples at -10 and +10 deg, centre at 0; class 1: samples at 70 and 110, centre at 80 (mean
    # direction 90); class 2: a centre at 180 and no sample
    x = _unit([-10, 10, 70, 110]) * np.array([[1.0], [3.0], [0.5], [2.0]])  # norms must not matter
    r = angular_regions(x, [0, 0, 1, 1], _unit([0, 80, 180]))
    np.testing.assert_allclose(r["angle_to_centre_deg"][:2], [10.0, 20.0], atol=1e-9)  # |70-80|, |110-80| -> 20
    np.testing.assert_allclose(r["spread_deg"][:2], [10.0, 20.0], atol=1e-9)
    np.testing.assert_allclose(r["min_angle_between_centres_deg"], [80.0, 80.0, 100.0], atol=1e-9)
    np.testing.assert_allclose(r["min_angle_between_means_deg"][:2], [90.0, 90.0], atol=1e-9)
    assert np.isnan(r["angle_to_centre_deg"][2]) and np.isnan(r["spread_deg"][2])
    assert np.isnan(r["min_angle_between_means_deg"][2])


def test_angular_regions_refuses_mismatched_shapes():
    from pancls.eval.crowding import angular_regions

    with pytest.raises(ValueError, match="must agree"):
        angular_regions(np.ones((3, 2)), [0, 1, 1], np.ones((2, 3)))


@pytest.mark.parametrize("name", ["linear", "cosine", "tsp"])
def test_every_head_embeds_into_the_space_of_its_centres(name):
    from pancls.heads import HEADS

    torch.manual_seed(0)
    head = HEADS.create(name, in_features=12, num_classes=4)
    f = torch.randn(5, 12) * 3.0
    z = head.embed(f)
    assert z.shape == (5, head.centres().shape[1])
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    cos = z @ head.centres().T
    if name == "cosine":  # its logits are s * these cosines
        torch.testing.assert_close(head(f), head.scale * cos)
    elif name == "tsp":  # its kernel acts on these cosines
        torch.testing.assert_close(head.cosines(f), cos.clamp(-1.0, 1.0))
    else:  # the linear head's logits are w_k . f + b_k = ||w_k|| ||f|| cos + b_k
        expected = head.weight.norm(dim=1) * f.norm(dim=1, keepdim=True) * cos + head.bias
        torch.testing.assert_close(head(f), expected, rtol=1e-5, atol=1e-5)
