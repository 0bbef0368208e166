"""TensorBatchLoader: complete epochs, reproducible per (seed, epoch), independent of the global RNG."""
import numpy as np
import pytest
import torch

from pancls.train.loaders import TensorBatchLoader
from pancls.train.samplers import sample_weights


def _noise(x, generator):
    return x.float() + torch.rand(x.shape, generator=generator, device=x.device)


def _data(n=50):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return images, torch.arange(n) % 5


@pytest.mark.parametrize("drop_last, expected", [(False, [16, 16, 16, 2]), (True, [16, 16, 16])])
def test_batches_cover_the_epoch_once(drop_last, expected):
    images, labels = _data()
    loader = TensorBatchLoader(images, labels, batch_size=16, drop_last=drop_last)
    batches = list(loader)
    assert len(loader) == len(batches) and [len(y) for _, y in batches] == expected
    seen = torch.cat([x[:, 0, 0, 0].long() for x, _ in batches])
    assert len(set(seen.tolist())) == len(seen)  # no repeats
    if not drop_last:
        assert sorted(seen.tolist()) == list(range(50))
        assert all(torch.equal(y, x[:, 0, 0, 0].long() % 5) for x, y in batches)  # pairs stay together


def test_same_epoch_same_batches_and_augmentation_whatever_the_global_rng():
    images, labels = _data()
    loader = TensorBatchLoader(images, labels, batch_size=8, transform=_noise, seed=1)
    loader.set_epoch(3)
    first = [(x.clone(), y.clone()) for x, y in loader]
    torch.manual_seed(999)
    np.random.seed(999)
    fresh = TensorBatchLoader(images, labels, batch_size=8, transform=_noise, seed=1)
    fresh.set_epoch(3)
    again = list(fresh)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    fresh.set_epoch(4)
    assert not torch.equal(next(iter(fresh))[0], first[0][0])


def test_unshuffled_order_and_float_images():
    images = torch.randn(10, 3, 2, 2)
    loader = TensorBatchLoader(images, torch.zeros(10, dtype=torch.long), batch_size=4, shuffle=False)
    assert torch.equal(torch.cat([x for x, _ in loader]), images)


def test_weighted_sampling_from_the_given_epoch():
    labels = np.repeat(np.arange(3), [1800, 180, 20])
    images = torch.from_numpy(np.arange(2000)).view(-1, 1)
    loader = TensorBatchLoader(images, torch.from_numpy(labels), batch_size=500,
                               sample_weights=sample_weights(labels, "class_balanced"), weights_from_epoch=2)
    loader.set_epoch(1)
    idx = torch.cat([x[:, 0] for x, _ in loader]).numpy()
    assert sorted(idx) == list(range(2000))  # plain shuffle before the switch
    drawn = []
    for epoch in range(2, 6):
        loader.set_epoch(epoch)
        drawn.append(torch.cat([y for _, y in loader]).numpy())
    freq = np.bincount(np.concatenate(drawn), minlength=3) / 8000
    np.testing.assert_allclose(freq, 1 / 3, atol=0.03)


def test_mismatched_inputs_are_refused():
    images, labels = _data()
    with pytest.raises(ValueError, match="labels must have shape"):
        TensorBatchLoader(images, labels[:-1], batch_size=4)
    with pytest.raises(ValueError, match="sample_weights"):
        TensorBatchLoader(images, labels, batch_size=4, sample_weights=np.ones(3))
