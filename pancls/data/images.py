"""Image files -> training batches: JPEG decoding with Pillow in DataLoader workers, the standard augmentation
of the large long-tailed benchmarks, reproducible per image.

Training (Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020,
``data/dataloader.py`` of github.com/facebookresearch/classifier-balancing, itself OLTR's; the LDAM-DRW and
tSP papers use the same)::

    RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3)) -> horizontal flip (p = 1/2)
        -> colour jitter (brightness = contrast = saturation = 0.4, hue 0; ImageNet-LT only) -> normalise

Evaluation: shorter side resized to 256, centre crop 224, normalise.

The geometry follows torchvision's definitions (``RandomResizedCrop.get_params``, ``Resize(int)``,
``CenterCrop``) and is done by Pillow on the decoded image, as torchvision does for PIL images: crop, then
bilinear resize (Pillow's resize filters over the whole footprint when it shrinks, i.e. antialiased). The colour
jitter is done in float on the ``[0, 1]`` tensor with torchvision's formulas, each factor ``f`` drawn uniformly in
``[max(0, 1 - s), 1 + s]`` and the three applied in a random order::

    brightness  x' = clip(f x, 0, 1)
    contrast    x' = clip(f x + (1 - f) mean(gray(x)), 0, 1)
    saturation  x' = clip(f x + (1 - f) gray(x), 0, 1),     gray = 0.2989 R + 0.587 G + 0.114 B  (ITU-R 601-2)

(torchvision's PIL path computes the same blends in uint8 with Pillow's rounding; the results differ by at most
a grey level.) No torchvision is needed.

Every random draw of image ``i`` in epoch ``e`` comes from a generator seeded from ``(seed, e, i)``, so a batch
is the same whatever the number of workers, and a resumed run (the engine calls :meth:`ImageListDataset.set_epoch`)
sees exactly the augmentations of an uninterrupted one. Workers are not persistent: each epoch forks them again
from the dataset after ``set_epoch``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pancls.errors import UserError
from pancls.validation import check_scalar

#: ITU-R 601-2 luma weights, as torchvision's ``rgb_to_grayscale``
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


@dataclass
class ImageAugmentConfig:
    """``images:`` -- decoding and augmentation of the list-file benchmarks (ImageNet-LT, iNaturalist 2018).

    ``color_jitter`` is the strength of brightness, contrast and saturation jitter (0 switches it off; Kang et
    al. use 0.4 on ImageNet-LT and none on iNaturalist). ``mean``/``std`` default to the dataset's standard
    statistics. ``workers`` DataLoader processes decode and augment (0: in the training process); it does not
    change the batches.
    """

    crop_size: int = 224
    resize: int = 256
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    color_jitter: float = 0.4
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    workers: int = 4

    def __post_init__(self) -> None:
        check_scalar(self.crop_size, "crop_size", int, min_val=1)
        check_scalar(self.resize, "resize", int, min_val=self.crop_size)
        check_scalar(self.color_jitter, "color_jitter", float, min_val=0, max_val=1)
        check_scalar(self.workers, "workers", int, min_val=0)
        self.scale = _pair(self.scale, "scale", low=0, high=1)
        self.ratio = _pair(self.ratio, "ratio", low=0, high=None)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                if len(value) != 3:
                    raise UserError(f"needs 3 values (R, G, B), got {list(value)}", name)
                for i, v in enumerate(value):
                    check_scalar(v, f"{name}[{i}]", float, min_val=0 if name == "mean" else 1e-6)
                setattr(self, name, tuple(float(v) for v in value))


def _pair(value: Sequence[float], name: str, low: float, high: Optional[float]) -> Tuple[float, float]:
    if len(value) != 2:
        raise UserError(f"needs 2 values (low, high), got {list(value)}", name)
    a, b = (float(check_scalar(v, f"{name}[{i}]", float, min_val=low, max_val=high,
                               include_boundaries="right" if high is not None else "neither"))
            for i, v in enumerate(value))
    if a > b:
        raise UserError(f"low must be <= high, got {[a, b]}", name)
    return a, b


# --------------------------------------------------------------------------------------------------
# geometry (integers only: Pillow does the pixel work)


def random_resized_crop_box(height: int, width: int, generator: torch.Generator,
                            scale: Tuple[float, float] = (0.08, 1.0),
                            ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)) -> Tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop, torchvision's ``RandomResizedCrop.get_params``.

    Up to 10 tries: area ``A = H W u`` with ``u ~ U(scale)``, aspect ``r = exp(v)`` with ``v ~ U(log ratio)``,
    ``w = round(sqrt(A r))``, ``h = round(sqrt(A / r))``; the first that fits is placed uniformly. Otherwise the
    centre crop of the whole image with its aspect ratio clamped into ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u, v = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u)
        aspect = math.exp(log_lo + (log_hi - log_lo) * v)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def shorter_side_size(height: int, width: int, size: int) -> Tuple[int, int]:
    """``(h, w)`` after torchvision's ``Resize(size)``: the shorter side becomes ``size``, the longer
    ``int(size * long / short)`` (truncated)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def centre_crop_offset(height: int, width: int, size: int) -> Tuple[int, int]:
    """``(top, left)`` of torchvision's ``CenterCrop(size)``: ``int(round((H - size) / 2))`` and likewise."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


# --------------------------------------------------------------------------------------------------
# colour (float tensors (3, H, W) in [0, 1])


def gray(x: torch.Tensor) -> torch.Tensor:
    """``0.2989 R + 0.587 G + 0.114 B``, shape ``(1, H, W)``."""
    w = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * w).sum(0, keepdim=True)


def adjust_brightness(x: torch.Tensor, f: float) -> torch.Tensor:
    return (f * x).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: float) -> torch.Tensor:
    return (f * x + (1 - f) * gray(x).mean()).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, f: float) -> torch.Tensor:
    return (f * x + (1 - f) * gray(x)).clamp_(0, 1)


_ADJUST = (adjust_brightness, adjust_contrast, adjust_saturation)


def color_jitter(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation jitter of strength ``s`` in a random order (see the module docstring)."""
    if strength <= 0:
        return x
    order = torch.randperm(3, generator=generator).tolist()
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    factors = (low + (high - low) * torch.rand(3, generator=generator, dtype=torch.float64)).tolist()
    for k in order:
        x = _ADJUST[k](x, factors[k])
    return x


# --------------------------------------------------------------------------------------------------
# the data set


class UnreadableImage(UserError):
    """An image file Pillow cannot decode: one line naming the file.

    When a DataLoader worker raises it, torch rebuilds it in the training process from the worker's formatted
    traceback (``Caught UnreadableImage in DataLoader worker process 0 ... UnreadableImage: <file>: <reason>``);
    the constructor keeps that last line, so the user still reads one line, not a traceback."""

    def __init__(self, reason: str, where: str | os.PathLike | None = None):
        text = str(reason)
        if where is None and "Original Traceback" in text:
            last = [line for line in text.splitlines() if line.strip()][-1]
            text = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(text, where)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit seed for image ``index`` in ``epoch`` (numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, dtype=np.uint64)[0])


def decode_rgb(path: str) -> Image.Image:
    """The image at ``path`` as 8-bit RGB (grey, CMYK and palette files converted), or :class:`UnreadableImage`."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise UnreadableImage("image file not found (was it moved after the list was checked?)", path) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"cannot decode the image ({type(exc).__name__}: {exc})", path) from None


class ImageListDataset(Dataset):
    """``(image, label)`` pairs of image files: a float32 ``(3, S, S)`` normalised tensor and an int.

    ``train`` selects the random training augmentation (crop, flip with ``flip_prob``, colour jitter), otherwise
    the deterministic evaluation transform. See the module docstring for both and for the seeding.
    """

    def __init__(self, files: Sequence[str], labels: Sequence[int], cfg: ImageAugmentConfig, train: bool,
                 mean: Sequence[float], std: Sequence[float], flip_prob: float = 0.5, seed: int = 0):
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files = list(files)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.cfg, self.train = cfg, bool(train)
        self.flip_prob = float(check_scalar(flip_prob, "flip_prob", float, min_val=0, max_val=1))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        img = decode_rgb(self.files[index])
        size = self.cfg.crop_size
        generator = None
        if self.train:
            generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
            top, left, h, w = random_resized_crop_box(img.height, img.width, generator, self.cfg.scale,
                                                      self.cfg.ratio)
            img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
            if float(torch.rand(1, generator=generator)) < self.flip_prob:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            h, w = shorter_side_size(img.height, img.width, self.cfg.resize)
            img = img.resize((w, h), Image.Resampling.BILINEAR)
            top, left = centre_crop_offset(h, w, size)
            img = img.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        if generator is not None:
            x = color_jitter(x, self.cfg.color_jitter, generator)
        return x.sub_(self.mean).div_(self.std).contiguous(), int(self.labels[index])


def _one_thread_per_worker(_worker_id: int) -> None:
    torch.set_num_threads(1)  # the per-image tensor work is small; N workers x N threads would oversubscribe


def make_loader(dataset: Dataset, batch_size: Optional[int] = None, *, shuffle: bool = False, sampler=None,
                batch_sampler=None, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A ``DataLoader`` over ``dataset``: ``workers`` processes (forked again each epoch, so that
    ``set_epoch`` reaches them), pinned host memory for a CUDA device, 4 batches prefetched per worker.

    Give ``batch_sampler`` (training: :func:`pancls.train.samplers.make_batch_sampler`, seeded per epoch and
    sharded under DDP) or ``batch_size`` with ``sampler`` (evaluation: a ``ShardSampler``) or ``shuffle``."""
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin_memory,
                          persistent_workers=False, worker_init_fn=_one_thread_per_worker if workers else None,
                          prefetch_factor=4 if workers else None)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=False,
                      worker_init_fn=_one_thread_per_worker if workers else None,
                      prefetch_factor=4 if workers else None)
