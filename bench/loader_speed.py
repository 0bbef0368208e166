"""Which bounds training, the data loader or the model? Loader images/s against training-step images/s, per input.

* ``cifar``: the 2D CIFAR path of ``pancls lt`` -- :class:`pancls.train.loaders.TensorBatchLoader` over an in-memory
  uint8 set of CIFAR-10-LT IR 100's size (12,406 x 32 x 32 x 3, random pixels), normalise + pad-4 crop + flip
  batched on the device, batch 128; model: ResNet-32 (CIFAR) + tSP head.
* ``jpeg224``: the ImageNet-LT / iNaturalist path -- :class:`pancls.data.images.ImageListDataset` over generated
  500 x 375 JPEGs (ImageNet's most common size, quality 90), Pillow decode + RandomResizedCrop 224 + flip + colour
  jitter 0.4 + normalise in ``--workers`` DataLoader processes; models: ResNet-10 / ResNet-50 (2D) + tSP head.
* ``ct3d``: the ``pancls cv`` path -- :func:`pancls.data.transforms.make_dataset` over generated NIfTI volumes
  (128 x 128 x 64 at 1.5 x 1.5 x 3 mm, lesion mask), the deterministic part cached on disk by MONAI's
  ``PersistentDataset`` (built once, not timed), then the random training transforms (flips, affine, intensity,
  noise) on the cached 96 x 96 x 48 volumes in ``--workers`` processes, batch 2; model: 3D ResNet-18 (stem
  stride 2) + tSP head at 96 x 96 x 48.

Loader images/s is measured over one whole pass (worker start-up included); model images/s is
the median training step of ``bench/train_step.py`` on ``--device``. "bound by" names the slower of the two; on
one machine both share the CPU cores, so the real training rate is lower than either when the model runs on
the CPU too.

    python bench/loader_speed.py [--device auto|cpu|cuda] [--workers 2] [--jpegs 384] [--volumes 16] [--json OUT]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import machine, time_case  # noqa: E402  (the same step as bench/train_step.py)


def loader_rate(loader) -> float:
    """Images per second over one whole pass, from ``iter()`` (worker start-up included: with prefetching,
    timing "after the first batch" would count the batches the workers decoded meanwhile as free)."""
    n, start = 0, time.perf_counter()
    for batch in loader:
        x = batch["image"] if isinstance(batch, dict) else batch[0]
        n += len(x)
    return n / (time.perf_counter() - start)


def cifar_loader(batch: int = 128):
    from pancls.data import augment
    from pancls.train.loaders import TensorBatchLoader

    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (12406, 32, 32, 3), dtype=np.uint8))
    labels = torch.zeros(len(images), dtype=torch.long)

    def transform(x, generator):
        x = augment.to_float_normalised(x, augment.CIFAR10_MEAN, augment.CIFAR10_STD)
        return augment.random_crop_flip(x, padding=4, generator=generator, flip_prob=0.5)

    return TensorBatchLoader(images, labels, batch_size=batch, shuffle=True, transform=transform)


def write_jpegs(folder: Path, n: int):
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        # smooth colour fields plus noise: JPEG sizes near real photographs' (~100 KB at 500 x 375, quality 90)
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((500, 375), Image.Resampling.BICUBIC)
        pixels = np.clip(np.asarray(img, np.float32) + rng.normal(0, 12, (375, 500, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i}.JPEG"
        Image.fromarray(pixels).save(path, quality=90)
        files.append(str(path))
    return files


def jpeg_loader(files, workers: int, batch: int = 32):
    from pancls.data.images import ImageAugmentConfig, ImageListDataset, make_loader
    from pancls.data.lt_lists import IMAGENET_MEAN, IMAGENET_STD

    ds = ImageListDataset(files, [0] * len(files), ImageAugmentConfig(), train=True, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD)
    return make_loader(ds, batch, shuffle=True, workers=workers)


def write_volumes(folder: Path, n: int):
    import nibabel as nib

    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    records = []
    for i in range(n):
        hu = rng.normal(40, 30, (128, 128, 64)).astype(np.int16)
        mask = np.zeros(hu.shape, np.uint8)
        mask[40:80, 44:84, 20:44] = 1
        image, lesion = folder / f"ct{i}.nii.gz", folder / f"mask{i}.nii.gz"
        nib.save(nib.Nifti1Image(hu, affine), image)
        nib.save(nib.Nifti1Image(mask, affine), lesion)
        records.append({"image": str(image), "mask": str(lesion), "label": i % 6})
    return records


def ct_loader(records, cache: Path, workers: int, batch: int = 2):
    from monai.data import DataLoader

    from pancls.data.transforms import PreprocessConfig, make_dataset

    ds = make_dataset(records, PreprocessConfig(), cache, train=True)
    for i in range(len(ds)):  # build the on-disk cache (what the first epoch of a cv run does), untimed
        ds[i]
    return DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes for the jpeg224 and ct3d loaders")
    p.add_argument("--jpegs", type=int, default=384)
    p.add_argument("--volumes", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per model")
    p.add_argument("--cpu-batch-224", type=int, default=16)
    p.add_argument("--gpu-batch-224", type=int, default=256)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    b224 = args.gpu_batch_224 if gpu else args.cpu_batch_224
    if gpu:
        torch.backends.cudnn.benchmark = True

    rows = []
    with tempfile.TemporaryDirectory(prefix="pancls-loader-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "jpeg").mkdir()
        (tmp / "ct").mkdir()
        files = write_jpegs(tmp / "jpeg", args.jpegs)
        records = write_volumes(tmp / "ct", args.volumes)
        cases = [
            ("cifar 32x32", "TensorBatchLoader, in process", lambda: cifar_loader(),
             [("resnet32_cifar", {}, (3, 32, 32), 128, 10)]),
            ("jpeg 224x224", f"DataLoader, {args.workers} workers", lambda: jpeg_loader(files, args.workers),
             [("resnet10_2d", {}, (3, 224, 224), b224, 1000), ("resnet50_2d", {}, (3, 224, 224), b224, 1000)]),
            ("ct 96x96x48", f"DataLoader, {args.workers} workers",
             lambda: ct_loader(records, tmp / "cache", args.workers),
             [("resnet18", {"spatial_dims": 3, "in_channels": 1, "conv1_t_stride": 2}, (1, 96, 96, 48),
               16 if gpu else 2, 6)]),
        ]
        print(f"loader: {machine(torch.device('cpu'))}")
        print(f"model:  {machine(device)}")
        print(f"{'input':<13} {'loader':<30} {'loader img/s':>12}   {'model (batch)':<22} {'model img/s':>11}   bound by")
        for name, how, build, models in cases:
            rate = loader_rate(build())
            for backbone, kwargs, shape, batch, classes in models:
                seconds, _, precision = time_case(backbone, kwargs, shape, batch, classes, device, "auto",
                                                  args.steps, 1, False)
                model_rate = batch / seconds
                bound = "loader" if rate < model_rate else "model"
                ratio = max(rate, model_rate) / min(rate, model_rate)
                rows.append({"input": name, "loader": how, "loader_images_per_s": round(rate, 1),
                             "model": backbone, "batch": batch, "amp": precision, "device": device.type,
                             "model_images_per_s": round(model_rate, 1), "bound_by": bound})
                print(f"{name:<13} {how:<30} {rate:>12.1f}   {f'{backbone} ({batch})':<22} {model_rate:>11.1f}   "
                      f"{bound} ({ratio:.1f}x)", flush=True)
    if args.json:
        from pancls.io import atomic_write_json

        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
