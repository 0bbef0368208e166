"""Batched, on-device CIFAR augmentation: no per-sample Python loop, so a GPU never waits on the CPU.

The standard CIFAR recipe (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, sec. 4.2;
used unchanged by LDAM-DRW and the tSP paper): zero-pad 4 pixels on each side, take a random 32x32 crop,
flip horizontally with probability 1/2, then normalise per channel.

One deliberate difference: pancls normalises first and pads the normalised batch with zeros, i.e. with the
per-channel mean colour, where torchvision's ``RandomCrop(32, padding=4)`` pads the raw image with black.
Both are common; the figures in the README were measured with this one.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pancls.errors import UserError
from pancls.validation import check_scalar

#: Per-channel RGB mean and std on [0, 1] pixels, as in LDAM-DRW's ``cifar_train.py`` (which uses the CIFAR-10
#: values for CIFAR-100 too; the std is kuangliu/pytorch-cifar's, not the pixel std of the train set).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
#: The CIFAR-100 train-set statistics, for recipes that normalise each dataset with its own values.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def normalisation(dataset: str) -> tuple:
    """``(mean, std)`` that ``pancls lt`` normalises ``dataset``'s images with (CIFAR-100 its own, else CIFAR-10's)."""
    return (CIFAR100_MEAN, CIFAR100_STD) if dataset == "cifar100" else (CIFAR10_MEAN, CIFAR10_STD)


def to_float_normalised(
    x_uint8_nhwc: np.ndarray | torch.Tensor,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(x / 255 - mean) / std`` as a float32 ``(N, C, H, W)`` tensor on ``device``.

    The uint8 batch is moved first, so a host-to-GPU copy carries a quarter of the float32 bytes.
    """
    x = torch.as_tensor(x_uint8_nhwc)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != len(mean) or len(mean) != len(std):
        raise UserError(f"expected uint8 images (N, H, W, {len(mean)}), got {tuple(x.shape)} {x.dtype}", "images")
    x = x.to(device if device is not None else x.device, non_blocking=True)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    return x.sub_(mean_t).div_(std_t).contiguous()


def random_crop_flip(
    x: torch.Tensor,
    padding: int = 4,
    generator: torch.Generator | None = None,
    flip_prob: float = 0.5,
) -> torch.Tensor:
    """Per-sample random crop of the zero-padded batch back to ``H x W``, and horizontal flip.

    Sample ``n`` draws offsets ``(dy_n, dx_n)`` uniformly in ``[0, 2 * padding]`` and a flip bit ``f_n`` that is
    1 with probability ``flip_prob``; then

        out[n, c, i, j] = pad(x)[n, c, dy_n + i, dx_n + (W - 1 - j if f_n else j)]

    which is one advanced-indexing gather for the whole batch (the flip is folded into the column index).
    Random numbers come from ``generator`` (on its own device), so a seeded generator reproduces the batch
    on CPU and CUDA alike.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise UserError(f"expected a float (N, C, H, W) batch, got {tuple(x.shape)} {x.dtype}", "x")
    check_scalar(padding, "padding", int, min_val=0)
    check_scalar(flip_prob, "flip_prob", float, min_val=0, max_val=1)
    n, c, h, w = x.shape
    draw_on = generator.device if generator is not None else x.device
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=draw_on).to(x.device)
    flip = (torch.rand(n, generator=generator, device=draw_on) < flip_prob).to(x.device)

    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(0), cols) + offsets[1][:, None]  # (N, W)
    rows = torch.arange(h, device=x.device) + offsets[0][:, None]  # (N, H)
    padded = F.pad(x, (padding, padding, padding, padding))
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
