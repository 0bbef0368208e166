"""Batched crop/flip augmentation and uint8 -> normalised float conversion."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pancls.data.augment import CIFAR10_MEAN, CIFAR10_STD, random_crop_flip, to_float_normalised
from pancls.errors import UserError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _batch(n, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g).to(device)


def _match(out_img, padded_img, h, w):
    """(dy, dx, flipped) of the window of ``padded_img`` that ``out_img`` equals, or None."""
    size = padded_img.shape[-1] - w
    for dy in range(size + 1):
        for dx in range(size + 1):
            window = padded_img[:, dy:dy + h, dx:dx + w]
            if torch.equal(out_img, window):
                return dy, dx, False
            if torch.equal(out_img, window.flip(-1)):
                return dy, dx, True
    return None


@pytest.mark.parametrize("device", DEVICES)
def test_every_output_is_a_window_of_the_padded_input(device):
    x = _batch(64, device)
    g = torch.Generator(device="cpu").manual_seed(7)
    out = random_crop_flip(x, padding=4, generator=g)
    assert out.shape == x.shape and out.device == x.device and out.dtype == x.dtype
    padded = F.pad(x, (4, 4, 4, 4)).cpu()
    found = [_match(out[i].cpu(), padded[i], 32, 32) for i in range(len(x))]
    assert all(f is not None for f in found)
    # the offsets really vary (not always the centre crop)
    assert len({(dy, dx) for dy, dx, _ in found}) > 10


def test_identity_without_padding_or_flip_and_pure_flip():
    x = _batch(8)
    torch.testing.assert_close(random_crop_flip(x, padding=0, flip_prob=0.0), x, rtol=0, atol=0)
    torch.testing.assert_close(random_crop_flip(x, padding=0, flip_prob=1.0), x.flip(-1), rtol=0, atol=0)


def test_flip_rate_and_offsets_cover_the_range():
    x = _batch(2000, seed=1)
    g = torch.Generator().manual_seed(0)
    flipped = random_crop_flip(x, padding=0, generator=g)
    is_flip = (flipped == x.flip(-1)).flatten(1).all(1)
    is_same = (flipped == x).flatten(1).all(1)
    assert torch.all(is_flip ^ is_same)
    assert abs(is_flip.float().mean().item() - 0.5) < 0.05  # 2000 draws: sd 0.011

    small = _batch(400, seed=2)
    out = random_crop_flip(small, padding=2, generator=g)
    padded = F.pad(small, (2, 2, 2, 2))
    offsets = {_match(out[i], padded[i], 32, 32)[:2] for i in range(len(small))}
    assert offsets == {(dy, dx) for dy in range(5) for dx in range(5)}


def test_same_seed_same_output():
    x = _batch(32)
    a = random_crop_flip(x, generator=torch.Generator().manual_seed(42))
    b = random_crop_flip(x, generator=torch.Generator().manual_seed(42))
    c = random_crop_flip(x, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_arguments():
    with pytest.raises(UserError, match="float"):
        random_crop_flip(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(UserError) as exc:
        random_crop_flip(_batch(2), padding=-1)
    assert exc.value.where == "padding"


@pytest.mark.parametrize("device", DEVICES)
def test_to_float_normalised(device):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    out = to_float_normalised(x, CIFAR10_MEAN, CIFAR10_STD, device)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32 and out.device.type == device
    n, i, j, ch = 2, 5, 17, 1
    expected = (x[n, i, j, ch] / 255.0 - CIFAR10_MEAN[ch]) / CIFAR10_STD[ch]
    assert out[n, ch, i, j].item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(UserError, match="uint8"):
        to_float_normalised(x.astype(np.float32), CIFAR10_MEAN, CIFAR10_STD, device)
