"""Long-tail losses against direct float64 references, DRW switching and validation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pancls.errors import UserError
from pancls.losses import LOSSES, create_loss, effective_number_weights

COUNTS = [500, 120, 40, 9, 2]  # a long tail, imbalance ratio 250
K = len(COUNTS)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(64, K, generator=generator, dtype=torch.float64)
    target = torch.randint(0, K, (64,), generator=generator)
    return logits, target


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _nll(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -_log_softmax(z)[np.arange(len(y)), y]


def _ref_weights(beta: float) -> np.ndarray:
    w = (1 - beta) / (1 - beta ** np.asarray(COUNTS, dtype=np.float64))
    return w * K / w.sum()


def _value(name, batch, **options) -> float:
    logits, target = batch
    return create_loss(name, COUNTS, **options)(logits, target).item()


def test_ce_matches_reference(batch):
    z, y = (t.numpy() for t in batch)
    assert _value("ce", batch) == pytest.approx(_nll(z, y).mean(), rel=1e-6)


def test_ce_label_smoothing_matches_reference(batch):
    z, y = (t.numpy() for t in batch)
    eps = 0.1
    q = np.full(z.shape, eps / K)
    q[np.arange(len(y)), y] += 1 - eps
    expected = -(q * _log_softmax(z)).sum(axis=1).mean()
    assert _value("ce", batch, label_smoothing=eps) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_matches_reference(batch, gamma):
    z, y = (t.numpy() for t in batch)
    log_p = _log_softmax(z)[np.arange(len(y)), y]
    expected = (-((1 - np.exp(log_p)) ** gamma) * log_p).mean()
    assert _value("focal", batch, gamma=gamma) == pytest.approx(expected, rel=1e-6)
    if gamma == 0.0:
        assert _value("focal", batch, gamma=0.0) == pytest.approx(_value("ce", batch), rel=1e-9)


def test_effective_number_weights_match_formula():
    for beta in (0.0, 0.9, 0.999, 0.9999):
        got = effective_number_weights(COUNTS, beta).double().numpy()
        np.testing.assert_allclose(got, _ref_weights(beta), rtol=1e-6)
    assert effective_number_weights(COUNTS, 0.9999).sum().item() == pytest.approx(K)


@pytest.mark.parametrize("base", ["ce", "focal"])
def test_class_balanced_matches_reference(batch, base):
    z, y = (t.numpy() for t in batch)
    per_sample = _nll(z, y)
    if base == "focal":
        per_sample = (1 - np.exp(-per_sample)) ** 2 * per_sample
    expected = (_ref_weights(0.999)[y] * per_sample).mean()
    assert _value("cb", batch, beta=0.999, base=base) == pytest.approx(expected, rel=1e-6)


def test_ldam_subtracts_count_margins(batch):
    z, y = (t.numpy() for t in batch)
    margins = 0.5 * (min(COUNTS) / np.asarray(COUNTS, dtype=np.float64)) ** 0.25  # C / n^(1/4), max 0.5
    assert margins.max() == pytest.approx(0.5) and margins[0] == pytest.approx(0.5 * (2 / 500) ** 0.25)
    shifted = z.copy()
    shifted[np.arange(len(y)), y] -= margins[y]
    expected = _nll(30.0 * shifted, y).mean()
    loss = create_loss("ldam", COUNTS)
    np.testing.assert_allclose(loss.margins.double().numpy(), margins, rtol=1e-6)
    assert loss(*batch).item() == pytest.approx(expected, rel=1e-5)
    # s = 1, as for heads that scale their own logits: the margin is in logit units
    assert _value("ldam", batch, s=1.0, max_m=0.3) == pytest.approx(
        _nll(z - np.eye(K)[y] * (margins[y] * 0.6)[:, None], y).mean(), rel=1e-6)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_logit_adjustment_is_ce_on_shifted_logits(batch, tau):
    z, y = (t.numpy() for t in batch)
    prior = np.asarray(COUNTS, dtype=np.float64) / sum(COUNTS)
    expected = _nll(z + tau * np.log(prior), y).mean()
    assert _value("logit_adjust", batch, tau=tau) == pytest.approx(expected, rel=1e-6)


def test_balanced_softmax_is_ce_on_log_count_shift(batch):
    z, y = (t.numpy() for t in batch)
    expected = _nll(z + np.log(np.asarray(COUNTS, dtype=np.float64)), y).mean()
    assert _value("balanced_softmax", batch) == pytest.approx(expected, rel=1e-6)
    assert _value("balanced_softmax", batch) == pytest.approx(_value("logit_adjust", batch, tau=1.0), rel=1e-9)


@pytest.mark.parametrize("name", ["ce", "focal", "ldam", "logit_adjust", "balanced_softmax"])
def test_drw_switches_weights_exactly_at_drw_epoch(batch, name):
    loss = create_loss(name, COUNTS, drw_epoch=3, drw_beta=0.999)
    plain = create_loss(name, COUNTS)
    for epoch in range(6):
        loss.set_epoch(epoch)
        if epoch < 3:
            torch.testing.assert_close(loss.class_weight, torch.ones(K))
            assert loss(*batch).item() == pytest.approx(plain(*batch).item(), rel=1e-9)
        else:
            np.testing.assert_allclose(loss.class_weight.double().numpy(), _ref_weights(0.999), rtol=1e-6)
    # the deferred weights re-weight each sample's loss by its class, as a weighted mean (LDAM-DRW's code)
    logits, target = batch
    per_sample = plain.per_sample(logits, target)
    w = torch.as_tensor(_ref_weights(0.999))[target]
    expected = (w * per_sample).sum() / w.sum()
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    loss.set_epoch(0)  # a resume at an earlier epoch goes back to uniform
    torch.testing.assert_close(loss.class_weight, torch.ones(K))


@pytest.mark.parametrize("counts", [[10, 0, 3], [10, -1], [5], [2.5, 3], "abc", [True, 4]])
def test_bad_class_counts_are_user_errors(counts):
    with pytest.raises(UserError) as info:
        create_loss("ce", counts)
    assert info.value.where == "class_counts"


def test_class_counts_must_match_num_classes():
    with pytest.raises(UserError, match="3 entries"):
        create_loss("ce", [5, 4, 3], num_classes=4)
    assert create_loss("ce", np.array([5, 4, 3]), num_classes=3).num_classes == 3


@pytest.mark.parametrize("name,options,where", [
    ("ce", {"drw_epoch": -1}, "drw_epoch"),
    ("ce", {"drw_beta": 1.0}, "drw_beta"),
    ("ce", {"label_smoothing": 1.0}, "label_smoothing"),
    ("focal", {"gamma": -1.0}, "gamma"),
    ("cb", {"base": "hinge"}, "base"),
    ("cb", {"drw_epoch": 10}, "drw_epoch"),
    ("cb", {"gamma": 2.0}, "gamma"),
    ("ldam", {"s": 0.0}, "s"),
])
def test_bad_options_are_user_errors(name, options, where):
    with pytest.raises(UserError) as info:
        create_loss(name, COUNTS, **options)
    assert info.value.where == where


def test_unknown_loss_and_option_are_user_errors():
    with pytest.raises(UserError, match="ldam"):
        create_loss("poly", COUNTS)
    with pytest.raises(UserError, match="gama"):
        create_loss("focal", COUNTS, gama=2.0)


@pytest.mark.parametrize("name", sorted(LOSSES.names()))
def test_every_loss_backpropagates_finite_gradients(name):
    torch.manual_seed(0)
    logits = torch.randn(16, K) * 4
    logits[0] = torch.tensor([60.0, -60.0, -60.0, -60.0, -60.0])  # a saturated, correct sample
    logits.requires_grad_(True)
    target = torch.randint(0, K, (16,))
    target[0] = 0
    options = {} if name == "cb" else {"drw_epoch": 0}
    loss = create_loss(name, COUNTS, **options)
    value = loss(logits, target)
    value.backward()
    assert math.isfinite(value.item()) and value.item() > 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_focal_gradient_finite_below_gamma_one_at_certainty():
    logits = torch.tensor([[80.0, -80.0, -80.0, -80.0, -80.0]], requires_grad=True)
    create_loss("focal", COUNTS, gamma=0.5)(logits, torch.tensor([0])).backward()
    assert torch.isfinite(logits.grad).all()



@pytest.mark.parametrize("name", ["ce", "ldam"])
def test_drw_is_the_ldam_drw_codes_weighted_cross_entropy(batch, name):
    """After the switch, CE-DRW and LDAM-DRW equal their reference's ``F.cross_entropy(s * z', y, weight=w)``
    (github.com/kaidic/LDAM-DRW: per_cls_weights normalised to sum to K; torch's weighted mean divides by
    the batch's sum of weights, not by N)."""
    import torch.nn.functional as F

    loss = create_loss(name, COUNTS, drw_epoch=1)
    loss.set_epoch(1)
    logits, target = batch
    w = torch.as_tensor(_ref_weights(0.9999))
    if name == "ldam":  # LDAM-DRW's LDAMLoss: margins C / n^(1/4) scaled to max_m, then s * (z - m_y one-hot)
        m = 1.0 / np.sqrt(np.sqrt(np.asarray(COUNTS, dtype=np.float64)))
        m = torch.as_tensor(m * (loss.max_m / m.max()))
        shifted = logits - F.one_hot(target, K) * m[target][:, None]
        expected = F.cross_entropy(loss.s * shifted, target, weight=w)
    else:
        expected = F.cross_entropy(logits, target, weight=w)
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
