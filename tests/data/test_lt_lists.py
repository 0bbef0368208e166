"""ImageNet-LT / iNaturalist 2018 list files: reading, every problem at once, class counts, shot groups; and
`pancls lt` end to end on a tiny generated image folder."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pancls.data.lt_lists import MAX_SHOWN, ImageListError, load_image_lists, parse_list, shot_split
from pancls.errors import UserError

#: training images per class of the tiny generated benchmark (a long tail: 12, 6, 3, 2), and eval images per class
TRAIN_COUNTS = (12, 6, 3, 2)
EVAL_PER_CLASS = 2
#: one colour per class, so that a model can learn the classes in an epoch or two
COLOURS = ((220, 40, 40), (40, 200, 40), (40, 40, 220), (230, 220, 40))


def write_tiny_benchmark(root, counts=TRAIN_COUNTS, eval_per_class=EVAL_PER_CLASS, seed=0):
    """A few dozen small JPEGs of varied sizes in ImageNet-LT's layout (``train/<class>/<i>.JPEG``,
    ``val/<class>/<i>.JPEG``) and the two list files; returns ``(root, train_list, eval_list)``."""
    rng = np.random.default_rng(seed)
    lists = {"train": [], "val": []}
    for split, per_class in (("train", list(counts)), ("val", [eval_per_class] * len(counts))):
        for label, n in enumerate(per_class):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(24, 48)), int(rng.integers(24, 64))
                pixels = np.clip(np.asarray(COLOURS[label]) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                name = f"{split}/n{label:08d}/{i}.JPEG"
                Image.fromarray(pixels).save(root / name, quality=90)
                lists[split].append(f"{name} {label}")
    train, val = root / "tiny_LT_train.txt", root / "tiny_LT_val.txt"
    train.write_text("\n".join(lists["train"]) + "\n")
    val.write_text("\n".join(lists["val"]) + "\n")
    return root, train, val


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_benchmark(tmp_path_factory.mktemp("tiny_lt"))


def test_lists_read_with_class_counts_from_the_train_list(tiny):
    root, train, val = tiny
    data = load_image_lists("imagenet_lt", root, train, val, num_classes=4)
    assert data.class_counts.tolist() == list(TRAIN_COUNTS)
    assert data.classes == ("0", "1", "2", "3")
    assert len(data.train) == sum(TRAIN_COUNTS) and len(data.eval) == 4 * EVAL_PER_CLASS
    assert data.train.files[0] == str(root / "train" / "n00000000" / "0.JPEG")
    assert data.train_labels.tolist()[:13] == [0] * 12 + [1]
    assert data.test_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert data.train.lines.tolist()[:3] == [1, 2, 3]


def test_every_problem_of_both_lists_is_reported_at_once(tiny, tmp_path):
    root, _, _ = tiny
    good = "train/n00000000/0.JPEG"
    train = tmp_path / "train.txt"
    train.write_text("\n".join([
        f"{good} 0",                              # 1 fine
        "train/n00000001/0.JPEG 1",               # 2 fine
        "train/n00000001/1.JPEG",                 # 3 one field: no label
        "",                                       # 4 blank: skipped, still counted
        f"{good} 7",                              # 5 label out of range (K = 4)
        f"{good} two",                            # 6 not a number
        "train/n00000000/missing.JPEG 0",         # 7 no such image
        f"{root / good} 0",                       # 8 absolute
        "../outside.JPEG 2",                      # 9 leaves the root
        "train/n00000003/0.JPEG 3",               # 10 fine
        "train/n00000002/0.JPEG 2",               # 11 fine
    ]) + "\n")
    val = tmp_path / "val.txt"
    val.write_text("val/n00000000/0.JPEG 0\nval/n00000000/nope.JPEG 0\n")
    with pytest.raises(ImageListError) as caught:
        load_image_lists("imagenet_lt", root, train, val, num_classes=4)
    lines = str(caught.value).splitlines()
    assert lines[0] == "7 problems in the image lists:"
    expected = [
        (train, 3, "expected 'relative/path label'"),
        (train, 5, "label 7 is out of range: the classes are 0 .. 3"),
        (train, 6, "the label 'two' (the last field) is not a whole number"),
        (train, 7, "image not found: train/n00000000/missing.JPEG"),
        (train, 8, "is absolute"),
        (train, 9, "leaves the image root"),
        (val, 2, "image not found: val/n00000000/nope.JPEG"),
    ]
    for line, (file, number, needle) in zip(lines[1:], expected, strict=True):
        assert line.startswith(f"{file}:{number}: ") and needle in line, line
    assert [p[1] for p in caught.value.problems] == [3, 5, 6, 7, 8, 9, 2]


def test_a_class_without_training_image_and_an_unknown_dataset(tiny, tmp_path):
    root, _, val = tiny
    train = tmp_path / "train.txt"
    train.write_text("train/n00000000/0.JPEG 0\ntrain/n00000001/0.JPEG 1\ntrain/n00000003/0.JPEG 3\n")
    with pytest.raises(ImageListError, match=r"train\.txt: class\(es\) 2 have no training image"):
        load_image_lists("imagenet_lt", root, train, val, num_classes=4)
    # the standard count: 1000 classes, 997 of them empty, listed briefly
    with pytest.raises(ImageListError, match=r"class\(es\) 2, 4, 5, .* \(997 in all\) have no training image"):
        load_image_lists("imagenet_lt", root, train, val)
    with pytest.raises(UserError, match="unknown list dataset 'imagenet'"):
        load_image_lists("imagenet", root, train, val)
    with pytest.raises(UserError, match="data.train_list: imagenet_lt needs the training list"):
        load_image_lists("imagenet_lt", root, None, val)


def test_a_path_with_a_space_reads_and_labels_may_carry_a_sign(tmp_path):
    (tmp_path / "a b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a b" / "c d.jpg")
    lst = tmp_path / "l.txt"
    lst.write_text("a b/c d.jpg   +1\r\n")
    read = parse_list(lst, tmp_path, num_classes=2)
    assert read.files == (str(tmp_path / "a b" / "c d.jpg"),) and read.labels.tolist() == [1]


def test_unreadable_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="image list not found") as caught:
        parse_list(tmp_path / "nope.txt", tmp_path, 3)
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="the image root is not a folder"):
        parse_list(tmp_path / "nope.txt", tmp_path / "no_root", 3)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ImageListError, match=r"empty\.txt: the list has no entries"):
        parse_list(empty, tmp_path, 3)


def test_a_wrong_image_root_prints_a_bounded_report(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("".join(f"x/{i}.jpg 0\n" for i in range(MAX_SHOWN + 50)))
    with pytest.raises(ImageListError) as caught:
        parse_list(lst, tmp_path, 2)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{MAX_SHOWN + 50} problems in the image list:"
    assert len(lines) == MAX_SHOWN + 2 and lines[-1] == "... and 50 more"


def test_shot_split_boundaries():
    # > 100 many, 20..100 medium, < 20 few (OLTR): 101 is many, 100 and 20 medium, 19 few
    assert shot_split([150, 101, 100, 20, 19, 1]) == {"many": 2, "medium": 2, "few": 2}
