"""Shared fixtures. The real data lives beside the repo in ``../shared/data`` (override: PANCLS_DATA)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    return Path(os.environ.get("PANCLS_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def process_env() -> dict:
    """The environment for a pancls subprocess (one process or torchrun's): this repo importable, one thread, and
    none of torchrun's variables inherited from a surrounding launcher."""
    from pancls.distributed import TORCHRUN_VARS

    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder; fails (not skips) with a clear message when it is missing."""
    root = _shared_data_dir()
    if not (root / "SOURCES.md").exists():
        pytest.fail(f"real test data not found at {root}; set PANCLS_DATA to the shared/data folder")
    return root


@pytest.fixture(scope="session")
def ct_data(shared_data: Path) -> Path:
    return shared_data / "ct"


@pytest.fixture(scope="session")
def cifar10_npz(shared_data: Path) -> Path:
    return shared_data / "cifar10.npz"


# --------------------------------------------------------------- a tiny long-tailed image benchmark (`pancls lt`)
#: one colour per class, so that a model can learn the classes in an epoch or two
TINY_LT_COLOURS = ((220, 40, 40), (40, 200, 40), (40, 40, 220), (230, 220, 40))


def write_tiny_lt_benchmark(root: Path, counts, eval_per_class: int, seed: int = 0):
    """A few dozen small JPEGs of varied sizes in ImageNet-LT's layout (``train/<class>/<i>.JPEG``,
    ``val/<class>/<i>.JPEG``, at most 4 classes, ``counts[k]`` training images of class k) and the two list
    files; returns ``(root, train_list, eval_list)``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    lists = {"train": [], "val": []}
    for split, per_class in (("train", list(counts)), ("val", [eval_per_class] * len(counts))):
        for label, n in enumerate(per_class):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(24, 48)), int(rng.integers(24, 64))
                colour = np.asarray(TINY_LT_COLOURS[label])
                pixels = np.clip(colour + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                name = f"{split}/n{label:08d}/{i}.JPEG"
                Image.fromarray(pixels).save(root / name, quality=90)
                lists[split].append(f"{name} {label}")
    train, val = root / "tiny_LT_train.txt", root / "tiny_LT_val.txt"
    train.write_text("\n".join(lists["train"]) + "\n")
    val.write_text("\n".join(lists["val"]) + "\n")
    return root, train, val


@pytest.fixture(scope="session")
def tiny_lt_factory():
    """:func:`write_tiny_lt_benchmark`, for tests that need the tiny image benchmark."""
    return write_tiny_lt_benchmark


# --------------------------------------------------------------- a tiny `pancls cv` cohort and recipe
#: A 4-fold recipe small enough for seconds per run on a CPU (16 x 16 x 8 ROI, ResNet-10 at 1/8 width).
TINY_CV = {
    "preprocess": {"spacing": [4.0, 4.0, 4.5], "windows": [[400, 40]], "roi": "mask", "margin_mm": 4.0,
                   "size": [16, 16, 8]},
    "augment": {"affine_prob": 0.0, "noise_prob": 0.0},
    "model": {"backbone": "resnet10", "backbone_kwargs": {"widen_factor": 0.125}, "head": "tsp"},
    "train": {"epochs": 3, "batch_size": 6, "optimizer": "adamw", "lr": 3e-3, "warmup_epochs": 1,
              "schedule": "cosine", "progress": False, "weight_decay": 1e-4, "wd_on_all": False},
    "cv": {"folds": 4, "inner_folds": 3, "bootstrap": 50},
    "device": "cpu", "eval_batch_size": 12,
}


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """The synthetic cohort of ``pancls synth`` at 1 % scale (a few patients per class), 48 x 48 x 32 voxels."""
    from pancls.data.synth import generate_dataset, load_synth_config

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, load_synth_config(size=[48, 48, 32], spacing=[4.0, 4.0, 4.5], dicom_subset=0),
                     scale=0.01, progress=False, workers=1)
    return out


def tiny_cv_config(cohort: Path, tmp: Path, **changes):
    """:data:`TINY_CV` on ``cohort`` with dotted-key ``changes`` (``**{"preprocess.roi": "centre"}``)."""
    from pancls import cv

    data = json.loads(json.dumps(TINY_CV))
    data["data"] = {"manifest": str(cohort / "manifest.csv"), "cache_dir": str(tmp / "cache")}
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        node = data
        for part in section.split(".") if section else []:
            node = node.setdefault(part, {})
        node[name] = value
    return cv.load_config(data)


@pytest.fixture(scope="session")
def tiny_cv_config_factory():
    return tiny_cv_config


@pytest.fixture(scope="session")
def cv_runs(cohort, tmp_path_factory):
    """Two finished tiny 4-fold runs on the same cohort, ``{"mask": run, "centre": run}`` by ROI mode."""
    from pancls import cv

    tmp = tmp_path_factory.mktemp("cv_runs")
    out = {}
    for roi in ("mask", "centre"):
        cv.run(tiny_cv_config(cohort, tmp, **{"preprocess.roi": roi}), tmp / roi, log=lambda _: None)
        out[roi] = tmp / roi
    return out
