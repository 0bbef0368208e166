"""CIFAR-10/100 and their long-tailed versions (CIFAR-LT), read from the packed npz or the official release.

Sources, detected from the path:

* the packed ``cifar10.npz`` / ``cifar100.npz`` (see ``shared/data/SOURCES.md``): PNG-tiled images, only the
  train images of the IR >= 50 long-tailed subsets, looked up by official index through ``train_index``;
* the official python version, as ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` or extracted
  (``cifar-10-batches-py/``, ``cifar-100-python/``, or a folder holding one of them). These are pickles, read
  with an unpickler that only rebuilds what the official files contain (numpy arrays, lists, dicts, strings),
  so a tampered file cannot run code.

Long-tailed subsets follow Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin
Loss", NeurIPS 2019 (github.com/kaidic/LDAM-DRW, ``imbalance_cifar.py``): class ``c`` keeps

    n_c = int(n_max * (1 / IR) ** (c / (C - 1)))

images, so class 0 keeps ``n_max`` and class ``C - 1`` keeps ``n_max / IR``.
"""
from __future__ import annotations

import codecs
import io
import math
import os
import pickle
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Literal, Sequence, Tuple

import numpy as np
from PIL import Image

from pancls.errors import UserError
from pancls.io import atomic_path
from pancls.validation import check_choice, check_scalar

try:
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

Dataset = Literal["cifar10", "cifar100"]
Construction = Literal["ldam", "first"]

NUM_CLASSES: Dict[str, int] = {"cifar10": 10, "cifar100": 100}
CONSTRUCTIONS = ("ldam", "first")
_TILE, _COLUMNS = 32, 128  # the packed npz layout: 32x32 tiles, 128 per PNG row


# --------------------------------------------------------------------------------------------------
# long-tailed profile and subsets


def img_num_per_cls(n_max: int, num_classes: int, imbalance_ratio: float) -> List[int]:
    """Images kept per class, ``int(n_max * (1/IR) ** (c / (C - 1)))``, as LDAM-DRW's ``get_img_num_per_cls``.

    >>> img_num_per_cls(5000, 10, 100)
    [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    """
    ir = _check_imbalance_ratio(imbalance_ratio)
    check_scalar(n_max, "n_max", int, min_val=1)
    check_scalar(num_classes, "num_classes", int, min_val=2)
    # Same float expression and evaluation order as LDAM-DRW, so the rounding matches bit for bit.
    imb_factor, img_max = 1.0 / ir, float(n_max)
    return [int(img_max * (imb_factor ** (c / (num_classes - 1.0)))) for c in range(num_classes)]


def long_tailed_indices(
    train_labels: np.ndarray,
    imbalance_ratio: float,
    construction: Construction = "ldam",
    num_classes: int | None = None,
) -> np.ndarray:
    """Official train indices of the long-tailed subset, class by class in construction order.

    ``ldam``: LDAM-DRW's ``IMBALANCECIFAR10/100`` (``rand_number=0``): seed the generator with 0 once, then for
    each class in turn shuffle *all* its indices and keep the first ``n_c``. A local ``RandomState(0)`` draws
    the same stream as ``np.random.seed(0)`` without touching global state. Because every class is shuffled
    in full, the stream does not depend on IR, and the subsets are nested: a larger IR keeps a subset.
    ``first``: the first ``n_c`` images of each class in official order.

    ``n_max`` is the size of the largest class (5000 for CIFAR-10, 500 for CIFAR-100); ``num_classes``
    defaults to ``max(label) + 1``. A class smaller than its ``n_c`` is a :class:`UserError`.
    """
    _check_lt_args(imbalance_ratio, construction)
    labels = np.asarray(train_labels).astype(np.int64, copy=False)
    if labels.ndim != 1 or labels.size == 0 or labels.min() < 0:
        raise UserError("must be a non-empty 1-D array of non-negative class labels", "train_labels")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    sizes = np.bincount(labels, minlength=num_classes)
    counts = img_num_per_cls(int(sizes.max()), num_classes, imbalance_ratio)
    short = [c for c in range(num_classes) if sizes[c] < counts[c]]
    if short:
        c = short[0]
        raise UserError(f"class {c} has {sizes[c]} images but imbalance_ratio={imbalance_ratio} needs {counts[c]}",
                        "train_labels")
    rng = np.random.RandomState(0)
    keep = []
    for c, n_c in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if construction == "ldam":
            rng.shuffle(idx)
        keep.append(idx[:n_c])
    return np.concatenate(keep)


def _check_imbalance_ratio(value) -> float:
    """IR = n_max / n_min: > 1, or exactly 1 for the balanced set."""
    return float(check_scalar(value, "imbalance_ratio", float, min_val=1))


# --------------------------------------------------------------------------------------------------
# results


@dataclass
class CifarSplit:
    """One split as stored by a source: ``images`` (N, 32, 32, 3) uint8 RGB, ``labels`` int64 (N,),
    ``index`` the official index of each image, ``classes`` the class names in label order."""

    images: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    classes: List[str]


@dataclass
class LTData:
    """A long-tailed train set and the full (balanced) test set.

    ``train_index[k]`` is the official train index of ``train_images[k]``; rows are in construction order.
    ``class_counts[c]`` is the number of train images of class ``c``; ``source`` is the file read.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: List[str]
    class_counts: List[int]
    train_index: np.ndarray
    source: str


# --------------------------------------------------------------------------------------------------
# public loaders


def load_cifar_split(path: str | os.PathLike, dataset: Dataset, split: Literal["train", "test"]) -> CifarSplit:
    """Every image of ``split`` the source holds (for the packed npz's train split: its stored subset)."""
    check_choice(split, "split", ("train", "test"))
    store = _open(path, dataset)
    if split == "test":
        images, labels = store.read_test()
        index = np.arange(len(labels))
    else:
        images, index = store.read_train(), store.train_index
        labels = store.train_labels[index]
    return CifarSplit(images, labels.astype(np.int64), index.astype(np.int64), list(store.classes))


def load_cifar_lt(
    path: str | os.PathLike,
    dataset: Dataset,
    imbalance_ratio: float,
    construction: Construction = "ldam",
) -> LTData:
    """CIFAR-10/100-LT: the long-tailed train subset at ``imbalance_ratio`` plus the full test set.

    ``imbalance_ratio=1`` is the full balanced train set (every train image, so not from the packed npz).
    """
    _check_lt_args(imbalance_ratio, construction)
    return _lt_from_store(_open(path, dataset), imbalance_ratio, construction, path)


def _check_lt_args(imbalance_ratio: float, construction: str) -> None:
    """Refuse bad arguments before a (possibly 170 MB) source is read."""
    _check_imbalance_ratio(imbalance_ratio)
    check_choice(construction, "construction", CONSTRUCTIONS)


def _lt_from_store(store: "_Store", imbalance_ratio: float, construction: str, path: str | os.PathLike) -> LTData:
    wanted = long_tailed_indices(store.train_labels, imbalance_ratio, construction, num_classes=len(store.classes))
    missing = ~np.isin(wanted, store.train_index)
    if missing.any():
        raise UserError(
            f"holds only part of the train set; imbalance_ratio={imbalance_ratio} ({construction}) needs "
            f"{int(missing.sum())} images it lacks; it supports {_supported_irs(store, construction)}, "
            "or use the official archive", path)
    stored = store.read_train()
    train_labels = store.train_labels[wanted]
    test_images, test_labels = store.read_test()
    return LTData(
        train_images=stored[np.searchsorted(store.train_index, wanted)],
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        classes=list(store.classes),
        class_counts=np.bincount(train_labels, minlength=len(store.classes)).tolist(),
        train_index=wanted.astype(np.int64),
        source=os.fspath(path),
    )


def write_lt_subset(
    src: str | os.PathLike,
    dst_npz: str | os.PathLike,
    dataset: Dataset,
    imbalance_ratio: float,
    construction: Construction = "ldam",
) -> Path:
    """Write an npz in the packed format holding only one long-tailed train subset plus the test set.

    Made for GPU machines that take at most 64 MiB of data along (CIFAR-10-LT at IR 100: about 48 MB).
    :func:`load_cifar_lt` reads the result for this ``imbalance_ratio`` and construction (and any larger
    ratio, as the subsets are nested). Labels of all train images are kept, so the subset is recomputed
    rather than trusted.
    """
    _check_lt_args(imbalance_ratio, construction)
    store = _open(src, dataset)
    data = _lt_from_store(store, imbalance_ratio, construction, src)
    order = np.argsort(data.train_index)
    arrays = dict(
        train_labels=store.train_labels.astype(np.uint8),
        train_index=data.train_index[order].astype(np.int32),
        train_png=_encode_tiles(data.train_images[order]),
        test_labels=data.test_labels.astype(np.uint8),
        test_png=_encode_tiles(data.test_images),
        classes=np.array(data.classes),
        layout=np.array([_TILE, _COLUMNS], dtype=np.int32),
        layout_names=np.array(["tile_size", "columns"]),
    )
    dst = Path(dst_npz)
    with atomic_path(dst) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)  # a file object: np.savez would append ".npz" to a path without it
    return dst


# --------------------------------------------------------------------------------------------------
# sources


@dataclass
class _Store:
    """What every source provides: labels of all train images, which of them it stores, and readers."""

    classes: List[str]
    train_labels: np.ndarray  # (N_train,) labels of every official train image
    train_index: np.ndarray  # sorted official indices of the stored train images
    read_train: Callable[[], np.ndarray]  # images of train_index, in that order
    read_test: Callable[[], Tuple[np.ndarray, np.ndarray]]


def _open(path: str | os.PathLike, dataset: str) -> _Store:
    check_choice(dataset, "dataset", NUM_CLASSES)
    path = Path(path)
    if not path.exists():
        raise UserError("no such file or folder", path)
    if path.is_dir():
        store = _open_python_folder(path, dataset)
    else:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic.startswith(b"PK"):
            store = _open_npz(path)
        elif magic.startswith(b"\x1f\x8b") or path.name.endswith((".tar", ".tar.gz", ".tgz")):
            store = _open_python_archive(path)
        else:
            raise UserError("not a CIFAR source: expected a packed .npz, an official cifar-*-python.tar.gz, "
                            "or its extracted folder", path)
    if len(store.classes) != NUM_CLASSES[dataset]:
        raise UserError(f"holds {len(store.classes)} classes but dataset={dataset!r} has {NUM_CLASSES[dataset]}; "
                        "is it the other CIFAR?", path)
    return store


# --- the packed npz ---------------------------------------------------------------------------------

_NPZ_KEYS = ("train_labels", "train_index", "train_png", "test_labels", "test_png", "classes", "layout")


def _open_npz(path: Path) -> _Store:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _NPZ_KEYS if k not in z.files]
            if missing:
                raise UserError(f"not a packed CIFAR npz: missing {', '.join(missing)}", path)
            meta = {k: z[k] for k in ("train_labels", "train_index", "test_labels", "classes", "layout")}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise UserError(f"corrupt or truncated npz: {exc}", path) from None
    tile, cols = (int(v) for v in meta["layout"])
    classes = [str(c) for c in meta["classes"]]
    train_labels, train_index = meta["train_labels"].astype(np.int64), meta["train_index"].astype(np.int64)
    if (train_index.ndim != 1 or np.any(np.diff(train_index) <= 0)
            or (train_index.size and (train_index[0] < 0 or train_index[-1] >= len(train_labels)))):
        raise UserError("train_index must hold sorted, unique official train indices", path)
    for key in ("train_labels", "test_labels"):
        if meta[key].size and meta[key].max() >= len(classes):
            raise UserError(f"{key} has labels beyond the {len(classes)} classes", path)

    def tiles(key: str, n: int) -> np.ndarray:
        try:
            with np.load(path, allow_pickle=False) as zz:
                png = zz[key].tobytes()
            grid = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, Image.DecompressionBombError) as exc:
            raise UserError(f"cannot decode {key}: {exc}", path) from None
        rows = grid.shape[0] // tile
        if grid.shape[1] != cols * tile or grid.shape[0] % tile or rows * cols < n:
            raise UserError(f"{key} is a {grid.shape[1]}x{grid.shape[0]} image, too small for {n} tiles of "
                            f"{tile}x{tile} in {cols} columns", path)
        out = grid.reshape(rows, tile, cols, tile, 3).swapaxes(1, 2).reshape(-1, tile, tile, 3)[:n]
        return np.ascontiguousarray(out)

    test_labels = meta["test_labels"].astype(np.int64)
    return _Store(classes, train_labels, train_index,
                  read_train=lambda: tiles("train_png", len(train_index)),
                  read_test=lambda: (tiles("test_png", len(test_labels)), test_labels))


def _encode_tiles(images: np.ndarray) -> np.ndarray:
    """Tile (N, 32, 32, 3) images row-major into one lossless PNG, as the packed npz stores them.

    zlib level 6: level 9 takes twice as long on CIFAR tiles for 0.4 % fewer bytes.
    """
    rows = -(-len(images) // _COLUMNS)
    grid = np.zeros((rows * _COLUMNS, _TILE, _TILE, 3), dtype=np.uint8)
    grid[: len(images)] = images
    grid = grid.reshape(rows, _COLUMNS, _TILE, _TILE, 3).swapaxes(1, 2).reshape(rows * _TILE, _COLUMNS * _TILE, 3)
    buf = io.BytesIO()
    Image.fromarray(grid, "RGB").save(buf, format="PNG", compress_level=6)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


# --- the official python version -----------------------------------------------------------------

# file names inside cifar-10-batches-py/ and cifar-100-python/, in official order
_LAYOUTS = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test="test_batch", meta="batches.meta", labels="labels", names="label_names"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test="test", meta="meta",
                     labels="fine_labels", names="fine_label_names"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Rebuilds only what the official CIFAR pickles hold: dicts, lists, ints, strings, uint8 arrays.

    The official files are Python 2 pickles whose arrays reduce to ``numpy.core.multiarray._reconstruct``
    and ``numpy.dtype``; files re-pickled by Python 3 at protocol 2 also encode bytes via ``_codecs.encode``.
    Any other global (``os.system``, ``builtins.eval``, ...) is refused before it is looked up.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR file") from None


def _unpickle(data: bytes, where: str, path: Path) -> dict:
    try:
        # latin1: Python 2 str -> str, and numpy's array state (a Python 2 str) back to its bytes
        obj = _CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as exc:  # any failure to parse untrusted bytes is the file's fault, not a bug
        raise UserError(f"{where}: unreadable pickle ({type(exc).__name__}: {exc})", path) from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a dict, found {type(obj).__name__}", path)
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _parse_batch(d: dict, labels_key: str, where: str, path: Path) -> Tuple[np.ndarray, np.ndarray]:
    x, y = d.get("data"), d.get(labels_key)
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise UserError(f"{where}: 'data' is not an (N, 3072) uint8 array", path)
    try:
        y = np.asarray(y, dtype=np.int64)
    except (TypeError, ValueError):
        y = None
    if y is None or y.shape != (len(x),):
        raise UserError(f"{where}: {labels_key!r} is not one integer label per image", path)
    # rows are 1024 R, 1024 G, 1024 B values (each plane row-major) -> NHWC
    return np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), y


def _store_from_pickles(files: Dict[str, dict], layout: dict, path: Path) -> _Store:
    names = files[layout["meta"]].get(layout["names"])
    if not isinstance(names, list) or not names:
        raise UserError(f"{layout['meta']}: no {layout['names']!r} list", path)
    classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    parts = [_parse_batch(files[n], layout["labels"], n, path) for n in layout["train"]]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _parse_batch(files[layout["test"]], layout["labels"], layout["test"], path)
    for y, where in ((train_y, "train"), (test_y, layout["test"])):
        if y.size and (y.min() < 0 or y.max() >= len(classes)):
            raise UserError(f"{where}: labels outside 0..{len(classes) - 1}", path)
    return _Store(classes, train_y, np.arange(len(train_y)),
                  read_train=lambda: train_x, read_test=lambda: (test_x, test_y))


def _which_layout(names: Sequence[str], path: Path) -> dict:
    names = set(names)
    for layout in _LAYOUTS.values():
        if layout["meta"] in names:
            missing = [n for n in (*layout["train"], layout["test"]) if n not in names]
            if missing:
                raise UserError(f"incomplete {layout['folder']}: missing {', '.join(missing)}", path)
            return layout
    raise UserError("not an official CIFAR python release: found neither batches.meta (CIFAR-10) "
                    "nor meta (CIFAR-100)", path)


def _open_python_archive(path: Path) -> _Store:
    wanted = {n for layout in _LAYOUTS.values() for n in (*layout["train"], layout["test"], layout["meta"])}
    raw: Dict[str, bytes] = {}
    try:
        # one sequential pass: seeking backwards in a .tar.gz would decompress from the start again
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name in wanted:
                    raw[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise UserError(f"corrupt or truncated archive: {exc}", path) from None
    layout = _which_layout(raw, path)
    files = {n: _unpickle(raw[n], n, path) for n in (*layout["train"], layout["test"], layout["meta"])}
    return _store_from_pickles(files, layout, path)


def _open_python_folder(path: Path, dataset: str) -> _Store:
    if not any((path / _LAYOUTS[d]["meta"]).is_file() for d in _LAYOUTS):
        # a parent folder (torchvision's ``root``) holding the extracted release
        inner = path / _LAYOUTS[dataset]["folder"]
        if not inner.is_dir():
            raise UserError(f"not a CIFAR folder: expected {_LAYOUTS[dataset]['folder']}/ or its files "
                            f"({_LAYOUTS[dataset]['meta']}, ...)", path)
        path = inner
    layout = _which_layout([p.name for p in path.iterdir() if p.is_file()], path)
    files = {n: _unpickle((path / n).read_bytes(), n, path)
             for n in (*layout["train"], layout["test"], layout["meta"])}
    return _store_from_pickles(files, layout, path)


def _supported_irs(store: _Store, construction: str) -> str:
    """The smallest IR whose subset this store holds (subsets are nested in IR, so every larger one too)."""

    def holds(ir: float) -> bool:
        try:
            idx = long_tailed_indices(store.train_labels, ir, construction, num_classes=len(store.classes))
        except UserError:  # a class smaller than this IR's n_c
            return False
        return bool(np.isin(idx, store.train_index).all())

    lo, hi = 1.0, 1e6
    if holds(lo):
        return "imbalance_ratio >= 1"
    if not holds(hi):
        return "no imbalance_ratio"
    for _ in range(40):  # bisection in log space
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if holds(mid) else (mid, hi)
    # Round up to two significant digits: still supported (nesting), and reads as the IR the file was made for
    # (the exact boundary of a file made for IR 100 is 99.98..., where the integer counts first change).
    step = 10.0 ** (math.floor(math.log10(hi)) - 1)
    return f"imbalance_ratio >= {math.ceil(round(hi / step, 9)) * step:g}"
