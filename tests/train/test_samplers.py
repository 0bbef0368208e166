"""Re-sampling weights and the epoch-seeded DataLoader sampler: drawn class frequencies hit their targets."""
import numpy as np
import pytest
import torch

from pancls.train.samplers import EpochWeightedRandomSampler, make_torch_sampler, sample_weights

COUNTS = np.array([600, 60, 6])
LABELS = np.repeat(np.arange(3), COUNTS)


def _class_freq(indices, labels=LABELS, num_classes=3):
    return np.bincount(labels[np.asarray(indices)], minlength=num_classes) / len(indices)


def test_none_means_plain_shuffling():
    assert sample_weights(LABELS, "none") is None
    assert make_torch_sampler(LABELS, "none") is None


@pytest.mark.parametrize("kind, target", [
    ("class_balanced", np.full(3, 1 / 3)),
    ("sqrt", np.sqrt(COUNTS) / np.sqrt(COUNTS).sum()),
])
def test_class_mass_and_empirical_frequencies_match_target(kind, target):
    w = sample_weights(LABELS, kind)
    assert w.shape == LABELS.shape and np.isclose(w.sum(), 1.0)
    np.testing.assert_allclose(np.bincount(LABELS, weights=w), target, rtol=1e-12)
    sampler = make_torch_sampler(LABELS, kind, num_samples=30_000, seed=3)
    sampler.set_epoch(0)
    np.testing.assert_allclose(_class_freq(list(sampler)), target, atol=0.015)


def test_absent_class_gets_no_mass():
    labels = np.array([0, 0, 0, 2])
    w = sample_weights(labels, "class_balanced")
    np.testing.assert_allclose(w, [1 / 6, 1 / 6, 1 / 6, 1 / 2])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown sampler"):
        sample_weights(LABELS, "inverse")
    with pytest.raises(ValueError, match="non-negative"):
        sample_weights(np.array([0, -1]), "sqrt")


def test_draws_depend_only_on_seed_and_epoch():
    sampler = make_torch_sampler(LABELS, "class_balanced", seed=7)
    sampler.set_epoch(4)
    first = list(sampler)
    torch.manual_seed(12345)  # the global RNG must not matter
    sampler.set_epoch(4)
    assert list(sampler) == first
    sampler.set_epoch(5)
    assert list(sampler) != first
    other = make_torch_sampler(LABELS, "class_balanced", seed=8)
    other.set_epoch(4)
    assert list(other) != first


def test_deferred_resampling_shuffles_before_start_epoch():
    sampler = EpochWeightedRandomSampler(sample_weights(LABELS, "class_balanced"), len(LABELS), seed=0, start_epoch=2)
    sampler.set_epoch(1)
    before = list(sampler)
    assert sorted(before) == list(range(len(LABELS)))  # a permutation: instance-balanced
    sampler.set_epoch(2)
    after = list(sampler)
    assert len(after) == len(LABELS) and len(set(after)) < len(LABELS)  # with replacement
    assert _class_freq(after)[2] > 0.2  # the 6-image class now gets about a third of the draws
