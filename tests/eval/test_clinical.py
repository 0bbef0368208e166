import math
import time

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, matthews_corrcoef

from pancls.eval.clinical import (
    BOOTSTRAP_METRICS,
    INTENSITY_FEATURE_NAMES,
    bootstrap_intervals,
    brier_score,
    clinical_metrics,
    expected_calibration_error,
    fit_temperature,
    intensity_baseline,
    majority_baseline,
    mean_sd_across_folds,
    roi_intensity_features,
    softmax,
    wilson_interval,
)

CLASSES3 = ["A", "B", "C"]
# confusion (rows true): [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
Y3 = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
PRED3 = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])


def _probs_for(pred, k, top=0.7):
    p = np.full((len(pred), k), (1 - top) / (k - 1))
    p[np.arange(len(pred)), pred] = top
    return p


def test_three_class_example_matches_hand_computation():
    m = clinical_metrics(Y3, _probs_for(PRED3, 3), CLASSES3)
    assert m["n"] == 10
    assert m["confusion"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert m["top1"] == pytest.approx(7 / 10)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    # F1_k = 2TP / (2TP + FP + FN): A 6/8, B 4/6, C 4/6
    assert m["macro_f1"] == pytest.approx((6 / 8 + 4 / 6 + 4 / 6) / 3)
    # MCC: t = p = (4, 3, 3), c = 7, s = 10 -> (70 - 34) / sqrt(66 * 66)
    assert m["mcc"] == pytest.approx(36 / 66)
    # Brier: correct row 0.3^2 + 2 * 0.15^2 = 0.135, wrong row 0.7^2 + 0.85^2 + 0.15^2 = 1.235
    assert m["brier"] == pytest.approx((7 * 0.135 + 3 * 1.235) / 10)
    assert m["ece"] == pytest.approx(0.0)  # every confidence 0.7, accuracy 0.7
    a = m["per_class"]["A"]
    assert a["n"] == 4 and a["sensitivity"] == pytest.approx(3 / 4) and a["specificity"] == pytest.approx(5 / 6)
    assert a["sensitivity_ci"] == pytest.approx(list(wilson_interval(3, 4)))
    assert a["specificity_ci"] == pytest.approx(list(wilson_interval(5, 6)))
    assert m["confusion_row_normalised"][0] == pytest.approx([0.75, 0.25, 0.0])
    assert m["predicted_share"] == pytest.approx({"A": 0.4, "B": 0.3, "C": 0.3})
    assert m["top5"] == 1.0 and m["top2"] >= m["top1"]
    assert m["collapsed"] is False and m["collapsed_to"] is None
    # and the same as scikit-learn's own numbers
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(Y3, PRED3))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(Y3, PRED3))
    assert m["macro_f1"] == pytest.approx(f1_score(Y3, PRED3, average="macro"))


def test_top2_and_auc_on_a_ranked_example():
    p = np.array([
        [0.5, 0.3, 0.15, 0.05],  # true 1: second -> top2 hit
        [0.1, 0.2, 0.3, 0.4],    # true 0: last -> miss
        [0.1, 0.6, 0.2, 0.1],    # true 1: top1 hit
        [0.2, 0.1, 0.3, 0.4],    # true 2: second -> top2 hit
    ])
    y = np.array([1, 0, 1, 2])
    m = clinical_metrics(y, p, ["a", "b", "c", "d"])
    assert m["top1"] == pytest.approx(1 / 4)
    assert m["top2"] == pytest.approx(3 / 4)
    assert m["top5"] == 1.0
    # class b one-vs-rest: positives score 0.3, 0.6; negatives 0.2, 0.1 -> perfect ranking
    assert m["per_class"]["b"]["auc_ovr"] == pytest.approx(1.0)
    assert m["per_class"]["d"]["auc_ovr"] is None and m["per_class"]["d"]["sensitivity"] is None


def test_wilson_interval_by_formula():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    z, n, p = 1.959964, 10, 0.8
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-12)
    lo0, hi0 = wilson_interval(0, 5)
    assert lo0 == pytest.approx(0.0, abs=1e-12) and hi0 == pytest.approx(z * z / 5 / (1 + z * z / 5))
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_ece_on_a_constructed_example():
    # two cases at confidence 0.95 (one right), two at 0.55 (both right): each bin's gap is 0.45
    p = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    y = np.array([0, 1, 0, 1])
    assert expected_calibration_error(p, y, n_bins=10) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    # one bin: |mean accuracy - mean confidence| = |0.75 - 0.75| = 0
    assert expected_calibration_error(p, y, n_bins=1) == pytest.approx(0.0)


def test_brier_score_extremes():
    y = np.array([0, 1])
    assert brier_score(np.eye(2)[[0, 1]], y) == pytest.approx(0.0)
    assert brier_score(np.eye(2)[[1, 0]], y) == pytest.approx(2.0)
    assert brier_score(np.full((2, 2), 0.5), y) == pytest.approx(0.5)


def test_softmax_is_stable_and_uses_the_temperature():
    p = softmax(np.array([[1000.0, 1000.0, 0.0]]))
    assert np.all(np.isfinite(p)) and p[0] == pytest.approx([0.5, 0.5, 0.0])
    z = np.array([[2.0, 0.0]])
    assert softmax(z, temperature=2.0)[0, 0] == pytest.approx(math.exp(1) / (math.exp(1) + 1))


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_temperature_scaling_recovers_a_known_temperature(t_true):
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3.0, size=(4000, 5))
    p = softmax(z, t_true)
    y = (p.cumsum(axis=1) > rng.random((4000, 1))).argmax(axis=1)  # y ~ Categorical(softmax(z / T))
    t = fit_temperature(z, y)
    assert abs(t - t_true) / t_true < 0.10
    assert fit_temperature(z, y) == t  # deterministic
    assert fit_temperature(np.zeros((0, 5)), np.zeros(0, dtype=int)) == 1.0


def test_collapse_flag():
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    m = clinical_metrics(y, _probs_for(np.zeros(10, dtype=int), 3), CLASSES3)
    assert m["collapsed"] is True and m["collapsed_to"] == "A"
    assert m["predicted_share"]["A"] == 1.0
    nine = clinical_metrics(y, _probs_for(np.array([1] * 9 + [0]), 3), CLASSES3)
    assert nine["collapsed"] is True and nine["collapsed_to"] == "B"  # 90 % counts
    eight = clinical_metrics(y, _probs_for(np.array([1] * 8 + [0, 2]), 3), CLASSES3)
    assert eight["collapsed"] is False and eight["collapsed_to"] is None


def test_absent_class_does_not_crash():
    # no patient of class C (index 2) in this fold, and the model had no output for it
    y = np.array([0, 0, 1, 1, 3, 3, 0, 1])
    p = softmax(np.random.default_rng(1).normal(size=(8, 4)))
    p[:, 2] = np.nan
    classes = ["A", "B", "C", "D"]
    m = clinical_metrics(y, p, classes)
    c = m["per_class"]["C"]
    assert c["n"] == 0 and c["sensitivity"] is None and c["sensitivity_ci"] is None and c["auc_ovr"] is None
    assert c["specificity"] == 1.0  # never predicted
    assert m["confusion"][2] == [0, 0, 0, 0] and m["confusion_row_normalised"][2] == [0.0, 0.0, 0.0, 0.0]
    assert len(m["confusion"]) == 4
    b = bootstrap_intervals(y, p, None, classes, n_boot=50)
    assert b["balanced_accuracy"]["estimate"] == pytest.approx(m["balanced_accuracy"])
    import json

    json.dumps(m)  # plain python types


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_row_without_finite_probabilities_is_refused_not_scored_as_class_0(bad):
    """A diverged network's output: read as zeros, its argmax would count as a prediction of class 0."""
    y = np.array([0, 1, 0])
    p = softmax(np.random.default_rng(0).normal(size=(3, 3)))
    p[1] = bad
    for metric in (lambda: clinical_metrics(y, p, CLASSES3), lambda: bootstrap_intervals(y, p, None, CLASSES3)):
        with pytest.raises(ValueError, match="1 of 3 rows hold no finite probabilities"):
            metric()


def _toy(n=530, k=5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    z = rng.normal(size=(n, k))
    z[np.arange(n), y] += 1.0
    groups = rng.integers(0, n // 2, n)
    return y, softmax(z), groups


def test_bootstrap_is_deterministic_contains_estimate_and_is_fast():
    y, p, g = _toy()
    classes = list("ABCDE")
    t0 = time.perf_counter()
    a = bootstrap_intervals(y, p, g, classes, metrics=BOOTSTRAP_METRICS, n_boot=1000, seed=3)
    assert time.perf_counter() - t0 < 3.0
    b = bootstrap_intervals(y, p, g, classes, metrics=BOOTSTRAP_METRICS, n_boot=1000, seed=3)
    assert a == b
    c = bootstrap_intervals(y, p, g, classes, n_boot=1000, seed=4)
    assert c["top1"] != a["top1"]
    m = clinical_metrics(y, p, classes)
    for name in ("balanced_accuracy", "macro_f1", "top1", "top2", "mcc", "brier"):
        assert a[name]["estimate"] == pytest.approx(m[name])
        assert a[name]["lo"] <= a[name]["estimate"] <= a[name]["hi"]
        assert a[name]["n_boot"] == 1000
    assert a["ece"]["estimate"] == pytest.approx(m["ece"])


def test_bootstrap_matches_a_naive_patient_resampling():
    y, p, g = _toy(n=120, k=4, seed=5)
    classes = list("ABCD")
    n_boot, seed = 80, 11
    y[g == g[0]] = 3  # class D: only the rows of one patient, absent from many resamples
    y[(y == 3) & (g != g[0])] = 0
    fast = bootstrap_intervals(y, p, g, classes, metrics=("balanced_accuracy", "macro_f1", "mcc", "top2"),
                               n_boot=n_boot, seed=seed, per_class=True)
    ids = np.unique(g)
    draws = np.random.default_rng(seed).integers(0, ids.size, size=(n_boot, ids.size))
    vals = {"balanced_accuracy": [], "macro_f1": [], "mcc": [], "top2": []}
    per_class = {(c, m): [] for c in classes for m in ("sensitivity", "specificity")}
    for row in draws:
        idx = np.concatenate([np.flatnonzero(g == ids[j]) for j in row])
        m = clinical_metrics(y[idx], p[idx], classes)
        for key in vals:
            vals[key].append(m[key])
        for c, name in per_class:
            if m["per_class"][c][name] is not None:  # undefined without a case of the class: dropped
                per_class[c, name].append(m["per_class"][c][name])
    for key, v in vals.items():
        lo, hi = np.quantile(v, [0.025, 0.975])
        assert fast[key]["lo"] == pytest.approx(lo) and fast[key]["hi"] == pytest.approx(hi)
    whole = clinical_metrics(y, p, classes)["per_class"]
    for (c, name), v in per_class.items():
        got = fast["per_class"][c][name]
        assert got["n_boot"] == len(v) and got["estimate"] == pytest.approx(whole[c][name])
        assert [got["lo"], got["hi"]] == pytest.approx(list(np.quantile(v, [0.025, 0.975])))
    assert fast["per_class"]["D"]["sensitivity"]["n_boot"] < n_boot  # some resamples hold no D


def test_bootstrap_moves_a_patients_rows_together():
    y, p, g = _toy(n=100, k=3, seed=2)
    classes = CLASSES3
    once = bootstrap_intervals(y, p, np.arange(100), classes, n_boot=300, seed=0)
    # every patient scanned twice: grouped, the duplicates are drawn together and nothing changes
    twice = bootstrap_intervals(np.repeat(y, 2), np.repeat(p, 2, axis=0), np.repeat(np.arange(100), 2),
                                classes, n_boot=300, seed=0)
    for key in once:
        assert twice[key]["lo"] == pytest.approx(once[key]["lo"])
        assert twice[key]["hi"] == pytest.approx(once[key]["hi"])
    # ungrouped, the duplicated rows would be treated as independent cases: narrower intervals
    loose = bootstrap_intervals(np.repeat(y, 2), np.repeat(p, 2, axis=0), None, classes, n_boot=300, seed=0)
    width = lambda r: r["top1"]["hi"] - r["top1"]["lo"]  # noqa: E731
    assert width(loose) < width(once)


def test_mean_sd_across_folds():
    per_fold = [{"fold": i, "metrics": {"top1": v, "per_class": {"A": {"sensitivity": s}}}}
                for i, (v, s) in enumerate([(0.5, 1.0), (0.7, None), (0.9, 0.5)])]
    out = mean_sd_across_folds(per_fold, ["top1", "per_class.A.sensitivity", "missing"])
    assert out["top1"]["mean"] == pytest.approx(0.7) and out["top1"]["sd"] == pytest.approx(0.2)
    assert out["per_class.A.sensitivity"]["mean"] == pytest.approx(0.75)
    assert out["missing"] == {"mean": None, "sd": None}
    one = mean_sd_across_folds([{"top1": 0.4}], ["top1"])
    assert one["top1"] == {"mean": pytest.approx(0.4), "sd": None}


def test_majority_baseline_predicts_the_training_majority():
    probs = majority_baseline([1, 1, 1, 0, 2], [0, 2, 2, 1], K=4)
    assert probs.shape == (4, 4)
    assert (probs.argmax(axis=1) == 1).all() and (probs.sum(axis=1) == 1).all()
    m = clinical_metrics(np.array([0, 2, 2, 1]), probs, ["a", "b", "c", "d"])
    assert m["collapsed_to"] == "b" and m["balanced_accuracy"] == pytest.approx(1 / 3)


def test_roi_intensity_features_by_hand():
    image = np.arange(-200, 200, 10, dtype=np.float64).reshape(4, 10)  # 40 values -200..190
    mask = np.zeros_like(image, dtype=bool)
    mask[1:3] = True  # values -100..90
    f = roi_intensity_features(image, mask)
    v = image[mask]
    assert f.shape == (len(INTENSITY_FEATURE_NAMES),)
    assert f[0] == pytest.approx(v.mean()) and f[1] == pytest.approx(v.std())
    assert f[2:7] == pytest.approx(np.percentile(v, [5, 25, 50, 75, 95]))
    # HU bands [-inf,-100), [-100,20), [20,60), [60,150), [150,inf)
    assert f[7:12] == pytest.approx(np.array([0, 12, 4, 4, 0]) / 20)
    assert f[12] == 20
    whole = roi_intensity_features(image, None)
    assert whole[12] == 40 and whole[7] == pytest.approx(10 / 40)
    unit = roi_intensity_features(np.linspace(0, 1, 10), None)  # windowed image: unit bands
    assert unit[7:12].sum() == pytest.approx(1.0) and unit[7] == pytest.approx(0.2)
    assert (roi_intensity_features(image, np.zeros_like(mask)) == 0).all()
    two = roi_intensity_features(np.stack([image, image + 1000]), mask)  # channels first
    assert two.shape == (2 * len(INTENSITY_FEATURE_NAMES),) and two[13] == pytest.approx(v.mean() + 1000)


def _synthetic_cases(n, rng):
    y = rng.integers(0, 3, n)
    feats = []
    for label in y:
        image = rng.normal(loc=[-40.0, 45.0, 110.0][label], scale=15.0, size=(8, 8, 8))
        mask = np.zeros(image.shape, dtype=bool)
        mask[2:6, 2:6, 2:6] = True
        feats.append(roi_intensity_features(image, mask))
    return np.array(feats), y


def test_intensity_baseline_beats_chance_on_separable_cases():
    rng = np.random.default_rng(0)
    X_train, y_train = _synthetic_cases(60, rng)
    X_test, y_test = _synthetic_cases(30, rng)
    probs = intensity_baseline(X_train, y_train, X_test, K=4)  # class 3 never seen
    assert probs.shape == (30, 4)
    assert probs.sum(axis=1) == pytest.approx(np.ones(30))
    assert (probs[:, 3] == 0).all()
    m = clinical_metrics(y_test, probs, ["fat", "soft", "enh", "none"])
    assert m["balanced_accuracy"] > 0.8
    assert (intensity_baseline(X_train, y_train, X_test, K=4) == probs).all()  # deterministic
    single = intensity_baseline(X_train, np.full(60, 2), X_test, K=4)
    assert (single.argmax(axis=1) == 2).all()
