"""CIFAR / CIFAR-LT loading: the real packed CIFAR-10 npz, and small archives in the official python format."""
from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from pancls.data.cifar import (
    img_num_per_cls,
    load_cifar_lt,
    load_cifar_split,
    long_tailed_indices,
    write_lt_subset,
)
from pancls.errors import UserError

# SOURCES.md
CIFAR10_LT_COUNTS = {
    100: [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50],
    50: [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100],
}
FIRST_TRAIN_LABELS = [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
FIRST_TEST_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


def ldam_reference(targets: np.ndarray, counts: list[int]) -> np.ndarray:
    """LDAM-DRW's IMBALANCECIFAR10.gen_imbalanced_data, with the global seed as there (state restored after)."""
    saved = np.random.get_state()
    try:
        np.random.seed(0)
        keep = []
        for the_class, n in zip(np.unique(targets), counts, strict=True):
            idx = np.where(targets == the_class)[0]
            np.random.shuffle(idx)
            keep.append(idx[:n])
        return np.concatenate(keep)
    finally:
        np.random.set_state(saved)


def decode_tiles(png: np.ndarray, n: int) -> np.ndarray:
    """SOURCES.md's decode() recipe."""
    g = np.asarray(Image.open(io.BytesIO(png.tobytes())).convert("RGB"))
    return g.reshape(g.shape[0] // 32, 32, 128, 32, 3).swapaxes(1, 2).reshape(-1, 32, 32, 3)[:n]


# --------------------------------------------------------------------------------------------------
# the real packed CIFAR-10


@pytest.fixture(scope="module")
def npz_arrays(cifar10_npz):
    with np.load(cifar10_npz, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def lt100(cifar10_npz):
    return load_cifar_lt(cifar10_npz, "cifar10", 100, "ldam")


@pytest.mark.parametrize("construction", ["ldam", "first"])
@pytest.mark.parametrize("ir, total", [(100, 12406), (50, 13996)])
def test_cifar10_lt_sizes_and_counts(cifar10_npz, lt100, ir, total, construction):
    data = lt100 if (ir, construction) == (100, "ldam") else load_cifar_lt(cifar10_npz, "cifar10", ir, construction)
    assert len(data.train_images) == len(data.train_labels) == len(data.train_index) == total
    assert data.class_counts == CIFAR10_LT_COUNTS[ir]
    assert np.bincount(data.train_labels, minlength=10).tolist() == CIFAR10_LT_COUNTS[ir]
    assert len(np.unique(data.train_index)) == total
    assert data.train_images.dtype == np.uint8 and data.train_images.shape == (total, 32, 32, 3)
    assert data.train_labels.dtype == np.int64
    if construction == "first":  # the first n_c of each class, in official order
        for c, n_c in enumerate(CIFAR10_LT_COUNTS[ir]):
            idx = data.train_index[data.train_labels == c]
            assert np.all(np.diff(idx) > 0) and len(idx) == n_c


def test_ldam_subset_matches_reference_algorithm(cifar10_npz, npz_arrays, lt100):
    targets = npz_arrays["train_labels"].astype(np.int64)
    expected = ldam_reference(targets, CIFAR10_LT_COUNTS[100])
    np.testing.assert_array_equal(lt100.train_index, expected)  # same indices, same order
    np.testing.assert_array_equal(lt100.train_labels, targets[expected])
    # the local RandomState leaves the global stream alone
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    long_tailed_indices(targets, 50)
    assert np.random.random() == before


def test_test_split_balanced_and_first_labels(lt100, cifar10_npz):
    assert lt100.test_images.shape == (10000, 32, 32, 3) and lt100.test_images.dtype == np.uint8
    assert np.bincount(lt100.test_labels).tolist() == [1000] * 10
    assert lt100.test_labels[:10].tolist() == FIRST_TEST_LABELS
    assert lt100.classes[:3] == ["airplane", "automobile", "bird"] and len(lt100.classes) == 10
    train = load_cifar_split(cifar10_npz, "cifar10", "train")
    assert len(train.index) == 19376
    for i, label in enumerate(FIRST_TRAIN_LABELS):
        if i in train.index:
            assert train.labels[np.searchsorted(train.index, i)] == label
    assert np.isin(np.arange(10), train.index).sum() >= 3  # the check above is not vacuous


def test_stored_images_equal_own_decode(lt100, npz_arrays):
    index = npz_arrays["train_index"]
    own_train = decode_tiles(npz_arrays["train_png"], len(index))
    rng = np.random.default_rng(1)
    for k in rng.choice(len(lt100.train_index), size=20, replace=False):
        official = lt100.train_index[k]
        np.testing.assert_array_equal(lt100.train_images[k], own_train[np.searchsorted(index, official)])
    own_test = decode_tiles(npz_arrays["test_png"], 10000)
    np.testing.assert_array_equal(lt100.test_images[[0, 4321, 9999]], own_test[[0, 4321, 9999]])
    assert lt100.train_images.std() > 10  # real pictures, not black tiles


def test_npz_errors(cifar10_npz, tmp_path):
    with pytest.raises(UserError, match="supports imbalance_ratio >= 50") as exc:
        load_cifar_lt(cifar10_npz, "cifar10", 10)
    assert exc.value.where == os.fspath(cifar10_npz)
    with pytest.raises(UserError, match="holds 10 classes"):
        load_cifar_lt(cifar10_npz, "cifar100", 100)
    with pytest.raises(UserError, match="no such file"):
        load_cifar_lt(tmp_path / "cifar10.npz", "cifar10", 100)
    for bad in (0.5, float("nan"), "100", True):
        with pytest.raises(UserError) as exc:
            load_cifar_lt(cifar10_npz, "cifar10", bad)
        assert exc.value.where == "imbalance_ratio"
    with pytest.raises(UserError, match="unknown dataset"):
        load_cifar_lt(cifar10_npz, "cifar11", 100)
    with pytest.raises(UserError, match="unknown construction"):
        load_cifar_lt(cifar10_npz, "cifar10", 100, "random")


def test_write_lt_subset_round_trip(cifar10_npz, lt100, tmp_path):
    dst = write_lt_subset(cifar10_npz, tmp_path / "c10_ir100.npz", "cifar10", 100, "ldam")
    size = dst.stat().st_size
    assert size < os.path.getsize(cifar10_npz) and size < 64 * 2**20
    back = load_cifar_lt(dst, "cifar10", 100, "ldam")
    np.testing.assert_array_equal(back.train_index, lt100.train_index)
    np.testing.assert_array_equal(back.train_images, lt100.train_images)
    np.testing.assert_array_equal(back.test_images, lt100.test_images)
    np.testing.assert_array_equal(back.test_labels, lt100.test_labels)
    assert back.classes == lt100.classes
    with pytest.raises(UserError, match="supports imbalance_ratio >= 100"):
        load_cifar_lt(dst, "cifar10", 50)


# --------------------------------------------------------------------------------------------------
# profile


def test_img_num_per_cls_profiles():
    assert img_num_per_cls(5000, 10, 100) == CIFAR10_LT_COUNTS[100]
    assert img_num_per_cls(5000, 10, 50) == CIFAR10_LT_COUNTS[50]
    c100 = img_num_per_cls(500, 100, 100)
    assert sum(c100) == 10847 and c100[:10] == [500, 477, 455, 434, 415, 396, 378, 361, 344, 328]
    assert c100[-1] == 5
    assert sum(img_num_per_cls(500, 100, 50)) == 12608
    assert img_num_per_cls(500, 100, 1) == [500] * 100


@pytest.mark.parametrize("construction", ["ldam", "first"])
def test_cifar100_lt_sizes_from_labels(construction):
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(100), 500))
    for ir, total in ((100, 10847), (50, 12608)):
        idx = long_tailed_indices(labels, ir, construction)
        assert len(idx) == len(np.unique(idx)) == total
        assert np.bincount(labels[idx], minlength=100).tolist() == img_num_per_cls(500, 100, ir)


# --------------------------------------------------------------------------------------------------
# small archives in the official python format

PER_CLASS_TRAIN, PER_CLASS_TEST = 6, 2


def _official_tree(root, dataset, rng):
    """Write cifar-10-batches-py/ or cifar-100-python/ as the official release lays it out (pickle protocol 2)."""
    num_classes = 10 if dataset == "cifar10" else 100
    per_class_train = PER_CLASS_TRAIN if dataset == "cifar10" else 3
    train_y = rng.permutation(np.repeat(np.arange(num_classes), per_class_train))
    test_y = rng.permutation(np.repeat(np.arange(num_classes), PER_CLASS_TEST))
    train_x = rng.integers(0, 256, (len(train_y), 3072), dtype=np.uint8)
    test_x = rng.integers(0, 256, (len(test_y), 3072), dtype=np.uint8)
    names = [f"class_{c}" for c in range(num_classes)]

    def dump(path, obj):
        path.write_bytes(pickle.dumps(obj, protocol=2))

    if dataset == "cifar10":  # Python 2 str keys and names, as bytes (how encoding="bytes" reads them)
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for b, part in enumerate(np.array_split(np.arange(len(train_y)), 5)):
            dump(folder / f"data_batch_{b + 1}", {b"batch_label": b"training batch", b"labels": train_y[part].tolist(),
                                                  b"data": train_x[part], b"filenames": [b"x.png"] * len(part)})
        dump(folder / "test_batch", {b"batch_label": b"testing batch", b"labels": test_y.tolist(), b"data": test_x})
        dump(folder / "batches.meta", {b"label_names": [n.encode() for n in names], b"num_vis": 3072})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        dump(folder / "train", {"fine_labels": train_y.tolist(), "coarse_labels": (train_y // 5).tolist(),
                                "data": train_x})
        dump(folder / "test", {"fine_labels": test_y.tolist(), "coarse_labels": (test_y // 5).tolist(), "data": test_x})
        dump(folder / "meta", {"fine_label_names": names, "coarse_label_names": [f"super_{i}" for i in range(20)]})
    (folder / "readme.html").write_text("<html></html>")
    return folder, train_x, train_y, test_x, test_y, names


def _tar_gz(folder, path):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return path


def _hwc(rows: np.ndarray) -> np.ndarray:
    """Planes -> HWC written out element by element (independent of the loader's reshape)."""
    out = np.empty((len(rows), 32, 32, 3), np.uint8)
    for i in range(32):
        for j in range(32):
            for ch in range(3):
                out[:, i, j, ch] = rows[:, ch * 1024 + i * 32 + j]
    return out


@pytest.mark.parametrize("dataset, archive", [("cifar10", "cifar-10-python.tar.gz"),
                                              ("cifar100", "cifar-100-python.tar.gz")])
def test_official_archive_round_trip(tmp_path, dataset, archive):
    tree = _official_tree(tmp_path / "src", dataset, np.random.default_rng(3))
    folder, train_x, train_y, test_x, test_y, names = tree
    tgz = _tar_gz(folder, tmp_path / archive)
    for source in (tgz, folder, folder.parent):  # archive, extracted folder, torchvision-style root
        train = load_cifar_split(source, dataset, "train")
        np.testing.assert_array_equal(train.images, _hwc(train_x))
        np.testing.assert_array_equal(train.labels, train_y)
        np.testing.assert_array_equal(train.index, np.arange(len(train_y)))
        assert train.classes == names
        test = load_cifar_split(source, dataset, "test")
        np.testing.assert_array_equal(test.images, _hwc(test_x))
        np.testing.assert_array_equal(test.labels, test_y)

    num_classes, n_max = len(names), len(train_y) // len(names)
    ir = 3 if dataset == "cifar10" else 2
    counts = img_num_per_cls(n_max, num_classes, ir)
    assert counts[0] == n_max and counts[-1] == n_max // ir  # the profile really is imbalanced
    lt = load_cifar_lt(tgz, dataset, ir, "ldam")
    expected = ldam_reference(train_y, counts)
    np.testing.assert_array_equal(lt.train_index, expected)
    np.testing.assert_array_equal(lt.train_images, _hwc(train_x[expected]))
    np.testing.assert_array_equal(lt.train_labels, train_y[expected])
    assert lt.class_counts == counts
    first = load_cifar_lt(folder, dataset, ir, "first")
    assert first.class_counts == counts and not np.array_equal(np.sort(first.train_index), np.sort(expected))

    balanced = load_cifar_lt(tgz, dataset, 1, "first")
    assert balanced.class_counts == [n_max] * num_classes


def test_archive_dataset_mismatch_and_damage(tmp_path):
    folder, *_ = _official_tree(tmp_path / "src", "cifar100", np.random.default_rng(4))
    tgz = _tar_gz(folder, tmp_path / "cifar-100-python.tar.gz")
    with pytest.raises(UserError, match="holds 100 classes but dataset='cifar10'") as exc:
        load_cifar_lt(tgz, "cifar10", 100)
    assert exc.value.where == os.fspath(tgz)

    data = tgz.read_bytes()
    cut = tmp_path / "cut" / "cifar-100-python.tar.gz"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated archive") as exc:
        load_cifar_lt(cut, "cifar100", 2)
    assert exc.value.where == os.fspath(cut)

    (folder / "test").unlink()
    with pytest.raises(UserError, match="missing test"):
        load_cifar_split(folder, "cifar100", "train")


def test_malicious_pickle_is_refused_not_run(tmp_path):
    folder, *_ = _official_tree(tmp_path / "src", "cifar10", np.random.default_rng(5))
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}, protocol=2))
    tgz = _tar_gz(folder, tmp_path / "cifar-10-python.tar.gz")
    for source in (folder, tgz):
        with pytest.raises(UserError, match=r"data_batch_3: unreadable pickle .*refusing to load (posix|nt)\.system"):
            load_cifar_lt(source, "cifar10", 2)
    assert not marker.exists()


def test_write_lt_subset_from_archive_and_truncated_npz(tmp_path):
    folder, train_x, train_y, *_ = _official_tree(tmp_path / "src", "cifar10", np.random.default_rng(6))
    dst = write_lt_subset(folder, tmp_path / "sub.npz", "cifar10", 3, "first")
    lt = load_cifar_lt(dst, "cifar10", 3, "first")
    np.testing.assert_array_equal(lt.train_index, long_tailed_indices(train_y, 3, "first"))
    np.testing.assert_array_equal(lt.train_images, _hwc(train_x[lt.train_index]))
    with pytest.raises(UserError, match="supports imbalance_ratio >= "):
        load_cifar_lt(dst, "cifar10", 1, "first")

    cut = tmp_path / "cut.npz"
    cut.write_bytes(dst.read_bytes()[: dst.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt or truncated npz"):
        load_cifar_lt(cut, "cifar10", 3)
