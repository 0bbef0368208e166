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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_lt_factory):
    return tiny_lt_factory(tmp_path_factory.mktemp("tiny_lt"), TRAIN_COUNTS, EVAL_PER_CLASS)


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


# --------------------------------------------------------------------------------------------------
# augmentation (pancls.data.images), against hand-worked examples

def _pixels():
    """A 1 x 2 RGB image: pixel A = (1, 0.5, 0), pixel B = black; gray(A) = 0.2989 + 0.587 * 0.5 = 0.5924."""
    import torch

    return torch.tensor([[[1.0, 0.0]], [[0.5, 0.0]], [[0.0, 0.0]]])


def test_colour_adjustments_by_hand():
    import torch

    from pancls.data.images import adjust_brightness, adjust_contrast, adjust_saturation, gray

    x = _pixels()
    assert torch.allclose(gray(x), torch.tensor([[[0.5924, 0.0]]]))
    # brightness 1.5: A -> (1.5 -> 1, 0.75, 0), B stays black
    assert torch.allclose(adjust_brightness(x, 1.5), torch.tensor([[[1.0, 0.0]], [[0.75, 0.0]], [[0.0, 0.0]]]))
    # contrast 0.5: blend with the mean grey (0.5924 + 0) / 2 = 0.2962: A -> 0.5 A + 0.1481, B -> 0.1481
    m = 0.5 * 0.2962
    expected = torch.tensor([[[0.5 + m, m]], [[0.25 + m, m]], [[m, m]]])
    assert torch.allclose(adjust_contrast(x, 0.5), expected, atol=1e-6)
    # saturation 0: the grey image; 2: 2 A - gray(A) = (1.4076 -> 1, 0.4076, -0.5924 -> 0)
    assert torch.allclose(adjust_saturation(x, 0.0), gray(x).expand(3, 1, 2))
    assert torch.allclose(adjust_saturation(x, 2.0), torch.tensor([[[1.0, 0.0]], [[0.4076, 0.0]], [[0.0, 0.0]]]))


def test_colour_jitter_factors_stay_in_range_and_zero_strength_is_identity():
    import torch

    from pancls.data.images import color_jitter

    x = torch.full((3, 4, 4), 0.5)
    g = torch.Generator().manual_seed(0)
    assert color_jitter(x, 0.0, g) is x
    # on a uniform grey image contrast and saturation do nothing: only brightness acts, x' = 0.5 f, f in [0.6, 1.4]
    values = torch.stack([color_jitter(x, 0.4, g)[0, 0, 0] for _ in range(400)])
    assert values.min() >= 0.3 - 1e-6 and values.max() <= 0.7 + 1e-6
    assert values.min() < 0.32 and values.max() > 0.68  # the whole range is used


def test_crop_boxes_by_hand():
    import torch

    from pancls.data.images import centre_crop_offset, random_resized_crop_box, shorter_side_size

    g = torch.Generator().manual_seed(0)
    # no try can fit (area 2x the image): the fallback is the centre crop with the aspect ratio clamped to 4/3
    assert random_resized_crop_box(100, 300, g, scale=(2.0, 2.0)) == (0, 83, 100, 133)   # w = round(100 * 4/3)
    assert random_resized_crop_box(300, 100, g, scale=(2.0, 2.0)) == (83, 0, 133, 100)   # h = round(100 / (3/4))
    assert random_resized_crop_box(90, 100, g, scale=(2.0, 2.0)) == (0, 0, 90, 100)      # 10/9 is within the range
    # scale 1, ratio 1 on a square: the whole image
    assert random_resized_crop_box(50, 50, g, scale=(1.0, 1.0), ratio=(1.0, 1.0)) == (0, 0, 50, 50)
    # Resize(256): the shorter side becomes 256, the longer int(256 * long / short); CenterCrop(224)
    assert shorter_side_size(200, 300, 256) == (256, 384)
    assert shorter_side_size(375, 500, 256) == (256, 341)   # 341.33 truncated
    assert shorter_side_size(500, 375, 256) == (341, 256)
    assert centre_crop_offset(256, 384, 224) == (16, 80)
    assert centre_crop_offset(256, 341, 224) == (16, 58)   # round(58.5) = 58 (round half to even, as torchvision)


def test_random_crops_respect_scale_and_ratio():
    import torch

    from pancls.data.images import random_resized_crop_box

    g = torch.Generator().manual_seed(1)
    boxes = [random_resized_crop_box(300, 400, g) for _ in range(2000)]
    for top, left, h, w in boxes:
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        assert 0.08 * 0.95 <= h * w / 120000 <= 1.0
        assert 0.75 * 0.95 <= w / h <= 4 / 3 * 1.05
    # On a square with scale <= 0.25 every draw fits (w <= sqrt(0.25 * 4/3) = 0.58 of the side), so the area
    # fraction is U(0.08, 0.25) up to rounding: mean 0.165, and log(w / h) is U(log 3/4, log 4/3): mean 0.
    boxes = [random_resized_crop_box(400, 400, g, scale=(0.08, 0.25)) for _ in range(4000)]
    areas = np.array([h * w / 160000 for _, _, h, w in boxes])
    assert abs(areas.mean() - 0.165) < 0.004 and areas.min() > 0.079 and areas.max() < 0.251
    assert abs(np.mean([np.log(w / h) for _, _, h, w in boxes])) < 0.01


def _png(path, h, w, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_eval_transform_is_resize_256_then_centre_crop_224(tmp_path):
    from pancls.data.images import ImageAugmentConfig, ImageListDataset

    pixels = _png(tmp_path / "a.png", 256, 300)  # the shorter side is already 256: the resize is the identity
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ds = ImageListDataset([str(tmp_path / "a.png")], [3], ImageAugmentConfig(), train=False, mean=mean, std=std)
    x, y = ds[0]
    assert y == 3 and x.shape == (3, 224, 224) and x.dtype.is_floating_point
    # top = round(32 / 2) = 16, left = round(76 / 2) = 38
    want = (pixels[16:240, 38:262].astype(np.float32) / 255 - np.array(mean, np.float32)) / np.array(std, np.float32)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), want, rtol=0, atol=1e-5)


def test_train_transform_flip_and_determinism(tmp_path):
    import torch

    from pancls.data.images import ImageAugmentConfig, ImageListDataset

    pixels = _png(tmp_path / "a.png", 32, 32)
    files = [str(tmp_path / "a.png")]
    whole = ImageAugmentConfig(crop_size=32, resize=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=0.0)
    ds = ImageListDataset(files, [0], whole, train=True, mean=(0, 0, 0), std=(1, 1, 1), flip_prob=1.0)
    x, _ = ds[0]  # the whole image, resized to its own size, mirrored
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), pixels[:, ::-1] / 255.0, atol=1e-6)

    jitter = ImageAugmentConfig(crop_size=16, resize=16)
    ds = ImageListDataset(files * 3, [0, 0, 0], jitter, train=True, mean=(0, 0, 0), std=(1, 1, 1), seed=5)
    first = ds[1][0]
    assert torch.equal(first, ds[1][0])            # (seed, epoch, index) fixes every draw
    assert not torch.equal(first, ds[2][0])        # another index, another crop
    ds.set_epoch(1)
    assert not torch.equal(first, ds[1][0])        # another epoch, another crop
    ds.set_epoch(0)
    assert torch.equal(first, ds[1][0])


def test_worker_count_does_not_change_the_batches_and_bad_jpegs_are_one_line(tiny, tmp_path):
    import torch

    from pancls.data.images import ImageAugmentConfig, ImageListDataset, UnreadableImage, make_loader

    root, train, val = tiny
    data = load_image_lists("imagenet_lt", root, train, val, num_classes=4)
    cfg = ImageAugmentConfig(crop_size=24, resize=28)
    ds = ImageListDataset(data.train.files, data.train.labels, cfg, train=True, mean=(0.5,) * 3, std=(0.25,) * 3)
    batches = {}
    for workers in (0, 2):
        torch.manual_seed(0)  # the DataLoader's shuffle draws its order from the global RNG
        batches[workers] = list(make_loader(ds, 8, shuffle=True, workers=workers))
    assert len(batches[0]) == 3 and batches[0][0][0].shape == (8, 3, 24, 24)
    for (xa, ya), (xb, yb) in zip(batches[0], batches[2], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)

    bad = tmp_path / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    broken = ImageListDataset([str(bad)] * 2, [0, 1], cfg, train=False, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(UnreadableImage, match="broken.JPEG: cannot decode the image") as caught:
        broken[0]
    with pytest.raises(UnreadableImage) as through_worker:
        next(iter(make_loader(broken, 2, shuffle=False, workers=1)))
    assert str(through_worker.value) == str(caught.value) and "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------------------
# `pancls lt` on a list benchmark, end to end

CONFIGS = ("imagenet_lt_resnet10", "imagenet_lt_resnet50", "imagenet_lt_resnext50", "inat18_resnet50")


def _lt_argv(config, tiny, out, *extra):
    from pathlib import Path

    root, train, val = tiny
    repo = Path(__file__).resolve().parents[2]
    dataset = "inat2018" if config.startswith("inat") else "imagenet_lt"
    return ["lt", "--config", str(repo / "configs" / f"{config}.yaml"), "--dataset", dataset, "--data", str(root),
            "--set", f"data.train_list={train}", "--set", f"data.eval_list={val}", "--set", "data.num_classes=4",
            "--out", str(out), *extra]


@pytest.mark.parametrize("config", CONFIGS)
def test_every_table4_config_dry_runs_on_the_tiny_lists(config, tiny, tmp_path, capsys):
    import json

    from pancls.cli import main

    code = main(_lt_argv(config, tiny, tmp_path / "r", "--dry-run"))
    out, err = capsys.readouterr()
    assert code == 0, err
    info = json.loads(out)
    assert info["n_train"] == 23 and info["n_test"] == 8 and info["num_classes"] == 4
    assert info["imbalance_ratio"] == 6.0 and info["shot_classes"] == {"many": 0, "medium": 0, "few": 4}
    assert info["backbone"] in ("resnet10_2d", "resnet50_2d", "resnext50_32x4d")


def test_pancls_lt_trains_one_epoch_on_the_tiny_image_folder(tiny, tmp_path, capsys):
    import json

    from pancls.cli import main

    out = tmp_path / "run"

    def small(workers):
        return ["--epochs", "1", "--device", "cpu", "--set", "model.backbone_kwargs.widen_factor=0.25",
                "--set", "model.head_kwargs.dim=16", "--set", "images.crop_size=32", "--set", "images.resize=36",
                "--set", f"images.workers={workers}", "--set", "train.batch_size=8", "--set", "eval_batch_size=4",
                "--set", "train.progress=false", "--set", "train.tensorboard=false"]

    code = main(_lt_argv("imagenet_lt_resnet10", tiny, out, *small(2)))
    stdout, err = capsys.readouterr()
    assert code == 0, err
    line = json.loads(stdout.strip().splitlines()[-1])
    assert 0.0 <= line["top1"] <= 1.0 and line["many"] is None and line["few"] is not None
    results = json.loads((out / "results.json").read_text())
    assert results["class_counts"] == list(TRAIN_COUNTS) and results["epochs"] == 1
    assert len(results["per_class_accuracy"]) == 4
    assert (out / "last.pt").exists() and (out / "crowding.png").exists()
    assert "images_per_s" in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # the resolved config names the lists absolutely, and a resume with another worker count is the same run
    from pancls.config import load_yaml

    saved = load_yaml(out / "config.yaml")
    assert saved["data"]["train_list"] == str(tiny[1]) and saved["images"]["workers"] == 2
    code = main(_lt_argv("imagenet_lt_resnet10", tiny, out, *small(0), "--resume"))
    _, err = capsys.readouterr()
    assert code == 0, err


def test_pancls_lt_lists_every_problem_and_exits_2(tiny, tmp_path, capsys):
    from pancls.cli import main

    root, train, _ = tiny
    val = tmp_path / "val.txt"
    val.write_text("val/n00000000/0.JPEG 9\nval/n00000000/gone.JPEG 0\nno-label-here\n")
    argv = _lt_argv("imagenet_lt_resnet10", (root, train, val), tmp_path / "r", "--dry-run")
    assert main(argv) == 2
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert lines[0] == "pancls lt: error: 3 problems in the image list:" and "Traceback" not in err
    assert [ln.split(": ", 1)[0] for ln in lines[1:]] == [f"{val}:1", f"{val}:2", f"{val}:3"]


def test_a_two_stage_run_trains_the_head_on_the_first_runs_backbone_and_outlives_it(tiny, tmp_path, capsys):
    """cRT through the CLI: stage 2 starts from stage 1's backbone (model.init_backbone_from), trains only its new
    head (model.freeze_backbone), and once written needs stage 1 no more (resume, re-reading)."""
    import shutil

    import torch

    from pancls.cli import main
    from pancls.lt import load_run

    small = ["--epochs", "1", "--device", "cpu", "--set", "model.backbone_kwargs.widen_factor=0.25",
             "--set", "images.crop_size=32", "--set", "images.resize=36", "--set", "images.workers=0",
             "--set", "train.batch_size=8", "--set", "eval_batch_size=4", "--set", "train.progress=false",
             "--set", "train.tensorboard=false"]
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    assert main(_lt_argv("imagenet_lt_resnet10", tiny, stage1, "--head", "softmax", *small)) == 0
    second = _lt_argv("imagenet_lt_resnet10", tiny, stage2, "--head", "tsp", "--set", "model.head_kwargs.dim=16",
                      "--set", f"model.init_backbone_from={stage1}", "--set", "model.freeze_backbone=true",
                      "--set", "train.sampler=class_balanced", *small)
    assert main(second) == 0, capsys.readouterr().err
    first = torch.load(stage1 / "last.pt", weights_only=True)["model"]
    trained = torch.load(stage2 / "last.pt", weights_only=True)["model"]
    backbone = [k for k in first if k.startswith("backbone.")]
    assert backbone and all(torch.equal(first[k], trained[k]) for k in backbone)  # BatchNorm statistics included
    shutil.rmtree(stage1)
    assert main([*second, "--resume"]) == 0, capsys.readouterr().err  # finished: no need of stage 1 now
    _, _, model = load_run(stage2)
    assert model.backbone_frozen and torch.equal(model.backbone.state_dict()[backbone[0][9:]], first[backbone[0]])
