"""pancls.eval.paired against hand-computed values."""
import math

import pytest

from pancls.eval.paired import paired_difference, sign_test


def test_paired_t_interval_by_hand():
    # differences 6.7, 6.6, 7.1: mean 6.8, sd sqrt(((-.1)^2 + (-.2)^2 + .3^2) / 2) = sqrt(0.07), t_{.975,2} = 4.3027
    r = paired_difference([57.0, 57.7, 58.0], [50.3, 51.1, 50.9])
    assert r["n"] == 3 and r["wins"] == 3
    assert r["mean"] == pytest.approx(6.8)
    assert r["sd"] == pytest.approx(math.sqrt(0.07))
    half = 4.302652729911275 * math.sqrt(0.07) / math.sqrt(3)
    assert (r["lo"], r["hi"]) == pytest.approx((6.8 - half, 6.8 + half))
    assert r["sign_test_p"] == pytest.approx(0.25)  # 3 of 3 positive: 2 * (1/2)^3


def test_the_interval_is_centred_on_the_mean_and_widens_with_spread():
    narrow = paired_difference([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])  # d = 1, 1, 1: sd 0, a point interval
    assert narrow["lo"] == narrow["hi"] == pytest.approx(1.0)
    wide = paired_difference([1.0, 2.0, 3.0], [0.0, 2.0, 1.0])  # d = 1, 0, 2
    assert wide["lo"] < 1.0 < wide["hi"] and wide["mean"] == pytest.approx(1.0)


def test_one_seed_gives_no_interval_and_signs_are_counted():
    r = paired_difference([0.5], [0.6])
    assert r["mean"] == pytest.approx(-0.1) and r["sd"] is None and r["lo"] is None and r["wins"] == 0
    assert sign_test([0.0, 0.0]) is None  # all ties: nothing to test
    assert sign_test([1, 1, 1, 1, 1, 1]) == pytest.approx(2 / 64)  # 6 of 6: the first count below 0.05
    assert sign_test([1, -1, 0]) == pytest.approx(1.0)  # the tie is dropped


@pytest.mark.parametrize("a, b, confidence", [([1.0], [1.0, 2.0], 0.95), ([], [], 0.95), ([1.0], [2.0], 1.0)])
def test_bad_input_is_refused(a, b, confidence):
    with pytest.raises(ValueError):
        paired_difference(a, b, confidence)
