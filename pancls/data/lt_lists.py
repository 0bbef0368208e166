"""ImageNet-LT and iNaturalist 2018 from their standard list files and an image folder.

A list file holds one image per line, ``relative/path label``, the path relative to the image root and the
label a class index::

    train/n01440764/n01440764_10026.JPEG 0          (ImageNet_LT_train.txt / _val.txt / _test.txt)
    train_val2018/Plantae/7291/9f8ecb39....jpg 7291  (iNaturalist18_train.txt / _val.txt)

These are the lists of Liu et al., "Large-Scale Long-Tailed Recognition in an Open World" (OLTR), CVPR 2019,
also used by Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020
(github.com/facebookresearch/classifier-balancing) and by the LDAM-DRW and tSP papers. ImageNet-LT has 1000
classes (115,846 train, 20,000 val, 50,000 test images), iNaturalist 2018 8142 classes (437,513 train, 24,426
val images); the val list of iNaturalist is its test set in every one of these papers.

The path is everything before the last run of whitespace, so a path holding a space still reads. Checks, all
collected before anything is raised (one :class:`ImageListError` lists every problem of every list with its
file and line, as :mod:`pancls.data.manifest` does for manifests): a line that is not ``path label``, a label
that is not a whole number or is outside ``0 .. K-1``, an absolute path or one that leaves the image root, an
image file that does not exist, and -- for the training list -- a class with no image (every loss needs
``n_k >= 1``). Files are checked for existence only (one ``stat`` each: 0.8 s for a 115,846-line list on
the 2-core development machine, warm local disk); an unreadable JPEG is reported, naming its file, when the
loader meets it.

Class counts come from the training list; the many / medium / few-shot groups are those of OLTR (> 100,
20 - 100, < 20 training images), computed by :func:`pancls.eval.metrics.shot_groups`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from pancls.data.manifest import ManifestError
from pancls.errors import UserError, one_line


@dataclass(frozen=True)
class ListDataset:
    """What pancls knows of a list-file benchmark: its class count and its standard RGB statistics."""

    num_classes: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    lists: str  # the names of its list files, for messages


#: The torchvision / ImageNet statistics, which Kang et al. use for ImageNet-LT (and Places-LT).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: iNaturalist 2018's own statistics, as in Kang et al.'s ``data/dataloader.py`` (``RGB_statistics``).
INAT18_MEAN = (0.466, 0.471, 0.380)
INAT18_STD = (0.195, 0.194, 0.192)

DATASETS: Dict[str, ListDataset] = {
    "imagenet_lt": ListDataset(1000, IMAGENET_MEAN, IMAGENET_STD,
                               "ImageNet_LT_train.txt, ImageNet_LT_val.txt, ImageNet_LT_test.txt"),
    "inat2018": ListDataset(8142, INAT18_MEAN, INAT18_STD, "iNaturalist18_train.txt, iNaturalist18_val.txt"),
}

#: At most this many problems are printed (the count of the rest follows): a wrong image root would otherwise
#: print one line per image, 437k for iNaturalist.
MAX_SHOWN = 100

_INTEGER = re.compile(r"^[+-]?[0-9]+$")


class ImageListError(ManifestError):
    """Every problem found in one or more image lists: ``problems`` holds ``(file, line, message)`` triples,
    ``line`` None for a problem of the whole file. One problem per line, in file and line order, the format
    of :class:`~pancls.data.manifest.ManifestError` (``file:line: message``)."""

    def __init__(self, problems: Sequence[Tuple[str, Optional[int], str]]):
        self.problems = sorted(problems, key=lambda p: (p[0], -1 if p[1] is None else p[1]))
        shown = [f"{one_line(f)}:{line}: {one_line(m)}" if line is not None else f"{one_line(f)}: {one_line(m)}"
                 for f, line, m in self.problems[:MAX_SHOWN]]
        if len(self.problems) > MAX_SHOWN:
            shown.append(f"... and {len(self.problems) - MAX_SHOWN} more")
        n = len(self.problems)
        files = sorted({f for f, _, _ in self.problems})
        what = "the image list" if len(files) == 1 else "the image lists"
        # ManifestError's constructor formats a single file; the message is built here in the same format.
        UserError.__init__(self, f"{n} problem{'s' if n != 1 else ''} in {what}:\n" + "\n".join(shown))


@dataclass(frozen=True)
class ImageList:
    """A validated list: ``files[i]`` (absolute path) has class ``labels[i]``, read from line ``lines[i]``."""

    path: Path
    root: Path
    files: Tuple[str, ...]
    labels: np.ndarray  # int64 (N,)
    lines: np.ndarray  # int64 (N,), 1-based line numbers in the list file

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class ImageListData:
    """A list-file benchmark: the training list, the list evaluated after each epoch, and the class counts.

    ``train_labels``, ``test_labels``, ``class_counts`` and ``classes`` are the attributes
    :mod:`pancls.lt` reads from every benchmark's data (as :class:`pancls.data.cifar.LTData` has them)."""

    dataset: str
    train: ImageList
    eval: ImageList
    class_counts: np.ndarray  # int64 (K,), from the training list
    classes: Tuple[str, ...]  # "0" .. "K-1": the lists carry indices, not names

    @property
    def train_labels(self) -> np.ndarray:
        return self.train.labels

    @property
    def test_labels(self) -> np.ndarray:
        return self.eval.labels


def parse_list(path: str | os.PathLike, root: str | os.PathLike, num_classes: int, check_images: bool = True,
               problems: Optional[List[Tuple[str, Optional[int], str]]] = None) -> Optional[ImageList]:
    """Read one list file against the image folder ``root``.

    With ``problems`` given, every problem is appended there (``(file, line, message)``) and None is returned
    when there was one; without it an :class:`ImageListError` is raised. An unreadable file or a ``root`` that
    is not a folder is a :class:`~pancls.errors.UserError` at once (nothing else could be checked).
    """
    own = problems is None
    found: List[Tuple[str, Optional[int], str]] = []
    path, root = Path(path), Path(os.path.abspath(root))
    if not root.is_dir():
        raise UserError("the image root is not a folder", root)
    shown = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise UserError("image list not found", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the image list: {exc}", path) from None

    root_text = os.fspath(root)
    inside = root_text.rstrip(os.sep) + os.sep
    files: List[str] = []
    labels: List[int] = []
    lines: List[int] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            found.append((shown, number, f"expected 'relative/path label', found {line!r}"))
            continue
        rel, label_text = parts
        bad = []
        if not _INTEGER.match(label_text):
            bad.append(f"the label {label_text!r} (the last field) is not a whole number")
        elif not 0 <= int(label_text) < num_classes:
            bad.append(f"label {int(label_text)} is out of range: the classes are 0 .. {num_classes - 1}")
        # string operations, not pathlib: a list has up to 437k lines
        resolved = os.path.normpath(os.path.join(root_text, rel))
        if os.path.isabs(rel):
            bad.append(f"image path {rel!r} is absolute; write it relative to the image root")
        elif not resolved.startswith(inside):
            bad.append(f"image path {rel!r} leaves the image root {root}")
        elif check_images and not os.path.isfile(resolved):
            bad.append(f"image not found: {rel} (under {root})")
        if bad:
            found += [(shown, number, message) for message in bad]
            continue
        files.append(resolved)
        labels.append(int(label_text))
        lines.append(number)
    if not files and not found:
        found.append((shown, None, "the list has no entries"))

    if problems is not None:
        problems += found
    if found:
        if own:
            raise ImageListError(found)
        return None
    return ImageList(path=path, root=root, files=tuple(files), labels=np.asarray(labels, dtype=np.int64),
                     lines=np.asarray(lines, dtype=np.int64))


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Images per class, ``n_k = #{i: label_i = k}`` for ``k = 0 .. K-1`` (zeros included)."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def num_classes_of(dataset: str, num_classes: Optional[int] = None) -> int:
    """K: the dataset's standard class count (1000, 8142), or ``num_classes`` where given (a subset)."""
    if dataset not in DATASETS:
        raise UserError(f"unknown list dataset {dataset!r}; choose one of: {', '.join(DATASETS)}", "data.dataset")
    if num_classes is None:
        return DATASETS[dataset].num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(f"must be an integer >= 2, got {num_classes!r}", "data.num_classes")
    return num_classes


def load_image_lists(dataset: str, root: str | os.PathLike | None, train_list: str | os.PathLike | None,
                     eval_list: str | os.PathLike | None, num_classes: Optional[int] = None,
                     check_images: bool = True) -> ImageListData:
    """Both lists of a benchmark, validated together: one :class:`ImageListError` names every problem of
    both files (and any class without a training image)."""
    k = num_classes_of(dataset, num_classes)
    spec = DATASETS[dataset]
    for value, key, what in ((root, "data.path", "the image root folder (--data)"),
                             (train_list, "data.train_list", "the training list"),
                             (eval_list, "data.eval_list", "the list to evaluate on")):
        if not value:
            raise UserError(f"{dataset} needs {what}; its standard lists are {spec.lists}", key)
    problems: List[Tuple[str, Optional[int], str]] = []
    train = parse_list(train_list, root, k, check_images, problems)
    evaluated = parse_list(eval_list, root, k, check_images, problems)
    counts = class_counts(train.labels, k) if train is not None else None
    if counts is not None and (counts == 0).any():
        empty = np.flatnonzero(counts == 0)
        listed = ", ".join(map(str, empty[:20])) + (f" ... ({len(empty)} in all)" if len(empty) > 20 else "")
        problems.append((os.fspath(train_list), None,
                         f"class(es) {listed} have no training image; every one of the {k} classes needs one "
                         "(set data.num_classes for a subset with fewer classes)"))
    if problems:
        raise ImageListError(problems)
    assert train is not None and evaluated is not None and counts is not None
    return ImageListData(dataset=dataset, train=train, eval=evaluated, class_counts=counts,
                         classes=tuple(str(c) for c in range(k)))


def shot_split(counts: Sequence[int]) -> Dict[str, int]:
    """How many classes are many-shot (> 100 training images), medium-shot (20 - 100) and few-shot (< 20)."""
    from pancls.eval.metrics import shot_groups

    return {name: int(len(idx)) for name, idx in shot_groups(counts).items()}


def make_loaders(cfg, data: ImageListData, device, ctx=None):
    """``(train_loader, eval_loader)`` of a :class:`pancls.lt.LTConfig` run on a list benchmark.

    Training: DataLoader workers decode and augment (``images:`` section, flip from ``augment.flip``), batches
    from :func:`pancls.train.samplers.make_batch_sampler` (the epoch's order seeded from ``(seed, epoch)``,
    ``train.sampler`` re-sampling, under DDP this rank's slice of every global batch). Evaluation: resize + centre
    crop, this rank's contiguous share (``ShardSampler``). Host memory is pinned for a CUDA device.
    """
    import torch

    from pancls.data.images import ImageListDataset, make_loader
    from pancls.train.samplers import ShardSampler, make_batch_sampler

    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    spec = DATASETS[cfg.data.dataset]
    mean, std = cfg.images.mean or spec.mean, cfg.images.std or spec.std
    workers, pin = cfg.images.workers, torch.device(device).type == "cuda"
    train = ImageListDataset(data.train.files, data.train.labels, cfg.images, train=True, mean=mean, std=std,
                             flip_prob=0.5 if cfg.augment.flip else 0.0, seed=cfg.train.seed)
    evaluated = ImageListDataset(data.eval.files, data.eval.labels, cfg.images, train=False, mean=mean, std=std)
    batches = make_batch_sampler(data.train.labels, cfg.train.sampler, cfg.train.batch_size, seed=cfg.train.seed,
                                 start_epoch=cfg.train.sampler_start_epoch, rank=rank, world_size=world)
    train_loader = make_loader(train, batch_sampler=batches, workers=workers, pin_memory=pin)
    eval_loader = make_loader(evaluated, cfg.eval_batch_size, sampler=ShardSampler(len(evaluated), rank, world),
                              workers=workers, pin_memory=pin)
    return train_loader, eval_loader


def facts(cfg, data: ImageListData) -> Dict[str, object]:
    """What ``pancls lt --dry-run`` prints for a list benchmark (counts, not the K class counts themselves)."""
    counts = data.class_counts
    return {"dataset": cfg.data.dataset, "image_root": str(data.train.root), "train_list": str(data.train.path),
            "eval_list": str(data.eval.path), "n_train": int(len(data.train)), "n_test": int(len(data.eval)),
            "num_classes": int(len(counts)), "largest_class": int(counts.max()), "smallest_class": int(counts.min()),
            "imbalance_ratio": round(float(counts.max() / counts.min()), 2), "shot_classes": shot_split(counts)}
